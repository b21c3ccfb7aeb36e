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
import json
import contextlib
import os
import shutil
import statistics
import tempfile
import time

from common import report, DEFAULT_DATA, host_info, plan_for, train_args  # first: puts the repository on sys.path

import torch  # noqa: E402
from torchvision import datasets as tv_datasets  # noqa: E402

from pipelines import datasets  # noqa: E402
from scripts import build_image_store  # noqa: E402

PIPELINES = ('published', 'fast', 'fast-store', 'fast-nodraft', 'decode', 'gpu', 'gpu-store')


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
                        f'originals, the ceiling of any order without a store; gpu (gpu-store): the worker '
                        f'half of --data_pipeline gpu (read the bytes, draw the parameters), plus the device '
                        f'half per batch at each B on --device (CPU tensors when it is cpu, labelled so)')
    p.add_argument('--image_store', default=None,
                   help='the store fast-store reads (scripts/build_image_store.py); default: built for the run')
    p.add_argument('--json', default=None, help='also write the results here')
    p.add_argument('--device_batch', type=int, default=128,
                   help='gpu pipelines: images per batch in the device-side measurement')
    p.add_argument('--device_batches', type=int, default=3,
                   help='gpu pipelines: batches timed per stage in the device-side measurement (after one warm-up)')
    p.add_argument('--step_json', default=None,
                   help='gpu pipelines: a benchmarks/bench_step.py --json result; the device half is then shown '
                        'as a share of the training step at each B (its images/s, scaled to the same batch)')
    own, rest = p.parse_known_args(argv)
    if not os.path.isdir(own.data_path):
        p.error(f'--data_path {own.data_path} is not a folder: pass an ImageFolder tree (class folders of images)')
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
    data_pipeline = 'published' if pipeline == 'published' else 'gpu' if pipeline.startswith('gpu') else 'fast'
    if pipeline in ('fast-store', 'gpu-store'):
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
    for _, y in loader:
        n += len(y)
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
    if ('fast-store' in names or 'gpu-store' in names) and image_store is None:
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
    device_side = None
    gpu_names = [n for n in names if n.startswith('gpu')]
    if gpu_names:
        device_side = measure_device(own, rest, folder, gpu_names[-1], image_store)
        if own.step_json:
            with open(own.step_json, encoding='utf-8') as f:
                step = {r['size']: r['img_s'] for r in json.load(f)['rows']}
            device_side['step_json'] = own.step_json
            for r in device_side['stages']:
                if r['size'] in step:
                    r['step_ms'] = 1e3 * r['batch'] / step[r['size']]
                    r['device_pct_of_step'] = 100 * r['ms_per_batch'] / r['step_ms']
                    for order in ORDERS:
                        ms = r.get(f'ms_per_batch_augment_at_{order}')
                        r[f'device_pct_of_step_augment_at_{order}'] = None if ms is None else 100 * ms / r['step_ms']
    return {
        'device_side': device_side,
        'host': host_info(), 'data_path': own.data_path, 'images': len(folder) // own.batch * own.batch,
        'rounds': own.rounds, 'argv': rest, 'plan': plan.name, 'base_size': plan.base_size,
        'lowfreq': plan.lowfreq, 'pipelines': names, 'plain224': ref,
        'plain224_median': statistics.median(rates['plain224']), 'plain224_wall': mean_rate(walls['plain224']),
        'stages': stages,
    }


ORDERS = ('base', 'stage')  # --gpu_augment_at: the published order (the default), the order at B


def measure_device(own, rest, folder, pipeline, image_store):
    """The device half of --data_pipeline gpu per batch at each stage's B (ms), and the memory it adds.

    Batches come from the worker half (gpu or gpu-store); each is timed through
    datasets.build_device_transform's GpuDataTransform on the training --device (CUDA: with a
    synchronisation before and after; CPU: CPU tensors, one thread, labelled so), next to
    its crop+resize alone done as it is (batched resampling matmuls) and as a per-sample
    loop of torch's anti-aliased interpolate (the alternative considered).  Both orders of
    --gpu_augment_at are timed: ms_per_batch_augment_at_base (crop and RandAugment at the
    base size, then the Lanczos low-pass to B: the default, so also ms_per_batch) and
    ms_per_batch_augment_at_stage (crop to B, RandAugment at B); at the base size they do
    the same work.
    """
    import torch.nn.functional as F
    from pipelines.gpudata import G_BH, G_BW, G_LEFT, G_TOP
    batch = min(own.device_batch, len(folder))
    args = train_args(rest + ['--data_pipeline', 'gpu'])
    device = torch.device(args.device if (not args.device.startswith('cuda') or torch.cuda.is_available())
                          else 'cpu')
    cuda = device.type == 'cuda'

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t

    def per_sample_interpolate(imgs, geom, size):
        outs = []
        for img, g in zip(imgs, geom.tolist()):
            t, l, h, w = (int(round(v)) for v in (g[G_TOP], g[G_LEFT], g[G_BH], g[G_BW]))
            crop = img[None, :, t:t + max(h, 1), l:l + max(w, 1)].float()
            outs.append(F.interpolate(crop, size=(size, size), mode='bicubic', antialias=True, align_corners=False))
        return torch.cat(outs).round_().clamp_(0, 255).to(torch.uint8)

    def stage_batches(loader, bs, epoch):
        # the stage's epoch over and over: a folder of a few hundred images holds one batch of
        # --device_batch 256, and the first batch is only the warm-up
        while True:
            bs.set_epoch(epoch)
            got = False
            for b in loader:
                got = True
                yield b
            if not got:
                return

    def time_order(order):
        plan, loader, bs = training_loader(rest + ['--gpu_augment_at', order], folder, pipeline, batch,
                                           image_store)
        dt = datasets.build_device_transform(args, device, dataset=loader.dataset)
        rows = {}
        for s in plan.stages:
            it = stage_batches(loader, bs, s.start_epoch)
            totals, resample, loop, mem = [], [], [], []
            for k in range(own.device_batches + 1):
                try:
                    x, _ = next(it)
                except StopIteration:
                    break
                if cuda:
                    torch.cuda.synchronize(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                xd = x.to(device, non_blocking=True)
                _, t_all = timed(lambda: dt(xd))
                if cuda:
                    mem.append(torch.cuda.max_memory_allocated(device) - base)
                if order == ORDERS[0]:
                    imgs = dt.decode(xd, list(range(len(x))), device)
                    _, t_res = timed(lambda: dt.crop_resize(imgs, x.geom, x.out_size))
                    _, t_loop = timed(lambda: per_sample_interpolate(imgs, x.geom, x.out_size))
                    del imgs
                else:
                    t_res = t_loop = float('nan')
                if k:  # the first batch warms up the decoder, kernels and allocator
                    totals.append(t_all), resample.append(t_res), loop.append(t_loop)
            if totals:
                rows[s.index] = (s, len(x), x.work_size, totals, resample, loop, mem)
        return rows

    timings = {order: time_order(order) for order in ORDERS}
    rows = []
    for index, (s, n, work, totals, resample, loop, mem) in timings[ORDERS[0]].items():
        row = {'index': index, 'size': s.size, 'batch': n, 'augmented_at': work,
               'ms_per_batch': 1e3 * statistics.mean(totals),
               'images_per_s': n / statistics.mean(totals),
               'resample_ms': 1e3 * statistics.mean(resample),
               'per_sample_interpolate_ms': 1e3 * statistics.mean(loop),
               'memory_added_mib': max(mem) / 2 ** 20 if mem else None}
        for order in ORDERS:
            other = timings[order].get(index)
            row[f'ms_per_batch_augment_at_{order}'] = 1e3 * statistics.mean(other[3]) if other else None
            if other and other[6]:
                row[f'memory_added_mib_augment_at_{order}'] = max(other[6]) / 2 ** 20
        stage_ms = row['ms_per_batch_augment_at_stage']
        row['augment_at_base_over_stage'] = row['ms_per_batch'] / stage_ms if stage_ms else None
        rows.append(row)
    return {'device': str(device), 'gpu': torch.cuda.get_device_name(device) if cuda else None,
            'threads': torch.get_num_threads(), 'pipeline': pipeline, 'stages': rows}


def device_table(d):
    where = f'{d["device"]} ({d["gpu"]})' if d['gpu'] else f'CPU tensors, {d["threads"]} thread(s) -- not a GPU number'
    lines = [f'Device half of --data_pipeline gpu ({d["pipeline"]}) on {where}: per batch, after one warm-up; '
             f'ms/batch in the default order (--gpu_augment_at base: augmented at the base size, Lanczos to B), '
             f'at-B: the same batch augmented at B (--gpu_augment_at stage)',
             f'{"stage":>5} {"B":>4} {"batch":>5} {"ms/batch":>9} {"at-B ms":>8} {"ratio":>6} {"img/s":>8} '
             f'{"crop+resize ms":>15} {"per-sample interpolate ms":>26} {"memory added MiB":>17}']
    for r in d['stages']:
        mem = '-' if r['memory_added_mib'] is None else f'{r["memory_added_mib"]:.0f}'
        step = f'  step {r["step_ms"]:.1f} ms: {r["device_pct_of_step"]:.0f}%' if 'step_ms' in r else ''
        at_b = r.get('ms_per_batch_augment_at_stage')
        ratio = r.get('augment_at_base_over_stage')
        lines.append(f'{r["index"]:>5} {r["size"]:>4} {r["batch"]:>5} {r["ms_per_batch"]:>9.1f} '
                     f'{"-" if at_b is None else f"{at_b:.1f}":>8} {"-" if ratio is None else f"{ratio:.2f}x":>6} '
                     f'{r["images_per_s"]:>8.0f} {r["resample_ms"]:>15.1f} {r["per_sample_interpolate_ms"]:>26.1f} '
                     f'{mem:>17}{step}')
    if d.get('step_json'):
        lines.append(f'step: the training step of {d["step_json"]} for the same number of images (same device '
                     f'only if that file says so)')
    return lines


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
    if res.get('device_side'):
        lines += [''] + device_table(res['device_side'])
    return '\n'.join(lines)


def main(argv=None):
    own, rest = parse(argv)
    res = measure(own, rest)
    return report(res, table, own.json)


if __name__ == '__main__':
    main()
