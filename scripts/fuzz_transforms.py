"""Run every training transform of every preset over many images and report any that raises.

    python scripts/fuzz_transforms.py --images /path/to/imagenet/train --repeats 100

A real run samples the strongest augmentations millions of times in its last stages,
so a transform that raises once in 10^6 draws would kill it. For each published recipe
(et and etpp, every model family), each distinct (B, m) stage, both low-frequency
modes and both data pipelines, the transform is applied to real photographs (when a
folder is given) and to generated images of awkward sizes and contents, with a
different seed for every draw. Also checks the output shape and dtype.
Exit status 0 when nothing failed.
"""
import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import main as main_mod  # noqa: E402
from curriculum import build_plan  # noqa: E402
from curriculum.presets import ETPP_RECIPES  # noqa: E402
from pipelines.datasets import IMG_EXTENSIONS, train_transform  # noqa: E402


def odd_images(seed=0):
    """RGB images of awkward shapes and contents (what ImageFolder's RGB loader can hand over)."""
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (2, 3), (1, 300), (300, 1), (7, 5), (31, 2000), (2000, 31), (224, 224), (500, 375)]
    out = []
    for w, h in sizes:
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    for value in (0, 255):
        out.append(Image.new('RGB', (120, 90), (value, value, value)))
    # a greyscale photo-like ramp and a palette image, converted as the loader does
    out.append(Image.linear_gradient('L').convert('RGB'))
    out.append(Image.new('P', (64, 64), 3).convert('RGB'))
    return out


def real_images(folder, limit=None):
    paths = []
    for dirpath, _, files in sorted(os.walk(folder)):
        paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if limit:
        paths = paths[:limit]
    imgs = []
    for p in paths:
        with Image.open(p) as im:
            imgs.append(im.convert('RGB'))
    return imgs


def configurations(pipelines=('published', 'fast')):
    """(description, args, size, magnitude, lowfreq) for every distinct transform of the presets."""
    seen, out = set(), []
    models = sorted(set(ETPP_RECIPES)) + ['resnet18']
    for pipeline in pipelines:
        for curriculum in ('et', 'etpp'):
            for lowfreq in ('fourier', 'lanczos'):
                for model in models:
                    args = main_mod.get_args_parser().parse_args(
                        ['--model', model, '--curriculum', curriculum, '--lowfreq', lowfreq,
                         '--epochs', '300' if curriculum == 'et' else '200', '--batch_size', '128',
                         '--update_freq', '4', '--data_pipeline', pipeline])
                    for s in build_plan(args).stages:
                        key = (pipeline, s.size, s.magnitude, lowfreq)
                        if key not in seen:
                            seen.add(key)
                            desc = f'{pipeline} {curriculum} {lowfreq} B={s.size} m={s.magnitude}'
                            out.append((desc, args, s.size, s.magnitude, lowfreq))
    return out


def fuzz(images, repeats=1, seed=0, pipelines=('published', 'fast'), log=print):
    """Apply every configuration to every image `repeats` times; returns a list of failures."""
    failures, draws = [], 0
    t0 = time.time()
    for desc, args, size, magnitude, lowfreq in configurations(pipelines):
        tf = train_transform(args, size, magnitude, lowfreq)
        expect = args.base_input_size if lowfreq == 'fourier' else size
        for r in range(repeats):
            for i, img in enumerate(images):
                s = ((seed * 1_000_003 + r) * 1_000_003 + i)
                random.seed(s)
                np.random.seed(s % 2 ** 32)
                torch.manual_seed(s)
                draws += 1
                try:
                    x = tf(img.copy())
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    failures.append(f'{desc}, image {i} ({img.size}), draw seed {s}: {type(e).__name__}: {e}')
                    continue
                # the fast pipeline hands uint8 HWC to the device, which permutes and normalises
                shapes = [(3, expect, expect)] + ([(expect, expect, 3)] if x.dtype == torch.uint8 else [])
                if tuple(x.shape) not in shapes:
                    failures.append(f'{desc}, image {i}: output shape {tuple(x.shape)}, expected one of {shapes}')
                elif x.dtype not in (torch.float32, torch.uint8) or (x.dtype == torch.float32 and not torch.isfinite(x).all()):
                    failures.append(f'{desc}, image {i}: bad output dtype/values ({x.dtype})')
    log(f'{draws} transform draws, {len(failures)} failures, {time.time() - t0:.1f}s')
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--images', default=None, help='a folder of photographs (ImageFolder or flat)')
    p.add_argument('--limit', type=int, default=None, help='at most this many photographs')
    p.add_argument('--repeats', type=int, default=10, help='draws per image and configuration')
    p.add_argument('--seed', type=int, default=0, help='seed of the generated odd images and of the draws')
    p.add_argument('--pipelines', default='published,fast', help='comma-separated data pipelines to fuzz')
    a = p.parse_args(argv)
    images = odd_images(a.seed)
    if a.images:
        if not os.path.isdir(a.images):
            raise SystemExit(f'error: --images {a.images} is not a directory')
        images += real_images(a.images, a.limit)
    failures = fuzz(images, a.repeats, a.seed, tuple(a.pipelines.split(',')))
    for f in failures[:50]:
        print('FAIL', f)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
