"""Training-step images/s per stage size for one model, on whatever device is there.

    python benchmarks/bench_step.py --model resnet50 --curriculum etpp --batch_size 512 --device cuda
    python benchmarks/bench_step.py --model deit_small_patch16_224 --curriculum etpp --batch_size 256 \
        --update_freq 2 --compile true --channels_last true --json step.json
    python benchmarks/bench_step.py --model resnet50 --device cpu --batch_size 16 --bench_steps 3 --threads 1
    python benchmarks/bench_step.py --task mae --model mae_vit_base_patch16 --batch_size 256 --device cuda

Arguments this script does not know go to main.py's parser (--model, --curriculum,
--batch_size, --update_freq, --channels_last, --compile, --data_pipeline, --device, ...).
Each distinct stage size B of the plan is run with that stage's micro-batch and
update_freq through engine.train_one_epoch itself: host-to-device copy of a pinned
batch, the device transform (fast path: uint8 in, normalise and random erasing on the
device; published: a float batch), [Fourier crop for --lowfreq fourier], mixup,
forward and backward under the recipe's AMP, loss scaling, clipping, the optimizer step
and EMA when the recipe has them.  Only loading is left out (bench_data.py measures it):
the same batch is fed every step.  Sizes run in the curriculum's order with the model
adapted between them (adapt_model), as training does.

--amp recipe (default) uses the published flags of the model's recipe (METHOD.md): AMP
and gradient clipping 5.0 for DeiT and Swin, AMP for CSWin, fp32 otherwise; true/false
force AMP on or off.  With --compile true the warm-up epoch of each size compiles, and the
timed epoch must not compile again: torch._dynamo's frame counter is read before and
after it ("recompiles in stage", expected 0).  Per size it also times, on the device,
the fast path's DeviceTransform and the exact Fourier crop (curriculum/lowfreq.py) of a
normalised base-size batch down to B, per batch of the stage.  On a CPU with --threads 1
the rates are per CPU-second of this thread (robust to other jobs on a shared machine).
Replay is left out (the micro-batch is the loader batch).

Reference rows (--reference true, the default): the same model's plain step in the same
run, per size and micro-batch: a fresh timm model, fused AdamW, cross-entropy on hard
labels, autocast bf16 on CUDA (the project's AMP setting on a CPU), channels_last as
given, eager; and on CUDA the same step captured whole in one CUDA graph (torch.cuda.graph
after warm-up on a side stream, as torch's documentation does it).  "vs ref graph" is
this project's rate over the captured reference's (issue 12's target: >= 0.95 with
--cuda_graph true).  The reference has no mixup, EMA, clipping or loss scaling: it is the
floor of what a step of this model costs, not the recipe.
"""
import argparse
import contextlib
import io
import statistics
import time
from types import SimpleNamespace

from common import report, host_info, plan_for, train_args  # first: puts the repository on sys.path

import torch  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

import utils  # noqa: E402
from curriculum.adapt import adapt_model  # noqa: E402
from pipelines.fastpath import DeviceTransform  # noqa: E402
from curriculum.lowfreq import FourierCrop, fourier_crop  # noqa: E402
from engine import TrainStep, train_one_epoch  # noqa: E402
from models import create_model  # noqa: E402
from optim_factory import create_optimizer  # noqa: E402
from runner.args import HelpFormatter  # noqa: E402
from runner.setup import wrap_ddp  # noqa: E402

# Published per-model flags (METHOD.md, "Per-model flags of the reference recipes").
_AMP_CLIP = ('deit', 'swin')
_AMP_ONLY = ('cswin',)


def recipe_amp(model_name):
    """(use_amp, clip_grad) of the model's published recipe."""
    name = model_name.lower()
    if any(k in name for k in _AMP_CLIP):
        return True, 5.0
    if any(k in name for k in _AMP_ONLY):
        return True, None
    return False, None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=HelpFormatter,
                                epilog='Other arguments are main.py\'s training flags (--model, --batch_size, ...): '
                                       'see python main.py --help.')
    p.add_argument('--task', default='supervised', choices=['supervised', 'mae'],
                   help='supervised: the training step of main.py\'s flags; mae: the MAE pre-training step per B '
                        '(benchmarks/bench_mae.py, its own flags: --task mae --help)')
    p.add_argument('--amp', default='recipe', choices=['recipe', 'true', 'false'],
                   help='mixed precision: recipe: as the model\'s published recipe; true/false: forced')
    p.add_argument('--bench_steps', type=int, default=20, help='timed steps per size')
    p.add_argument('--bench_warmup', type=int, default=5, help='untimed steps per size first (compilation)')
    p.add_argument('--bench_sizes', default=None, help='comma-separated sizes (default: every size of the plan)')
    p.add_argument('--bench_batches', default=None,
                   help='comma-separated per-GPU micro-batches, each timed at every size with update_freq 1 (the '
                        'input of scripts/project_scaling.py; default: each stage\'s own batch x update_freq)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--cudnn_benchmark', default='false', choices=['true', 'false'],
                   help='cuDNN autotuning; off by default here (main.py\'s --cudnn_benchmark is true) so that '
                        'numbers stay comparable with the earlier H100 rows, taken without it')
    p.add_argument('--reference', default='true', choices=['true', 'false'],
                   help='also time the plain reference step (eager, and captured in a CUDA graph on CUDA)')
    p.add_argument('--json', default=None, help='also write the results here')
    own, rest = p.parse_known_args(argv)
    own.batches = _positive_list(p, '--bench_batches', own.bench_batches)
    if own.threads:
        torch.set_num_threads(own.threads)
    if '--model' not in rest:
        rest = ['--model', 'resnet50'] + rest
    if '--curriculum' not in rest and '--curriculum_file' not in rest:
        rest = ['--curriculum', 'etpp'] + rest
    args = train_args(rest + ['--num_workers', '0'])
    if own.amp == 'recipe':
        args.use_amp, clip = recipe_amp(args.model)
        if args.clip_grad is None:
            args.clip_grad = clip
    else:
        args.use_amp = own.amp == 'true'
    args.distributed = False
    torch.backends.cudnn.benchmark = own.cudnn_benchmark == 'true'
    return own, rest, args


def _positive_list(parser, flag, text):
    """A comma-separated list of positive integers, or None; a usage error (exit 2) otherwise."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f'{flag} {text}: give positive integers separated by commas, e.g. 64,128,256')
    return sorted(set(values))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_op(fn, device, reps=20):
    """Median milliseconds of fn() on the device."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dynamo_frames():
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters['frames'].get('total', 0))


def make_batch(args, n, size, base, lowfreq, device):
    """A pinned CPU batch as the loader would deliver it for this stage."""
    g = torch.Generator().manual_seed(size)
    in_size = base if lowfreq == 'fourier' and size < base else size
    if args.data_pipeline == 'fast':
        x = torch.randint(0, 256, (n, in_size, in_size, 3), dtype=torch.uint8, generator=g)
    else:
        x = torch.randn((n, 3, in_size, in_size), generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    if device.type == 'cuda':
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


class RepeatLoader:
    """The same batch `steps` times; has a length, as train_one_epoch needs."""

    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def reference_rate(args, size, n, device, steps, warmup, graph):
    """Images/s of the plain step (timm model, fused AdamW, eager or captured whole), or None if not possible."""
    import torch.nn.functional as F
    if graph and device.type != 'cuda':
        return None
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000)
    adapt_model(model, size)
    model.to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    # capturable=True: Adam/AdamW.step() refuses to run under graph capture without it (fused or not)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-5, device=device), fused=True,
                            capturable=graph)
    dtype = torch.bfloat16 if device.type == 'cuda' else (getattr(torch, args.amp_dtype) if args.use_amp else None)
    x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (n,), device=device)

    def step(cache=True):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 3)):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            step(cache=False)
        run = g.replay
    else:
        def run():
            opt.zero_grad(set_to_none=True)
            step()
        for _ in range(warmup):
            run()
    sync(device)
    clock = time.thread_time if device.type == 'cpu' and torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    for _ in range(steps):
        run()
    sync(device)
    rate = steps * n / (clock() - t0)
    del model, opt
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return rate


def _measure_shape(ctx, train_model, size, n, update_freq, lowfreq):
    """One row: the step at B=size with micro-batch n and update_freq, timed through train_one_epoch;
    ctx: what stays the same from shape to shape (measure())."""
    own, args, device, base, device_transform = ctx.own, ctx.args, ctx.device, ctx.base, ctx.device_transform
    batch = make_batch(args, n, size, base, ctx.lowfreq_kind, device)

    step = TrainStep(train_model, ctx.criterion, ctx.optimizer, ctx.loss_scaler, device, update_freq=update_freq,
                     max_norm=args.clip_grad, model_ema=ctx.model_ema, mixup_fn=ctx.mixup_fn, amp_dtype=ctx.amp_dtype,
                     lowfreq=lowfreq, device_transform=device_transform, cuda_graph=args.cuda_graph,
                     compiled=args.compile, weight_decay_varies=False)
    if step.graph_note and step.graph_note not in ctx.notes:
        ctx.notes.add(step.graph_note)
        print(step.graph_note)

    def epoch(steps):
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(step, RepeatLoader(batch, steps), 0,
                            hparams_at=lambda frac: (1e-5, args.weight_decay), print_freq=10 ** 9)
        sync(device)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    f0 = dynamo_frames()
    t0 = time.perf_counter()
    epoch(own.bench_warmup * update_freq)
    warm_s = time.perf_counter() - t0
    f1 = dynamo_frames()
    # On a CPU with one torch thread all the work runs on this thread: its CPU time is
    # the step's cost even on a machine shared with other jobs (as in bench_data.py).
    clock = time.thread_time if device.type == 'cpu' and torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    steps = own.bench_steps * update_freq
    epoch(steps)
    dt = clock() - t0
    f2 = dynamo_frames()
    row = {'size': size, 'batch_size': n, 'update_freq': update_freq, 'img_s': steps * n / dt,
           'ms_per_step': dt / steps * 1e3, 'warmup_s': warm_s, 'compiles_in_warmup': f1 - f0,
           'recompiles_in_stage': f2 - f1,
           # with --cuda_graph: graphs in use for the timed epoch (0: not captured or abandoned,
           # the reason went to the silenced epoch output, so it is kept here too)
           'graphs_captured': len(step._graphs), 'graph_note': step.graph_note}
    if device.type == 'cuda':
        row['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    # device-side pieces, per batch of this stage
    x_dev = batch[0].to(device)
    if device_transform is not None:
        row['device_transform_ms'] = time_op(lambda: device_transform(x_dev), device)
    xb = torch.randn((n, 3, base, base), device=device)
    if args.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    row['h2d_ms'] = time_op(lambda: batch[0].to(device, non_blocking=True), device)
    if size < base:
        row['fourier_crop_ms'] = time_op(lambda: fourier_crop(xb, size), device)
    if own.reference == 'true':
        for name, graph in (('ref_eager_img_s', False), ('ref_graph_img_s', True)):
            try:
                row[name] = reference_rate(args, size, n, device, own.bench_steps, own.bench_warmup, graph)
            except Exception as e:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
                print(f'reference step ({name}) at B={size} failed: {type(e).__name__}: {e}'.splitlines()[0])
                row[name] = None
    return row


def measure(own, args):
    device = torch.device(args.device)
    utils.seed_everything(args.seed)
    plan = plan_for(args)
    base = plan.base_size
    sizes = []
    for s in plan.stages:
        if s.size not in [x.size for x in sizes]:
            sizes.append(s)
    if own.bench_sizes:
        wanted = [int(v) for v in own.bench_sizes.split(',')]
        sizes = [s for s in sizes if s.size in wanted]

    model = create_model(args.model, num_classes=1000, drop_path_rate=args.drop_path)
    adapt_model(model, base)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    optimizer = create_optimizer(args, model)
    amp_dtype = getattr(torch, args.amp_dtype) if args.use_amp else None
    loss_scaler = utils.LossScaler(device.type, enabled=args.use_amp and args.amp_dtype == 'float16')
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=1000)
    criterion = SoftTargetCrossEntropy()
    device_transform = None
    if args.data_pipeline == 'fast':
        device_transform = DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=args.reprob,
                                           re_mode=args.remode, re_count=args.recount,
                                           channels_last=args.channels_last).to(device)
    train_model = wrap_ddp(model, args)
    current = base
    rows = []
    ctx = SimpleNamespace(own=own, args=args, device=device, base=base, lowfreq_kind=plan.lowfreq,
                          criterion=criterion, optimizer=optimizer, loss_scaler=loss_scaler, model_ema=model_ema,
                          mixup_fn=mixup_fn, amp_dtype=amp_dtype, device_transform=device_transform, notes=set())
    for s in sizes:
        if s.size != current:
            if adapt_model(model, s.size, optimizer, model_ema):
                train_model = wrap_ddp(model, args)
            current = s.size
        lowfreq = FourierCrop(s.size) if plan.lowfreq == 'fourier' and s.size < base else None
        # replay off: the micro-batch is the loader batch
        shapes = [(n, 1) for n in own.batches] if own.batches else [(s.batch_size, s.update_freq)]
        for n, update_freq in shapes:
            rows.append(_measure_shape(ctx, train_model, s.size, n, update_freq, lowfreq))
    # each row against the base size's row of the same micro-batch (--bench_batches), else the base stage's
    base_rows = {r['batch_size']: r for r in reversed(rows) if r['size'] == base}
    for r in rows:
        base_row = base_rows.get(r['batch_size']) if own.batches else next(iter(base_rows.values()), None)
        r['theory'] = (base / r['size']) ** 2
        r['ratio'] = r['img_s'] / base_row['img_s'] if base_row else None
        if 'fourier_crop_ms' in r:
            r['fourier_crop_pct_of_step'] = 100 * r['fourier_crop_ms'] / r['ms_per_step']
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {'host': host_info(device), 'device': str(device), 'model': args.model, 'plan': plan.name,
            # what DDP all-reduces every optimizer step (scripts/project_scaling.py): the gradients,
            # in the parameters' dtype
            'n_parameters': sum(p.numel() for p in trainable),
            'grad_bytes': sum(p.numel() * p.element_size() for p in trainable), 'bench_batches': own.batches,
            'base_size': base, 'amp': args.use_amp and args.amp_dtype, 'clip_grad': args.clip_grad,
            'channels_last': args.channels_last, 'compile': args.compile, 'data_pipeline': args.data_pipeline,
            'drop_path': args.drop_path, 'model_ema': args.model_ema, 'cuda_graph': args.cuda_graph,
            'cudnn_benchmark': torch.backends.cudnn.benchmark, 'rows': rows}


def _num(v):
    return f'{v:.1f}' if v else '-'


def _ratio(a, b):
    return f'{a / b:.2f}' if a and b else '-'


def table(res):
    h = res['host']
    where = h.get('gpu') or f'CPU {h["cpu"]} ({h["cpu_count"]} cores, {h.get("threads", "")} threads)'
    lines = [f'Training step, images/s per device: {res["model"]} ({res["plan"]}) on {where}',
             f'amp {res["amp"] or "off"}, clip {res["clip_grad"]}, channels_last {res["channels_last"]}, '
             f'compile {res["compile"]}, cuda_graph {res.get("cuda_graph")}, '
             f'cudnn.benchmark {res.get("cudnn_benchmark")}, input {res["data_pipeline"]}, '
             f'torch {h["torch"]}']
    hdr = (f'{"B":>4} {"batch x freq":>12} {"img/s":>9} {"ratio":>7} {"(base/B)^2":>10} {"ms/step":>8} '
           f'{"devtf ms":>8} {"h2d ms":>7} {"fourier ms":>10} {"% step":>6} {"recompiles":>10} '
           f'{"ref eager":>9} {"ref graph":>9} {"vs ref graph":>12}')
    lines += [hdr, '-' * len(hdr)]
    for r in res['rows']:
        ratio = f'{r["ratio"]:.2f}x' if r['ratio'] else '-'
        four = f'{r["fourier_crop_ms"]:.2f}' if 'fourier_crop_ms' in r else '-'
        pct = f'{r["fourier_crop_pct_of_step"]:.1f}' if 'fourier_crop_pct_of_step' in r else '-'
        devtf = f'{r["device_transform_ms"]:.2f}' if 'device_transform_ms' in r else '-'
        rec = str(r['recompiles_in_stage']) if res['compile'] else '-'
        bxf = f'{r["batch_size"]} x {r["update_freq"]}'
        lines.append(f'{r["size"]:>4} {bxf:>12} {r["img_s"]:>9.1f} '
                     f'{ratio:>7} {r["theory"]:>9.2f}x {r["ms_per_step"]:>8.1f} {devtf:>8} {r["h2d_ms"]:>7.2f} '
                     f'{four:>10} {pct:>6} {rec:>10} {_num(r.get("ref_eager_img_s")):>9} '
                     f'{_num(r.get("ref_graph_img_s")):>9} '
                     f'{_ratio(r["img_s"], r.get("ref_graph_img_s")):>12}')
    if res.get('cuda_graph'):
        lines.append('cuda graphs captured: ' + ', '.join(f'B={r["size"]}: {r.get("graphs_captured")}'
                                                          for r in res['rows']))
    if res['compile']:
        lines.append('compile: ' + ', '.join(f'B={r["size"]}: {r["compiles_in_warmup"]} frame(s) compiled in '
                                             f'{r["warmup_s"]:.0f} s of warm-up' for r in res['rows']))
    return '\n'.join(lines)


def main(argv=None):
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument('--task', default='supervised')
    if task.parse_known_args(argv)[0].task == 'mae':
        import bench_mae  # a path of its own: MAE's model computes its own loss, with none of main.py's flags
        return bench_mae.main(argv)
    own, rest, args = parse(argv)
    res = measure(own, args)
    res['host']['threads'] = torch.get_num_threads()
    res['argv'] = rest
    return report(res, table, own.json)


if __name__ == '__main__':
    main()
