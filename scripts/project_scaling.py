"""Project a curriculum's wall-clock time and speedup on 1 to 64 GPUs, --stage_batch published and large.

    python benchmarks/bench_step.py --model resnet50 --curriculum etpp --amp true --channels_last true \
        --bench_batches 64,128,256,512 --reference false --device cuda --json r50_batches.json
    python scripts/project_scaling.py --model resnet50 --curriculum etpp --epochs 200 --batch_size 256 \
        --step_json r50_batches.json --plot r50_scaling.png
    python scripts/project_scaling.py --model CSWin_96_24322_base_224 --curriculum etpp --epochs 45 \
        --baseline_epochs 90 --batch_size 128 --step_model 3.3,20      # modelled step times, no GPU

For each GPU count N the global batch stays --global_batch_size (default 4096, the
published recipes'), split as main.py splits it: a per-GPU micro-batch of at most
--batch_size, update_freq for the rest.  The plan (published, and --stage_batch large) is
built as main.py builds it for N processes.  A stage's optimizer step on one GPU takes
update_freq x the step time of its micro-batch at its B (measured by bench_step.py on one
GPU, --step_json; interpolated linearly in the micro-batch between measured ones; or
modelled, --step_model), plus the gradient all-reduce: a ring, 2(N-1)/N x gradient bytes
/ bandwidth + a latency per step, the bandwidth within a node on up to --gpus_per_node
GPUs and of the link between nodes beyond; --overlap of it hidden behind the backward of
the step's last micro-batch (taken as 2/3 of the micro-batch's step).  Ignored: data
loading (bench_data.py, bench_schedule.py), evaluation and checkpoints, stragglers, DDP's
bucketing beyond the one latency, and the optimizer step's own share of an accumulated
step (update_freq x the measured micro-step counts it update_freq times: a bound above).
Speedup: the baseline (--baseline_epochs at the base size, or main.py's comparison) on the
same N GPUs over the plan, both projected the same way.  TRAINING.md, "What a cluster will get".
"""
import copy
import io
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main as train_main  # noqa: E402
import utils  # noqa: E402
from curriculum.plan import Plan, Stage  # noqa: E402
from runner.stage import baseline_epochs, checked_plan, model_structure  # noqa: E402
from utils import UserError  # noqa: E402

SETTINGS = ('published', 'large')
# training images per data epoch: ImageNet-1K's train split (the speedups are ratios, so
# they hardly depend on it; the hours do)
IMAGENET_TRAIN = 1281167
# the backward's share of a micro-batch's step (about twice the forward): what DDP can hide
# the all-reduce behind
BACKWARD_SHARE = 2 / 3
# EfficientTrain++ (TPAMI 2024), Section 5.3, Table 13: CSWin-B, ImageNet-22K pre-training with
# EfficientTrain++ at 2.0x and 3.0x less compute, measured wall-clock speedup on 16 and 64 GPUs
# without and with its "early large batch" (METHOD.md)
PAPER_TABLE13 = {
    2.0: {'published': {16: 2.0, 64: 1.4}, 'large': {16: 2.0, 64: 2.0}},
    3.0: {'published': {16: 3.0, 64: 2.1}, 'large': {16: 3.0, 64: 2.9}},
}
PAPER_MODEL = 'CSWin_96_24322_base_224'


def get_args_parser():
    p = train_main.script_parser('project_scaling.py', __doc__.split('\n\n')[0],
                                 epilog='main.py\'s flags describe the run (--model, --curriculum, --epochs, '
                                        '--batch_size: the most a GPU holds at the base size, --global_batch_size '
                                        '(default here 4096), --max_global_batch_factor, --max_micro_batch, replay).')
    p.set_defaults(global_batch_size=4096)
    g = p.add_argument_group('projection')
    g.add_argument('--step_json', nargs='+', default=None, metavar='FILE',
                   help='bench_step.py --json files of this --model (one GPU; several sizes and micro-batches, '
                        'e.g. --bench_batches 64,128,256,512)')
    g.add_argument('--step_model', default=None, metavar='MS_PER_IMAGE,FIXED_MS',
                   help='instead of measurements: a micro-batch step takes FIXED_MS + images x MS_PER_IMAGE x '
                        '(B/base)^2 milliseconds (a model, said so in the output)')
    g.add_argument('--gpus', default='1,8,16,32,64', help='GPU counts to project, comma-separated')
    g.add_argument('--gpus_per_node', default=8, type=int, help='GPUs joined by the node\'s own interconnect')
    g.add_argument('--nvlink_gbs', default=200.0, type=float,
                   help='all-reduce bus bandwidth within a node, GB/s (default 200: an assumption for 8-GPU '
                        'NVLink/NVSwitch nodes)')
    g.add_argument('--ib_gbps', default=200.0, type=float,
                   help='bandwidth of the link joining a node to the others, Gb/s (default 200: one 200 Gb/s '
                        'InfiniBand HDR link per node, 25 GB/s)')
    g.add_argument('--latency_ms', default=0.05, type=float,
                   help='fixed cost of a step\'s all-reduce within a node, ms (an assumption)')
    g.add_argument('--ib_latency_ms', default=0.5, type=float,
                   help='fixed cost of a step\'s all-reduce across nodes, ms (an assumption)')
    g.add_argument('--overlap', default=0.0, type=float,
                   help='share of the all-reduce hidden behind the backward, 0 (none) to 1 (all of it that the '
                        'backward of the last micro-batch can cover)')
    g.add_argument('--grad_bytes', default=None, type=int,
                   help='bytes all-reduced per optimizer step (default: the model\'s trainable parameters x 4, '
                        'fp32 gradients, which DDP reduces whatever the autocast dtype)')
    g.add_argument('--train_images', default=IMAGENET_TRAIN, type=int,
                   help='training images per data epoch (default: ImageNet-1K\'s)')
    g.add_argument('--plot', default='project_scaling.png', help='speedup against GPUs (needs matplotlib; '
                                                                   '"none": no plot)')
    g.add_argument('--json', default=None, help='also write every number here')
    return p


# ---------------------------------------------------------------------------
# step times
# ---------------------------------------------------------------------------

class StepTimes:
    """Milliseconds of one micro-batch step at (B, micro-batch) on one GPU: measured (bench_step.py
    rows, linear in the micro-batch between and beyond measured ones) or modelled."""

    def __init__(self, points=None, model=None, base=224, source=''):
        self.points, self.model, self.base, self.source = points or {}, model, base, source

    @classmethod
    def from_json(cls, paths, model_name, base):
        points, where = {}, set()
        for path in paths:
            try:
                with open(path, encoding='utf-8') as f:
                    res = json.load(f)
            except OSError as e:
                raise UserError(f'--step_json {path}: cannot be read ({e.strerror})') from None
            except json.JSONDecodeError as e:
                raise UserError(f'--step_json {path}: not JSON (line {e.lineno}): pass bench_step.py --json '
                                f'files') from None
            # a bench_step.py result, or the GPU suite's step_batches.json: {"runs": [results]}
            runs = res.get('runs') if isinstance(res, dict) and 'runs' in res else [res]
            if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get('rows'), list)
                                                     for r in runs):
                raise UserError(f'--step_json {path}: no "rows": pass bench_step.py --json files')
            mine = [r for r in runs if r.get('model') == model_name]
            if not mine:
                raise UserError(f'--step_json {path} measures --model {", ".join(str(r.get("model")) for r in runs)}, '
                                f'not {model_name}: project the model it measures, or measure this one '
                                f'(bench_step.py)')
            for res in mine:
                if res.get('base_size') not in (None, base):
                    raise UserError(f'--step_json {path} measures a plan at base {res.get("base_size")}, not '
                                    f'--base_input_size {base}')
                where.add((res.get('host') or {}).get('gpu') or res.get('device') or '?')
            for r in (row for res in mine for row in res['rows']):
                try:
                    key = (int(r['size']), int(r['batch_size']))
                    ms, freq = float(r['ms_per_step']), int(r.get('update_freq', 1))
                except (KeyError, TypeError, ValueError):
                    raise UserError(f'--step_json {path}: a row without size, batch_size and ms_per_step') from None
                # update_freq 1 rows carry a whole step each (the optimizer's share too): preferred
                if key not in points or (freq == 1 and points[key][1] != 1):
                    points[key] = (ms, freq)
        by_size = {}
        for (b, m), (ms, _) in points.items():
            by_size.setdefault(b, []).append((m, ms))
        return cls({b: sorted(v) for b, v in by_size.items()}, base=base,
                   source=f'measured on {", ".join(sorted(where))} ({", ".join(os.path.basename(p) for p in paths)})')

    @classmethod
    def from_model(cls, text, base):
        try:
            per_image, fixed = (float(v) for v in text.split(','))
        except ValueError:
            per_image = fixed = -1.0
        if not (per_image > 0 and fixed >= 0):
            raise UserError(f'--step_model {text}: give MS_PER_IMAGE,FIXED_MS (a positive and a non-negative '
                            f'number of milliseconds), e.g. 3.3,20')
        return cls(model=(per_image, fixed), base=base,
                   source=f'modelled (not measured): {fixed:g} ms + {per_image:g} ms x images x (B/{base})^2 '
                          f'per micro-batch')

    def check_sizes(self, sizes):
        """UserError naming a B the plans need that no file measures."""
        if self.model:
            return
        missing = sorted(set(sizes) - set(self.points))
        if missing:
            raise UserError(f'--step_json has no step time at B={", ".join(map(str, missing))} (it has '
                            f'{", ".join(map(str, sorted(self.points))) or "none"}): measure every B of the plan '
                            f'(bench_step.py with the same --curriculum and --base_input_size)')

    def ms(self, b, m):
        """(milliseconds, how): how is 'measured', 'interpolated', 'extrapolated' or 'modelled'."""
        if self.model:
            per_image, fixed = self.model
            return fixed + m * per_image * (b / self.base) ** 2, 'modelled'
        pts = self.points[b]
        for mm, ms in pts:
            if mm == m:
                return ms, 'measured'
        if len(pts) == 1:
            (m0, t0), = pts
            return t0 * m / m0, 'extrapolated'
        below = [p for p in pts if p[0] < m]
        above = [p for p in pts if p[0] > m]
        if below and above:
            (m0, t0), (m1, t1) = below[-1], above[0]
            return t0 + (t1 - t0) * (m - m0) / (m1 - m0), 'interpolated'
        (m0, t0), (m1, t1) = (pts[0], pts[1]) if not below else (pts[-2], pts[-1])
        slope = (t1 - t0) / (m1 - m0)
        intercept = t0 - slope * m0
        if slope <= 0 or intercept < 0:  # noisy points: no fixed cost, proportional to the nearest
            near_m, near_t = (m0, t0) if not below else (m1, t1)
            return near_t * m / near_m, 'extrapolated'
        return intercept + slope * m, 'extrapolated'


# ---------------------------------------------------------------------------
# the interconnect
# ---------------------------------------------------------------------------

@dataclass
class Interconnect:
    gpus_per_node: int
    nvlink_gbs: float
    ib_gbps: float
    latency_ms: float
    ib_latency_ms: float
    overlap: float

    def allreduce_ms(self, n, nbytes):
        """Ring all-reduce of nbytes over n GPUs: 2(n-1)/n x bytes / bandwidth + latency, in ms."""
        if n <= 1:
            return 0.0
        if n <= self.gpus_per_node:
            bandwidth, latency = self.nvlink_gbs * 1e9, self.latency_ms
        else:
            bandwidth, latency = self.ib_gbps * 1e9 / 8, self.ib_latency_ms
        return 2 * (n - 1) / n * nbytes / bandwidth * 1e3 + latency

    def exposed_ms(self, comm, micro_ms):
        """The all-reduce's part not hidden behind the last micro-batch's backward."""
        return comm - self.overlap * min(comm, BACKWARD_SHARE * micro_ms)


# ---------------------------------------------------------------------------
# the projection
# ---------------------------------------------------------------------------

def split_for(args, n):
    """(per-GPU micro-batch, update_freq) at the base size on n GPUs for --global_batch_size, as
    main.py splits it (runner.setup.apply_global_batch with the largest --batch_size that fits)."""
    total = args.global_batch_size
    if total % n:
        raise UserError(f'--global_batch_size {total} does not divide among {n} GPUs: choose GPU counts '
                        f'(--gpus) that divide it')
    per_gpu = total // n
    micro = min(args.batch_size, per_gpu)
    while per_gpu % micro:
        micro -= 1
    return micro, per_gpu // micro


def plan_on(args, model, n, setting):
    """The plan main.py builds for n GPUs with --stage_batch `setting`."""
    a = copy.copy(args)
    a.batch_size, a.update_freq = split_for(args, n)
    a.global_batch_size, a.stage_batch = None, setting
    return checked_plan(a, model)


def baseline_plan(args, model, n):
    """The baseline: baseline_epochs at the base size, the base stage's split of the global batch."""
    micro, freq = split_for(args, n)
    base = args.base_input_size if (args.curriculum != 'none' or args.curriculum_file) else args.input_size
    return Plan('baseline', [Stage(0, base, None, baseline_epochs(args), micro, freq)], base, 'epochs')


def stage_time(stage, n, times, net, grad_bytes, images):
    """(seconds, how, comm share) of one stage on n GPUs."""
    micro_ms, how = times.ms(stage.size, stage.batch_size)
    comm = net.exposed_ms(net.allreduce_ms(n, grad_bytes), micro_ms)
    step_ms = stage.update_freq * micro_ms + comm
    # optimizer steps: the stage's images (replayed ones too) over the global batch
    steps = stage.epochs * images * stage.replay_times / (n * stage.batch_size * stage.update_freq)
    return steps * step_ms / 1e3, how, comm / step_ms


def project_plan(plan, n, times, net, grad_bytes, images):
    rows = [stage_time(s, n, times, net, grad_bytes, images) for s in plan.stages]
    total = sum(r[0] for r in rows)
    comm = sum(r[0] * r[2] for r in rows) / total if total else 0.0
    return {'seconds': total, 'comm_share': comm,
            'stages': [{'index': s.index, 'size': s.size, 'batch_size': s.batch_size, 'update_freq': s.update_freq,
                        'global_batch': n * s.batch_size * s.update_freq, 'lr_scale': s.lr_scale,
                        'seconds': r[0], 'step_time': r[1], 'comm_share': r[2]}
                       for s, r in zip(plan.stages, rows)]}


def project(args, model, times, net, grad_bytes, gpus, images):
    """Every number of the projection, as plain values."""
    out = {'model': args.model, 'step_times': times.source, 'grad_bytes': grad_bytes, 'train_images': images,
           'global_batch': args.global_batch_size, 'interconnect': vars(net), 'gpus': {}}
    plans = {(n, s): plan_on(args, model, n, s) for n in gpus for s in SETTINGS}
    times.check_sizes({st.size for p in plans.values() for st in p.stages} | {baseline_plan(args, model, 1).base_size})
    for n in gpus:
        base = project_plan(baseline_plan(args, model, n), n, times, net, grad_bytes, images)
        row = {'baseline': base}
        for s in SETTINGS:
            plan = plans[(n, s)]
            res = project_plan(plan, n, times, net, grad_bytes, images)
            res['speedup'] = base['seconds'] / res['seconds']
            res['theoretical'] = baseline_epochs(args) / plan.total_compute
            row[s] = res
        out['gpus'][n] = row
    out['plan_name'] = plans[(gpus[0], 'published')].name
    out['baseline_epochs'] = baseline_epochs(args)
    return out


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def table(res):
    gpus = list(res['gpus'])
    first = res['gpus'][gpus[0]]
    marks = sorted({st['step_time'] for r in res['gpus'].values() for s in SETTINGS + ('baseline',)
                    for st in r[s]['stages']} - {'measured', 'modelled'})
    lines = [f'Projected training time: {res["model"]}, {res["plan_name"]} vs a {res["baseline_epochs"]}-epoch '
             f'baseline, global batch {res["global_batch"]} (--stage_batch large: more below the base size)',
             f'step times {res["step_times"]}; all-reduce of {res["grad_bytes"] / 1e6:.1f} MB per step '
             f'({_net_text(res["interconnect"])}); {res["train_images"]} images per data epoch',
             f'{"GPUs":>5} {"baseline h":>11} | {"published h":>11} {"speedup":>8} {"comm":>6} | '
             f'{"large h":>9} {"speedup":>8} {"comm":>6} | {"theoretical":>11}']
    lines.append('-' * len(lines[-1]))
    for n, r in res['gpus'].items():
        p, q = r['published'], r['large']
        lines.append(f'{n:>5} {r["baseline"]["seconds"] / 3600:>11.1f} | {p["seconds"] / 3600:>11.1f} '
                     f'{p["speedup"]:>7.2f}x {100 * p["comm_share"]:>5.1f}% | {q["seconds"] / 3600:>9.1f} '
                     f'{q["speedup"]:>7.2f}x {100 * q["comm_share"]:>5.1f}% | {p["theoretical"]:>10.2f}x')
    lines.append('("comm": the share of the wall time spent in the all-reduce, not hidden)')
    for s in SETTINGS:
        lines.append('')
        lines.append(f'--stage_batch {s}: hours per stage (micro-batch x update_freq per GPU, lr scale)')
        hdr = f'{"stage":>5} {"B":>4} ' + ' '.join(f'{f"{n} GPU" + ("s" if n > 1 else ""):>22}' for n in gpus)
        lines += [hdr, '-' * len(hdr)]
        for k, st in enumerate(first[s]['stages']):
            cells = []
            for n in gpus:
                x = res['gpus'][n][s]['stages'][k]
                cells.append(f'{x["seconds"] / 3600:>7.2f} ({x["batch_size"]}x{x["update_freq"]}, '
                             f'x{x["lr_scale"]:g})'.rjust(22))
            lines.append(f'{st["index"]:>5} {st["size"]:>4} ' + ' '.join(cells))
    if marks:
        lines.append(f'note: some step times are {" or ".join(marks)} from the measured micro-batches '
                     f'(bench_step.py --bench_batches with the plans\' micro-batches measures them)')
    ref = '; '.join(f'{c:g}x less compute: without {_marks(v["published"])}, with {_marks(v["large"])}'
                    for c, v in PAPER_TABLE13.items())
    lines.append(f'paper (EfficientTrain++ Table 13, {PAPER_MODEL}, ImageNet-22K, measured speedup by GPUs; '
                 f'"with": its early large batch): {ref}')
    return '\n'.join(lines)


def _marks(points):
    return ' / '.join(f'{v:g}x on {n}' for n, v in points.items())


def _net_text(net):
    return (f'ring; {net["nvlink_gbs"]:g} GB/s and {net["latency_ms"]:g} ms within {net["gpus_per_node"]}-GPU nodes, '
            f'{net["ib_gbps"]:g} Gb/s and {net["ib_latency_ms"]:g} ms between them; overlap {net["overlap"]:g}')


def plot(res, path):
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    gpus = list(res['gpus'])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, style in zip(SETTINGS, ('o-', 's-')):
        ax.plot(gpus, [res['gpus'][n][s]['speedup'] for n in gpus], style, label=f'projected, --stage_batch {s}')
    theory = res['gpus'][gpus[0]]['published']['theoretical']
    ax.axhline(theory, color='grey', ls='--', lw=1, label=f'theoretical ({theory:.2f}x)')
    # the paper's compute saving nearest this plan's drawn solid, the other faint
    nearest = min(PAPER_TABLE13, key=lambda c: abs(c - theory))
    for (c, v), color in zip(PAPER_TABLE13.items(), ('tab:red', 'tab:purple')):
        for s, marker in zip(SETTINGS, ('x', 'P')):
            pts = v[s]
            ax.plot(list(pts), list(pts.values()), marker, color=color, ms=9, ls='none',
                    alpha=1.0 if c == nearest else 0.35,
                    label=f'paper Table 13, {PAPER_MODEL} at {c:g}x less compute, '
                          f'{"without" if s == "published" else "with"} early large batch')
    ax.set_xscale('log', base=2)
    ax.set_xticks(gpus)
    ax.set_xticklabels([str(n) for n in gpus])
    ax.set_xlabel('GPUs')
    ax.set_ylabel('wall-clock speedup over the baseline')
    ax.set_title(f'{res["model"]}: {res["plan_name"]}', fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc='lower left')
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format='png', dpi=120)
    finally:
        plt.close(fig)
    utils.atomic_write_bytes(path, png.getvalue())  # no half-written picture on any way out


def _gpu_counts(text):
    try:
        gpus = [int(v) for v in text.split(',')]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 1:
        raise UserError(f'--gpus {text}: give GPU counts separated by commas, e.g. 1,8,16,32,64')
    return sorted(set(gpus))


def check(args):
    if (args.step_json is None) == (args.step_model is None):
        raise UserError('give the step times: --step_json FILE ... (bench_step.py) or --step_model MS,FIXED_MS')
    if not 0 <= args.overlap <= 1:
        raise UserError(f'--overlap {args.overlap:g}: give a share from 0 (none) to 1 (full)')
    if min(args.nvlink_gbs, args.ib_gbps) <= 0 or min(args.latency_ms, args.ib_latency_ms) < 0 \
            or args.gpus_per_node < 1:
        raise UserError('--nvlink_gbs and --ib_gbps must be > 0, --latency_ms and --ib_latency_ms >= 0, '
                        '--gpus_per_node >= 1')
    if args.train_images < 1 or (args.grad_bytes is not None and args.grad_bytes < 0):
        raise UserError('--train_images must be >= 1 and --grad_bytes >= 0')
    if args.global_batch_size is None or args.global_batch_size < 1:
        raise UserError('--global_batch_size must be >= 1')
    train_main.check_args(args)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check(args)
    gpus = _gpu_counts(args.gpus)
    model = model_structure(train_main.build_model, args, args.nb_classes or 1000)
    grad_bytes = args.grad_bytes
    if grad_bytes is None:
        grad_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = args.base_input_size if (args.curriculum != 'none' or args.curriculum_file) else args.input_size
    times = StepTimes.from_json(args.step_json, args.model, base) if args.step_json else \
        StepTimes.from_model(args.step_model, base)
    net = Interconnect(args.gpus_per_node, args.nvlink_gbs, args.ib_gbps, args.latency_ms, args.ib_latency_ms,
                       args.overlap)
    res = project(args, model, times, net, grad_bytes, gpus, args.train_images)
    print(table(res), flush=True)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(res, f, indent=1)
    if args.plot and args.plot != 'none':
        try:
            plot(res, args.plot)
            print(f'wrote {args.plot}')
        except ImportError:
            print('the plot needs matplotlib (pip install matplotlib): not written', file=sys.stderr)
    return res


def cli(argv=None):
    try:
        main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == '__main__':
    cli()
