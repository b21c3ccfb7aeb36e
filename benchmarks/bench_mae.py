"""MAE pre-training step images/s per size B of the MAE ET++ plan (bench_step.py --task mae).

    python benchmarks/bench_step.py --task mae --model mae_vit_base_patch16 --batch_size 256 --device cuda
    python benchmarks/bench_step.py --task mae --model mae_vit_tiny_patch16 --base_input_size 64 \
        --batch_size 8 --device cpu --bench_steps 2 --threads 1

One optimizer step: per micro-batch the model's forward (target from the batch, random masking from a seeded device
generator, encoder on the kept patches, decoder on all, loss on the masked ones), backward;
then AdamW (betas 0.9/0.95, weight decay 0.05; fused on CUDA) and zeroed gradients, as
MAE's recipe.  The micro-batch and update_freq per B are the plan's (--stage_batch auto
grows the micro-batch at low B, as in training).  Mixed precision: bf16 autocast on CUDA (--amp true, the default there;
MAE's code uses fp16 with loss scaling, bf16 needs none), fp32 on a CPU.  Loading is left
out: the same random batch (already on the device) is fed every step.  The sizes are the
distinct B (with their first stage's micro-batch) of the plan `--curriculum etpp` builds for the model (curriculum/presets.py,
equal-compute segments under the model's own compute model), run in the plan's order;
the MAE model takes any multiple of its patch size, so nothing is adapted between them.

Per B: images/s, its ratio to the base size's, and the ratios the compute model
(models/mae.py: encoder on the visible tokens, decoder on all, attention included) and
(base/B)^2 predict; on CUDA the peak memory and the achieved TFLOP/s (counted FLOPs of the
step x images/s).  On a CPU with --threads 1 rates are per CPU-second of this thread.
"""
import argparse
import statistics
import time

from common import host_info, report  # first: puts the repository on sys.path

import torch  # noqa: E402

import utils  # noqa: E402
from curriculum import build_plan  # noqa: E402
from curriculum.adapt import size_multiple  # noqa: E402
from models import create_model  # noqa: E402
from models.mae import MAE_CONFIGS, check_mae_size, check_mae_target, check_mask_ratio  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--task', default='mae', choices=['mae'], help='what bench_step.py measures (here: mae)')
    p.add_argument('--model', default='mae_vit_base_patch16', choices=sorted(MAE_CONFIGS), help='MAE model')
    p.add_argument('--target', default='pixel', choices=['pixel', 'hog'], help='reconstruction target')
    p.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches masked')
    p.add_argument('--norm_pix_loss', default=True, type=utils.str2bool, help='per-patch normalised pixel target')
    p.add_argument('--batch_size', default=64, type=int, help='micro-batch at the base size (per device)')
    p.add_argument('--update_freq', default=1, type=int, help='micro-batches per optimizer step at the base size')
    p.add_argument('--stage_batch', default='published', choices=['published', 'auto'],
                   help='auto: micro-batch grown at low B as the plan does (main.py --stage_batch auto), '
                        'with update_freq shrunk; published: the base micro-batch throughout')
    p.add_argument('--max_micro_batch', default=0, type=int, help='cap of --stage_batch auto (0: none)')
    p.add_argument('--base_input_size', default=224, type=int, help='the plan\'s base size')
    p.add_argument('--epochs', default=400, type=int, help='the plan\'s budget (only its sizes matter here)')
    p.add_argument('--bench_sizes', default=None, help='comma-separated sizes (default: every size of the plan)')
    p.add_argument('--bench_steps', default=20, type=int, help='timed steps per size')
    p.add_argument('--bench_warmup', default=5, type=int, help='untimed steps per size first')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    p.add_argument('--amp', default=None, type=utils.str2bool,
                   help='bf16 autocast (default: on for CUDA, off on a CPU)')
    p.add_argument('--threads', default=None, type=int, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--seed', default=0, type=int, help='seed of the weights, the batch and the masks')
    p.add_argument('--json', default=None, help='also write the results here')
    return p


def parse(argv=None):
    args = get_parser().parse_args(argv)
    try:
        check_mask_ratio(args.mask_ratio)
        cfg = MAE_CONFIGS[args.model]
        check_mae_target(args.target, cfg.patch_size, args.model)
        check_mae_size(args.base_input_size, cfg.patch_size, '--base_input_size')
    except utils.UserError as e:
        get_parser().exit(2, f'bench_step.py --task mae: {e}\n')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp is None:
        args.amp = args.device.startswith('cuda')
    return args


def plan_sizes(args, model):
    """The distinct B of the MAE ET++ plan for these arguments, in the plan's order."""
    plan_args = argparse.Namespace(model=args.model, curriculum='etpp', curriculum_file=None, epochs=args.epochs,
                                   base_input_size=args.base_input_size, input_size=args.base_input_size,
                                   batch_size=args.batch_size, update_freq=args.update_freq, warmup_epochs=0,
                                   stage_batch=args.stage_batch, max_micro_batch=args.max_micro_batch)
    plan = build_plan(plan_args, size_multiple(model), cost=model.train_flops)
    stages = {}
    for s in plan.stages:
        stages.setdefault(s.size, (s.batch_size, s.update_freq))
    if args.bench_sizes:
        wanted = [int(v) for v in args.bench_sizes.split(',')]
        for b in wanted:
            check_mae_size(b, model.patch_size, '--bench_sizes entry')
        stages = {b: stages.get(b, (args.batch_size, args.update_freq)) for b in wanted}
    return plan, stages


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(args.model, target=args.target, mask_ratio=args.mask_ratio,
                         norm_pix_loss=args.norm_pix_loss).to(device)
    plan, stages = plan_sizes(args, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == 'cuda')
    gen = torch.Generator(device=device).manual_seed(args.seed)
    dtype = torch.bfloat16 if args.amp else None
    clock = time.thread_time if device.type == 'cpu' and torch.get_num_threads() == 1 else time.perf_counter
    rows = []
    for size, (n, update_freq) in stages.items():
        x = torch.randn(n, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(size))

        def step():
            for _ in range(update_freq):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss, _, _ = model(x, generator=gen)
                (loss / update_freq).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.bench_warmup):
            step()
        _sync(device)
        times = []
        t_all = clock()
        for _ in range(args.bench_steps):
            t0 = clock()
            step()
            _sync(device)
            times.append(clock() - t0)
        total = clock() - t_all
        row = {'size': size, 'batch_size': n, 'update_freq': update_freq,
               'img_s': args.bench_steps * n * update_freq / total,
               'ms_per_step': statistics.median(times) * 1e3, 'train_gflop_per_img': model.train_flops(size) / 1e9}
        if device.type == 'cuda':
            row['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            row['tflop_s'] = row['img_s'] * model.train_flops(size) / 1e12
        rows.append(row)
    base = args.base_input_size
    base_row = next((r for r in rows if r['size'] == base), None)
    for r in rows:
        r['ratio'] = r['img_s'] / base_row['img_s'] if base_row else None
        r['compute_model'] = model.train_flops(base) / model.train_flops(r['size'])
        r['area'] = (base / r['size']) ** 2
    return {'host': host_info(device), 'device': str(device), 'task': 'mae', 'model': args.model,
            'target': args.target, 'mask_ratio': args.mask_ratio, 'plan': plan.name, 'base_size': base,
            'amp': 'bfloat16' if args.amp else False, 'rows': rows}


def table(res):
    h = res['host']
    where = h.get('gpu') or f'CPU {h["cpu"]} ({h["cpu_count"]} cores, {h.get("threads", "")} threads)'
    lines = [f'MAE pre-training step, images/s per device: {res["model"]} (target {res["target"]}, mask ratio '
             f'{res["mask_ratio"]}, {res["plan"]}) on {where}',
             f'forward + backward + AdamW, amp {res["amp"] or "off"}, torch {h["torch"]}']
    hdr = (f'{"B":>4} {"batch x freq":>12} {"img/s":>9} {"ratio":>7} {"model":>7} {"(base/B)^2":>10} {"ms/step":>8} '
           f'{"GFLOP/img":>9} {"TFLOP/s":>8} {"peak GB":>8}')
    lines += [hdr, '-' * len(hdr)]
    for r in res['rows']:
        ratio = f'{r["ratio"]:.2f}x' if r['ratio'] else '-'
        tf = f'{r["tflop_s"]:.1f}' if 'tflop_s' in r else '-'
        mem = f'{r["peak_mem_gb"]:.1f}' if 'peak_mem_gb' in r else '-'
        bxf = f'{r["batch_size"]} x {r["update_freq"]}'
        lines.append(f'{r["size"]:>4} {bxf:>12} {r["img_s"]:>9.1f} {ratio:>7} {r["compute_model"]:>6.2f}x '
                     f'{r["area"]:>9.2f}x {r["ms_per_step"]:>8.1f} {r["train_gflop_per_img"]:>9.2f} {tf:>8} {mem:>8}')
    lines.append('ratio: images/s over the base size\'s; model: what the MAE compute model predicts; '
                 '(base/B)^2: the papers\' measure')
    return '\n'.join(lines)


def main(argv=None):
    args = parse(argv)
    res = measure(args)
    res['host']['threads'] = torch.get_num_threads()
    return report(res, table, args.json)


if __name__ == '__main__':
    main()
