"""Data-pipeline images/s per loader worker, for every stage of a curriculum, per implementation.

    python benchmarks/bench_data.py --model resnet50 --curriculum etpp
    python benchmarks/bench_data.py --data_path /path/to/imagenet/train --model deit_small_patch16_224 \
        --curriculum etpp --pipelines published,fast,fast-nodraft --json data.json

Arguments this script does not know go to main.py's parser, and the measured loader is
the one training builds (datasets.build_train_loader with that Namespace and the plan of
curriculum.build_plan), run without workers so this process does a worker's whole job:
read the file, decode, crop, augment, convert, collate.  One torch thread, as in a
DataLoader worker (torch sets one thread in its workers): the rate is per worker.
Each measurement is one data epoch of the folder at that stage; implementations are
interleaved round by round (round r runs each stage's r-th epoch) and averaged.  Rates
are per CPU-second of the worker's thread (wall-clock rates are in the JSON), so load
from other processes on a shared machine changes them little.  Ratios are against the plain 224 pipeline of the baseline
(no curriculum, the --aa policy as given, published order).
"""
import argparse
import atexit
import contextlib
import shutil
import statistics
import tempfile
import time

from common import report, DEFAULT_DATA, host_info, plan_for, train_args  # first: puts the repository on sys.path

import torch  # noqa: E402
from torchvision import datasets as tv_datasets  # noqa: E402

import datasets  # noqa: E402
from scripts import build_image_store  # noqa: E402

PIPELINES = ('published', 'fast', 'fast-store', 'fast-nodraft', 'decode')


class DecodeOnly:
    """The fast path's file read and (reduced-size) decode alone: a ceiling for any order."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, img):
        img, _ = self.crop.decode(img, self.crop.get_params(img))
        img.load()
        return torch.zeros(1)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog='Other arguments are main.py\'s training flags (--model, --curriculum, '
                                       '...): see python main.py --help.')
    p.add_argument('--data_path', default=DEFAULT_DATA, help='an ImageFolder tree (class folders of images)')
    p.add_argument('--rounds', type=int, default=3, help='measurement rounds, one data epoch each (averaged)')
    p.add_argument('--batch', type=int, default=32, help='loader batch (collation) in the measurement')
    p.add_argument('--pipelines', default='published,fast,fast-store,decode',
                   help=f'comma-separated, from {",".join(PIPELINES)}; fast-store: the fast path reading '
                        f'the reduced copies of --image_store (built into a temporary directory when not '
                        f'given); decode: only the fast path\'s file read and reduced-size decode of the '
                        f'originals, the ceiling of any order without a store')
    p.add_argument('--image_store', default=None,
                   help='the store fast-store reads (scripts/build_image_store.py); default: built for the run')
    p.add_argument('--json', default=None, help='also write the results here')
    own, rest = p.parse_known_args(argv)
    for name in own.pipelines.split(','):
        if name not in PIPELINES:
            p.error(f'unknown pipeline {name}: choose from {", ".join(PIPELINES)}')
    if '--model' not in rest:
        rest = ['--model', 'resnet50'] + rest
    if '--curriculum' not in rest and '--curriculum_file' not in rest:
        rest = ['--curriculum', 'etpp'] + rest
    return own, rest


@contextlib.contextmanager
def variant(pipeline):
    """Build the loader's stage transforms as `pipeline` needs (datasets.train_transform patched)."""
    orig = datasets.train_transform

    def patched(*a, **kw):
        t = orig(*a, **kw)
        if pipeline == 'fast-nodraft':
            t.transforms[0].draft = False
        elif pipeline == 'decode':
            t = DecodeOnly(t.transforms[0])
        return t

    datasets.train_transform = patched
    try:
        yield
    finally:
        datasets.train_transform = orig


def training_loader(argv, folder, pipeline, batch, image_store=None):
    """(plan, loader, batch_sampler) exactly as main.py builds them for training, in-process."""
    data_pipeline = 'published' if pipeline == 'published' else 'fast'
    if pipeline == 'fast-store':
        argv = argv + ['--image_store', image_store]
    args = train_args(argv + ['--data_pipeline', data_pipeline, '--num_workers', '0', '--pin_mem', 'false',
                              '--batch_size', str(batch), '--update_freq', '1', '--replay_times', '1',
                              '--replay_preset', 'false'])
    plan = plan_for(args)
    with variant(pipeline):
        loader, batch_sampler = datasets.build_train_loader(args, folder, plan, 0, 1)
    return plan, loader, batch_sampler


def run_once(loader, batch_sampler, epoch):
    """(images per CPU second, images per wall second) for one data epoch of the loader.

    The loader has no workers, so this process does a worker's whole job: read, decode,
    crop, augment, convert, collate.  CPU time is the thread's own (user + system, file
    reads included): on a machine shared with other jobs it is the work a dedicated core
    would do, while wall time also counts the waits for a core.
    """
    batch_sampler.set_epoch(epoch)
    n = 0
    c0, t0 = time.thread_time(), time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.thread_time() - c0), n / (time.perf_counter() - t0)


def measure(own, rest):
    torch.set_num_threads(1)
    folder = tv_datasets.ImageFolder(own.data_path)
    if len(folder) < own.batch:
        raise SystemExit(f'{own.data_path} holds {len(folder)} images: at least --batch {own.batch} needed')
    for path, _ in folder.samples:  # warm the page cache: every measured read comes from memory
        with open(path, 'rb') as f:
            f.read()

    names = own.pipelines.split(',')
    image_store = own.image_store
    if 'fast-store' in names and image_store is None:
        image_store = tempfile.mkdtemp(prefix='image-store-')
        atexit.register(shutil.rmtree, image_store, True)
        build_image_store.main(['--data_path', own.data_path, '--out', image_store])
    configs = {}
    none_argv = rest + ['--curriculum', 'none', '--input_size', str(train_args(rest).base_input_size)]
    _, loader, bs = training_loader(none_argv, folder, 'published', own.batch)
    configs['plain224'] = (loader, bs, 0, 300)
    plan = None
    for name in names:
        plan, loader, bs = training_loader(rest, folder, name, own.batch, image_store)
        for s in plan.stages:
            configs[(name, s.index)] = (loader, bs, s.start_epoch, s.epochs)
    run_once(*configs['plain224'][:3])  # lazy imports, allocator
    rates = {k: [] for k in configs}
    walls = {k: [] for k in configs}
    for r in range(own.rounds):
        for k, (loader, bs, start, n_epochs) in configs.items():
            # round r runs the stage's r-th epoch: other crops, so every column averages
            # over the same number of random crop sizes (a cost that varies per crop)
            cpu, wall = run_once(loader, bs, start + r % max(n_epochs, 1))
            rates[k].append(cpu)
            walls[k].append(wall)

    def mean_rate(v):  # images over total time, with every round the same number of images
        return len(v) / sum(1 / x for x in v)

    best = {k: mean_rate(v) for k, v in rates.items()}
    ref = best['plain224']
    stages = []
    for s in plan.stages:
        row = {'index': s.index, 'size': s.size, 'magnitude': s.magnitude, 'needed': (plan.base_size / s.size) ** 2}
        for name in names:
            row[name] = best[(name, s.index)]
            row[f'{name}_median'] = statistics.median(rates[(name, s.index)])
            row[f'{name}_wall'] = mean_rate(walls[(name, s.index)])
            row[f'{name}_ratio'] = best[(name, s.index)] / ref
        stages.append(row)
    return {
        'host': host_info(), 'data_path': own.data_path, 'images': len(folder) // own.batch * own.batch,
        'rounds': own.rounds, 'argv': rest, 'plan': plan.name, 'base_size': plan.base_size,
        'lowfreq': plan.lowfreq, 'pipelines': names, 'plain224': ref,
        'plain224_median': statistics.median(rates['plain224']), 'plain224_wall': mean_rate(walls['plain224']),
        'stages': stages,
    }


def table(res):
    names = res['pipelines']
    lines = [f'Data pipeline, images per CPU-second of one worker (1 process, 1 torch thread): {res["plan"]}, '
             f'{" ".join(res["argv"])}',
             f'host: {res["host"]["cpu"]} ({res["host"]["cpu_count"]} cores), {res["images"]} images x '
             f'{res["rounds"]} rounds (averaged) from {res["data_path"]}',
             f'reference: plain {res["base_size"]} pipeline of the baseline = {res["plain224"]:.1f} img/s '
             f'(wall clock: {res["plain224_wall"]:.1f} img/s)']
    hdr = f'{"stage":>5} {"B":>4} {"m":>3} ' + ' '.join(f'{n + " img/s":>18} {"ratio":>6}' for n in names) + \
        f' {"GPU gain (base/B)^2":>20}'
    lines += [hdr, '-' * len(hdr)]
    for r in res['stages']:
        m = '-' if r['magnitude'] is None else str(r['magnitude'])
        cells = ' '.join(f'{r[n]:>18.1f} {r[n + "_ratio"]:>5.2f}x' for n in names)
        lines.append(f'{r["index"]:>5} {r["size"]:>4} {m:>3} {cells} {r["needed"]:>19.2f}x')
    lines.append('-' * len(hdr))
    for b in sorted({r['size'] for r in res['stages']}):
        rows = [r for r in res['stages'] if r['size'] == b]
        cells = ' '.join(f'{n}: {statistics.mean(r[n + "_ratio"] for r in rows):.2f}x' for n in names)
        lines.append(f'mean ratio at B={b}: {cells} (GPU gain {rows[0]["needed"]:.2f}x)')
    return '\n'.join(lines)


def main(argv=None):
    own, rest = parse(argv)
    res = measure(own, rest)
    return report(res, table, own.json)


if __name__ == '__main__':
    main()
