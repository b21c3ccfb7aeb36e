"""Every transform the presets use, on real and awkward images, must not raise."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines import datasets  # noqa: F401  (installs the posterize fix before any policy is built)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import fuzz_transforms  # noqa: E402

SAMPLES = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'imagenet-samples')


def test_posterize_at_magnitude_ten_does_not_raise():
    # m9 with mstd0.5 reaches magnitude 10, where timm asks Pillow for 0 bits (Pillow 13 raises)
    from timm.data.auto_augment import AugmentOp
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    out = op(img)
    assert np.asarray(out).max() == 0
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)
    assert np.asarray(op(img)).max() > 0


def test_every_preset_transform_on_awkward_and_real_images():
    images = fuzz_transforms.odd_images(seed=0)
    if os.path.isdir(SAMPLES):
        images += fuzz_transforms.real_images(SAMPLES, limit=3)
    failures = fuzz_transforms.fuzz(images, repeats=1, seed=0)
    assert not failures, '\n'.join(failures[:10])


@pytest.mark.skipif(not os.path.isdir(SAMPLES), reason='../shared/data/imagenet-samples not present')
def test_strongest_stage_many_draws_on_real_photos():
    from curriculum import build_plan
    from pipelines.datasets import train_transform
    import main as main_mod
    args = main_mod.get_args_parser().parse_args(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200'])
    last = build_plan(args).stages[-1]
    tf = train_transform(args, last.size, last.magnitude, 'lanczos')
    imgs = fuzz_transforms.real_images(SAMPLES, limit=20)
    for r in range(15):
        np.random.seed(r)
        for img in imgs:
            assert tf(img).shape == (3, 224, 224)
