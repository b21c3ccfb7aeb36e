"""Theoretical speedup of a curriculum at a budget, and the speedup predicted from measurements.

    python benchmarks/bench_schedule.py --data_json data.json --step_json step.json --workers 10 \
        --model resnet50 --curriculum etpp --epochs 200
    python benchmarks/bench_schedule.py --workers 1 --model resnet50 --curriculum etpp --epochs 200 \
        --device cpu --batch_size 8        # measures both here first (slow on a CPU)

Arguments this script does not know go to main.py's parser; they define the plan whose
speedup is predicted (and, without JSON files, what bench_data.py and bench_step.py
measure).  Per stage, a data epoch takes the longer of two times (per training image):
loading, 1 / (workers x per-worker images/s of that stage's pipeline, from
bench_data.py), and computing, replay_times / (training images/s at B, from
bench_step.py).  The longer one is the stage's bottleneck.  The baseline is
--baseline_epochs epochs at the base size with the same data pipeline (the plain 224
pipeline for the published order, the fast pipeline at the base size for the fast ones).
Workers are assumed to scale linearly (one core each) and loading to overlap compute
fully, as DataLoader prefetching does; the theoretical speedup assumes compute only.
"""
import argparse
import json

from common import train_args  # first: puts the repository on sys.path

from curriculum.adapt import size_multiple  # noqa: E402
from curriculum import build_plan  # noqa: E402
from models import create_model  # noqa: E402
from runner.stage import baseline_epochs  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog='Other arguments are main.py\'s training flags (--model, --curriculum, '
                                       '...): see python main.py --help.')
    p.add_argument('--data_json', default=None, help='output of bench_data.py --json (else measured now)')
    p.add_argument('--step_json', default=None, help='output of bench_step.py --json (else measured now)')
    p.add_argument('--workers', type=float, nargs='+', default=[10.0], help='loader workers per GPU')
    p.add_argument('--json', default=None, help='also write the results here')
    own, rest = p.parse_known_args(argv)
    if '--model' not in rest:
        rest = ['--model', 'resnet50'] + rest
    if '--curriculum' not in rest and '--curriculum_file' not in rest:
        rest = ['--curriculum', 'etpp'] + rest
    if '--epochs' not in rest:
        rest = rest + ['--epochs', '200']
    return own, rest


def step_rate(step, size):
    for r in step['rows']:
        if r['size'] == size:
            return r['img_s']
    raise SystemExit(f'{size} not measured in the step benchmark (sizes: {[r["size"] for r in step["rows"]]})')


def data_rate(data, pipeline, size, magnitude):
    rows = [r for r in data['stages'] if r['size'] == size]
    if not rows:
        raise SystemExit(f'B={size} not measured in the data benchmark')
    exact = [r for r in rows if r['magnitude'] == magnitude]
    return (exact or rows)[0][pipeline]


def baseline_data_rate(data, pipeline, base):
    if pipeline == 'published':
        return data['plain224']
    # the fast path at the base size with the baseline's policy (the highest magnitude)
    rows = sorted((r for r in data['stages'] if r['size'] == base), key=lambda r: r['magnitude'] or 0)
    return rows[-1][pipeline] if rows else data['plain224']


def predict(plan, data, step, workers, pipelines, baseline_epochs):
    base = plan.base_size
    out = {'theoretical': baseline_epochs / plan.total_compute, 'workers': workers, 'pipelines': {}}
    for pipe in pipelines:
        rows, total = [], 0.0
        for s in plan.stages:
            load = 1.0 / (workers * data_rate(data, pipe, s.size, s.magnitude))
            comp = s.replay_times / step_rate(step, s.size)
            t = s.epochs * max(load, comp)
            total += t
            rows.append({'index': s.index, 'size': s.size, 'magnitude': s.magnitude, 'epochs': s.epochs,
                         'replay': s.replay_times, 'load_s': load, 'compute_s': comp, 'time': t,
                         'bottleneck': 'data' if load > comp else 'compute'})
        b_load = 1.0 / (workers * baseline_data_rate(data, pipe, base))
        b_comp = 1.0 / step_rate(step, base)
        baseline = baseline_epochs * max(b_load, b_comp)
        out['pipelines'][pipe] = {'stages': rows, 'time': total, 'baseline_time': baseline,
                                  'baseline_bottleneck': 'data' if b_load > b_comp else 'compute',
                                  'predicted': baseline / total}
    if 'published' in out['pipelines']:
        ref = out['pipelines']['published']['baseline_time']
        for res in out['pipelines'].values():
            res['vs_published_baseline'] = ref / res['time']
    return out


def _num(x):
    return f'{x:.0f}' if x >= 100 else f'{x:.3g}'


def table(pred, plan, baseline_epochs, step):
    lines = [f'{plan.name}: {plan.num_epochs} data epochs, {plan.total_compute:.1f} equivalent epochs at '
             f'{plan.base_size}; theoretical speedup vs {baseline_epochs} epochs: {pred["theoretical"]:.2f}x',
             f'measured: step {step["model"]} on {step["host"].get("gpu") or step["host"]["cpu"]} '
             f'(amp {step["amp"] or "off"}, channels_last {step["channels_last"]}, compile {step["compile"]}); '
             f'{pred["workers"]:g} loader workers per GPU']
    for pipe, res in pred['pipelines'].items():
        hdr = (f'{"stage":>5} {"B":>4} {"m":>3} {"epochs":>6} {"replay":>6} {"data img/s":>11} {"step img/s":>10} '
               f'{"bottleneck":>10} {"time share":>10}')
        lines += ['', f'pipeline {pipe}: predicted speedup {res["predicted"]:.2f}x '
                      f'(baseline bound by {res["baseline_bottleneck"]})', hdr, '-' * len(hdr)]
        for r in res['stages']:
            m = '-' if r['magnitude'] is None else str(r['magnitude'])
            lines.append(f'{r["index"]:>5} {r["size"]:>4} {m:>3} {r["epochs"]:>6} {r["replay"]:>6} '
                         f'{_num(1 / r["load_s"]):>11} {_num(r["replay"] / r["compute_s"]):>10} {r["bottleneck"]:>10} '
                         f'{100 * r["time"] / res["time"]:>9.1f}%')
    return '\n'.join(lines)


def main(argv=None):
    own, rest = parse(argv)
    args = train_args(rest)
    plan = build_plan(args, size_multiple(create_model(args.model, num_classes=10)))
    if own.data_json:
        with open(own.data_json, encoding='utf-8') as f:
            data = json.load(f)
    else:
        import bench_data
        data = bench_data.main(rest + ['--pipelines', 'published,fast,fast-store'])
    if own.step_json:
        with open(own.step_json, encoding='utf-8') as f:
            step = json.load(f)
    else:
        import bench_step
        step = bench_step.main(rest + ['--data_pipeline', 'fast'])
    pipelines = [p for p in ('published', 'fast', 'fast-store') if p in data['pipelines']]
    results = []
    for w in own.workers:
        pred = predict(plan, data, step, w, pipelines, baseline_epochs(args))
        print(table(pred, plan, baseline_epochs(args), step), flush=True)
        print()
        results.append(pred)
    extra = [p for p in pipelines if p != 'published' and 'published' in pipelines]
    hdr = f'{"workers/GPU":>11} {"theoretical":>11} ' + ' '.join(f'{p:>12}' for p in pipelines) + \
        ''.join(f' {p + " vs published baseline":>28}' for p in extra)
    lines = ['predicted wall-clock speedup vs the baseline on the same pipeline, by loader workers per GPU',
             hdr, '-' * len(hdr)]
    for pred in results:
        lines.append(f'{pred["workers"]:>11g} {pred["theoretical"]:>10.2f}x ' +
                     ' '.join(f'{pred["pipelines"][p]["predicted"]:>11.2f}x' for p in pipelines) +
                     ''.join(f' {pred["pipelines"][p]["vs_published_baseline"]:>27.2f}x' for p in extra))
    print('\n'.join(lines), flush=True)
    if own.json:
        with open(own.json, 'w', encoding='utf-8') as f:
            json.dump({'plan': plan.summary(), 'predictions': results}, f, indent=1)
    return results


if __name__ == '__main__':
    main()
