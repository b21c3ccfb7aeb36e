"""Build the reduced-size image store that ``--image_store`` reads (pipelines/store.py).

    python scripts/build_image_store.py --data_path /data/imagenet/train --out /data/imagenet-store
    torchrun ... main.py --data_path /data/imagenet --data_pipeline fast --image_store /data/imagenet-store ...

For every image of the training folder (the files torchvision's ImageFolder lists, as
training does), writes a JPEG copy at 1/k resolution per level k (default 1/2 and 1/4,
quality 95, 4:4:4) under OUT/<k>/, then OUT/store.json.  One build at a time per OUT.
An interrupted build resumes: copies already there with the right size are kept, and
the manifest is written only when every image has been handled.  Unreadable source
images are listed in the manifest and get no copy (training treats them as it treats
them without a store).  The copies of ImageNet's training set take about 40% of its
size (1/2: ~30%, 1/4: ~9%).
"""
import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from torchvision import datasets as tv_datasets  # noqa: E402

from pipelines import store  # noqa: E402
from utils import atomic_write_text, fsync_directory  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # required flags: SUPPRESS keeps '(default: None)' out of --help
    p.add_argument('--data_path', required=True, default=argparse.SUPPRESS,
                   help='the training image folder (<root>/<class>/<image>) (required)')
    p.add_argument('--out', required=True, default=argparse.SUPPRESS,
                   help='the store directory (created; may be an interrupted build) (required)')
    p.add_argument('--levels', default=','.join(map(str, store.DEFAULT_LEVELS)),
                   help='comma-separated reduction factors, among 2, 4, 8')
    p.add_argument('--quality', type=int, default=store.DEFAULT_QUALITY, help='JPEG quality of the copies (1-100)')
    p.add_argument('--subsampling', default='4:4:4', choices=sorted(store.SUBSAMPLING),
                   help='chroma subsampling of the copies')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                   help='processes (default: the CPU count, %(default)s here)')
    args = p.parse_args(argv)
    try:
        args.levels = store.check_levels(args.levels.split(','))
    except ValueError as e:
        p.error(f'--levels {args.levels}: {e}')
    if not 1 <= args.quality <= 100:
        p.error(f'--quality {args.quality}: use 1-100 (95 keeps the copies within 1 dB of the originals)')
    if args.workers < 1:
        p.error('--workers must be at least 1')
    return args


def _write_json(obj, path):
    atomic_write_text(path, json.dumps(obj, indent=1))


def _one(job):
    src, rel, out, levels, quality, subsampling = job
    return rel, store.write_copies(src, rel, out, levels, quality, subsampling)


@contextlib.contextmanager
def _mapper(workers):
    """imap over `workers` processes, or in this process for one.

    Workers are spawned, not forked: build() may run inside another program (a test
    runner, a notebook), and a forked child inherits that process's Python signal
    handlers (one that ignores SIGTERM leaves Pool.terminate waiting forever) and any
    lock another thread held at that moment.
    """
    if workers == 1:
        yield map
        return
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
        yield lambda fn, jobs: pool.imap(fn, jobs, chunksize=16)


def build(args, log=print):
    """Build (or finish) the store; returns the manifest it wrote."""
    data_path = os.path.abspath(args.data_path)
    if not os.path.isdir(data_path):
        raise SystemExit(f'--data_path {args.data_path} is not a directory: give the training image folder')
    try:
        folder = tv_datasets.ImageFolder(data_path)
    except FileNotFoundError:
        raise SystemExit(f'--data_path {args.data_path} has no class folders with images: '
                         f'expected <root>/<class>/<image>') from None
    rel = [os.path.relpath(p, data_path) for p, _ in folder.samples]
    out = os.path.abspath(args.out)
    if out == data_path or out.startswith(data_path + os.sep):
        raise SystemExit(f'--out {args.out} is inside --data_path: the copies would become training images; '
                         f'choose a directory outside {args.data_path}')
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, 'build.json')):
        raise SystemExit(f'--out {args.out} exists and is not an image store (no build.json): give a new or '
                         f'empty directory')
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f'--out {args.out} cannot be created ({e.strerror}): choose a writable directory') from None
    # Copies already in OUT are kept when their size is right, so they must have been
    # encoded with the same settings: OUT/build.json records them from the first build on.
    settings = {'quality': args.quality, 'subsampling': args.subsampling}
    settings_path = os.path.join(out, 'build.json')
    if os.path.exists(settings_path):
        with open(settings_path, encoding='utf-8') as f:
            before = json.load(f)
        if before != settings:
            raise SystemExit(f'--out {args.out} holds copies built with {before}, not {settings}: build into '
                             f'another --out, or delete {args.out} first')
    else:
        _write_json(settings, settings_path)
    # temporary files of a killed build (one build at a time per --out)
    shutil.rmtree(os.path.join(out, store.TMP_DIR), ignore_errors=True)
    os.makedirs(os.path.join(out, store.TMP_DIR))
    if os.path.exists(os.path.join(out, store.MANIFEST)):
        # the copies may change now: until the new manifest is written, the store is incomplete
        os.remove(os.path.join(out, store.MANIFEST))
    jobs = [(p, r, out, args.levels, args.quality, args.subsampling) for (p, _), r in zip(folder.samples, rel)]
    totals = {'written': 0, 'kept': 0}
    bytes_per_level = {k: 0 for k in args.levels}
    unreadable = []
    t0 = time.time()
    step = max(len(jobs) // 20, 1)
    with _mapper(args.workers) as imap:
        for n, (r, res) in enumerate(imap(_one, jobs), 1):
            if res['error']:
                unreadable.append(r)
                log(f'WARNING: {r}: unreadable, no copies ({res["error"]})')
            totals['written'] += res['written']
            totals['kept'] += res['kept']
            for k, b in res['bytes'].items():
                bytes_per_level[k] += b
            if n % step == 0 or n == len(jobs):
                log(f'{n}/{len(jobs)} images, {time.time() - t0:.1f} s')
    source_bytes = sum(os.path.getsize(p) for p, _ in folder.samples)
    manifest = {
        'format': store.FORMAT, 'version': store.VERSION, 'levels': list(args.levels), 'quality': args.quality,
        'subsampling': args.subsampling, 'reduce': 'box (PIL Image.reduce) of the RGB image',
        'source': data_path, 'images': len(rel), 'digest': store.file_list_digest(rel),
        'unreadable': unreadable, 'source_bytes': source_bytes,
        'bytes': {str(k): v for k, v in bytes_per_level.items()},
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    # each copy was fsynced before its rename; the renames themselves live in the
    # directories, which must be on disk too before the manifest declares the store complete
    folders = set()
    for r in rel:
        d = os.path.dirname(r)
        while d not in folders:  # the folder and its parents, down to the level's root ('')
            folders.add(d)
            d = os.path.dirname(d)
    for k in args.levels:
        for d in sorted(folders, key=len, reverse=True):
            fsync_directory(os.path.join(out, str(k), d))
    fsync_directory(out)
    _write_json(manifest, os.path.join(out, store.MANIFEST))
    shutil.rmtree(os.path.join(out, store.TMP_DIR), ignore_errors=True)
    sizes = ', '.join(f'1/{k}: {100 * v / max(source_bytes, 1):.0f}%' for k, v in bytes_per_level.items())
    log(f'store {out}: {len(rel)} images, {totals["written"]} copies written, {totals["kept"]} kept, '
        f'{len(unreadable)} unreadable; size relative to the originals {sizes}; {time.time() - t0:.1f} s')
    return manifest


def main(argv=None):
    build(parse(argv))


if __name__ == '__main__':
    main()
