"""End-to-end wall-clock speedup of a curriculum over its baseline, measured by training both.

    python benchmarks/bench_e2e.py --data_set SYNTH --model resnet18 --curriculum etpp \
        --base_input_size 64 --epochs 6 --baseline_epochs 9 --batch_size 32 --device cpu
    python benchmarks/bench_e2e.py --data_path /data/imagenet --model resnet50 --curriculum etpp \
        --epochs 200 --baseline_run_epochs 3 --data_pipeline fast --amp true ...   # on a GPU node

Arguments this script does not know go to main.py.  Runs main.py in two fresh processes
(the curriculum, and the baseline: --curriculum none at the base size), both without
evaluation and checkpoints, and sums the training passes' wall-clock times from log.txt
(`train_time_s`: loading, device transforms, forward, backward, optimizer; what the
curriculum changes).  The baseline runs --baseline_run_epochs epochs (default: all of
--baseline_epochs) and its time is extrapolated linearly to --baseline_epochs from its
mean epoch time after the first (the first carries start-up costs).  Measured speedup =
baseline time / curriculum time, next to the theoretical one (baseline epochs /
equivalent epochs of the plan); per stage, a data epoch's time relative to a baseline
epoch against the compute ratio (B/base)^2 x replay factor says where the time goes.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, host_info, plan_for, report, train_args  # first: puts the repository on sys.path

import main as main_mod  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                epilog='other arguments: main.py training arguments (--model, --epochs, ...)')
    p.add_argument('--baseline_run_epochs', type=int, default=None,
                   help='epochs the baseline actually trains (>= 2), extrapolated to --baseline_epochs')
    p.add_argument('--keep', default=None, help='keep the two runs\' output directories here')
    p.add_argument('--json', default=None, help='also write the results here')
    own, rest = p.parse_known_args(argv)
    if '--curriculum' not in rest and '--curriculum_file' not in rest:
        rest = ['--curriculum', 'etpp'] + rest
    if own.baseline_run_epochs is not None and own.baseline_run_epochs < 2:
        p.error('--baseline_run_epochs must be at least 2 (the first epoch is not used for the rate)')
    return own, rest


def without_curriculum_file(argv):
    """argv less --curriculum_file (which would override the baseline's --curriculum none)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == '--curriculum_file':
            skip = True
        elif not a.startswith('--curriculum_file='):
            out.append(a)
    return out


def run(argv, out_dir):
    """Train in a fresh process; returns (its log.txt records, wall seconds of the whole process)."""
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *argv, '--output_dir', out_dir, '--disable_eval', 'true',
           '--save_ckpt', 'false', '--log_dir', 'none']
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = '\n'.join(proc.stdout.splitlines()[-15:])
        raise SystemExit(f'training failed (exit {proc.returncode}): {" ".join(cmd)}\n{tail}')
    with open(os.path.join(out_dir, 'log.txt'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if 'train_time_s' in r], wall


def measure(own, rest):
    args = train_args(rest)
    plan = plan_for(args)
    base_epochs = main_mod.baseline_epochs(args)
    run_epochs = own.baseline_run_epochs or base_epochs
    base_argv = without_curriculum_file(rest) + ['--curriculum', 'none', '--input_size', str(plan.base_size),
                                                 '--epochs', str(run_epochs)]
    with tempfile.TemporaryDirectory(prefix='bench-e2e-') as tmp:
        root = own.keep or tmp
        curr_log, curr_wall = run(rest, os.path.join(root, 'curriculum'))
        base_log, base_wall = run(base_argv, os.path.join(root, 'baseline'))
    base_times = [r['train_time_s'] for r in base_log]
    per_base_epoch = sum(base_times[1:]) / (len(base_times) - 1) if len(base_times) > 1 else base_times[0]
    base_total = base_times[0] + per_base_epoch * (base_epochs - 1)
    curr_total = sum(r['train_time_s'] for r in curr_log)
    stages = []
    for s in plan.stages:
        times = [r['train_time_s'] for r in curr_log if r['stage'] == s.index]
        if not times:
            continue
        per_epoch = sum(times) / len(times)
        stages.append({'index': s.index, 'size': s.size, 'magnitude': s.magnitude, 'epochs': len(times),
                       'replay': s.replay_times, 'seconds': sum(times), 'per_epoch': per_epoch,
                       'relative': per_epoch / per_base_epoch,
                       'compute_ratio': (s.size / plan.base_size) ** 2 * s.replay_times})
    return {'host': host_info(args.device), 'argv': rest, 'plan': plan.name, 'base_size': plan.base_size,
            'equivalent_epochs': plan.total_compute, 'baseline_epochs': base_epochs,
            'baseline_run_epochs': len(base_times), 'theoretical': base_epochs / plan.total_compute,
            'measured': base_total / curr_total, 'curriculum_s': curr_total, 'baseline_s': base_total,
            'baseline_epoch_s': per_base_epoch, 'process_wall_s': {'curriculum': curr_wall, 'baseline': base_wall},
            'stages': stages}


def table(res):
    extrap = '' if res['baseline_run_epochs'] == res['baseline_epochs'] else \
        f' (ran {res["baseline_run_epochs"]}, extrapolated)'
    lines = [f'{res["plan"]}: {res["equivalent_epochs"]:.2f} equivalent epochs at {res["base_size"]} vs a '
             f'{res["baseline_epochs"]}-epoch baseline{extrap}; {" ".join(res["argv"])}',
             f'host: {res["host"]["cpu"]} ({res["host"]["cpu_count"]} cores)'
             f'{", " + res["host"]["gpu"] if res["host"].get("gpu") else ""}',
             f'training passes: curriculum {res["curriculum_s"]:.1f} s, baseline {res["baseline_s"]:.1f} s '
             f'({res["baseline_epoch_s"]:.2f} s per epoch)',
             f'speedup: measured {res["measured"]:.2f}x, theoretical {res["theoretical"]:.2f}x '
             f'(measured / theoretical = {res["measured"] / res["theoretical"]:.2f})']
    hdr = f'{"stage":>5} {"B":>4} {"m":>3} {"epochs":>6} {"replay":>6} {"s/epoch":>8} {"vs base epoch":>13} ' \
          f'{"compute ratio":>13} {"time share":>10}'
    lines += [hdr, '-' * len(hdr)]
    for r in res['stages']:
        m = '-' if r['magnitude'] is None else str(r['magnitude'])
        lines.append(f'{r["index"]:>5} {r["size"]:>4} {m:>3} {r["epochs"]:>6} {r["replay"]:>6} '
                     f'{r["per_epoch"]:>8.2f} {r["relative"]:>12.3f}x {r["compute_ratio"]:>12.3f}x '
                     f'{100 * r["seconds"] / res["curriculum_s"]:>9.1f}%')
    return '\n'.join(lines)


def main(argv=None):
    own, rest = parse(argv)
    return report(measure(own, rest), table, own.json)


if __name__ == '__main__':
    main()
