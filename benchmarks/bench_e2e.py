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

Short runs are dominated by start-up: every change of B costs its first batches (cuDNN
autotuning or graph capture of new shapes, the loader refilling).  So, per stage, the
steady-state images/s (log.txt's train_steady_img_s: the first batches of each epoch
left out, engine._Timing) stands next to the switch cost (train_excess_time_s of the
stage's first epoch: its time beyond its images at the steady rate; later epochs' median
excess is the normal epoch start, shown apart), and the steady rates project the full
published run (--project_epochs, default 200, on ImageNet's 1,281,167 images, against the
baseline's epochs) beside the measured short-run speedup.  Pass --print_freq (default 10
here) to read the device that often: the steady rate is timed between those reads.

The training processes run in sessions of their own; on every exit path (an error,
--run_timeout, Ctrl-C, SIGTERM) they are ended with every process below them
(scripts/fault_inject.signal_run: torchrun starts its workers in sessions of their own).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, host_info, plan_for, report, train_args  # first: puts the repository on sys.path

from runner.args import HelpFormatter  # noqa: E402
from runner.stage import baseline_epochs  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from fault_inject import signal_run  # noqa: E402

IMAGENET_TRAIN = 1281167


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=HelpFormatter,
                                epilog='Other arguments are main.py\'s training flags (--model, --epochs, ...): '
                                       'see python main.py --help.')
    p.add_argument('--baseline_run_epochs', type=int, default=None,
                   help='epochs the baseline actually trains (>= 2), extrapolated to --baseline_epochs')
    p.add_argument('--keep', default=None, help='keep the two runs\' output directories here')
    p.add_argument('--json', default=None, help='also write the results here')
    p.add_argument('--project_epochs', type=float, default=200,
                   help='the curriculum budget E of the projected full run (ImageNet-1k, 1.28M images)')
    p.add_argument('--run_timeout', type=float, default=None,
                   help='seconds each training process may take; then it is killed with all its processes')
    own, rest = p.parse_known_args(argv)
    if '--print_freq' not in rest:
        rest = rest + ['--print_freq', '10']
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


class Interrupted(Exception):
    pass


def _raise_on_sigterm(signum, frame):
    raise Interrupted(f'signal {signum}')


def run(argv, out_dir, timeout=None):
    """Train in a fresh process; returns (its log.txt records, wall seconds of the whole process, its notes).

    The notes are the lines in which the step says how it runs (`--cuda_graph: not captured
    (...)`, a capture that failed): a captured run that fell back to eager is then visible in
    the results.  Its whole output is kept as output.txt next to its log.txt.  The process
    and everything below it are ended on every way out of this function.
    """
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *argv, '--output_dir', out_dir, '--disable_eval', 'true',
           '--save_ckpt', 'false', '--log_dir', 'none']
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_run(proc, signal.SIGKILL)
        proc.wait()
        raise SystemExit(f'training still running after {timeout:.0f} s (--run_timeout): killed; {" ".join(cmd)}')
    finally:
        if proc.returncode is None:  # interrupted (Ctrl-C, SIGTERM) or failed here
            signal_run(proc, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - t0
    try:
        with open(os.path.join(out_dir, 'output.txt'), 'w', encoding='utf-8') as f:
            f.write(out)
    except OSError:  # the run failed before making its folder: its tail is in the error below
        pass
    if proc.returncode != 0:
        tail = '\n'.join(out.splitlines()[-15:])
        raise SystemExit(f'training failed (exit {proc.returncode}): {" ".join(cmd)}\n{tail}')
    with open(os.path.join(out_dir, 'log.txt'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
    notes = sorted({line.strip() for line in out.splitlines() if line.startswith('--cuda_graph:')})
    return [r for r in records if 'train_time_s' in r], wall, notes


def steady_rates(records):
    """{(B, m, replay): median steady images/s over the epochs that have one} of a run's log."""
    rates = {}
    for r in records:
        if r.get('train_steady_img_s'):
            rates.setdefault((r['input_size'], r.get('magnitude'), r.get('replay_times', 1)), []).append(
                r['train_steady_img_s'])
    return {k: statistics.median(v) for k, v in rates.items()}


def _rate_for(rates, size, magnitude, replay):
    """The measured rate of this stage, else of the same B and replay (another m), else None."""
    if (size, magnitude, replay) in rates:
        return rates[(size, magnitude, replay)]
    same = [v for (b, _, rt), v in rates.items() if b == size and rt == replay]
    return statistics.median(same) if same else None


def project(args, own, rates, base_rate, switch_costs):
    """Seconds of the full published run on one process at the steady rates, and of its baseline."""
    full = argparse.Namespace(**vars(args))
    full.epochs = own.project_epochs
    if getattr(full, 'curriculum_file', None):
        return None
    plan = plan_for(full)
    total, missing = 0.0, []
    for s in plan.stages:
        rate = base_rate if s.size == plan.base_size and s.replay_times == 1 and base_rate else \
            _rate_for(rates, s.size, s.magnitude, s.replay_times)
        if not rate:
            missing.append(s.index)
            continue
        total += s.epochs * IMAGENET_TRAIN * s.replay_times / rate
    switches = sum(1 for a, b in zip(plan.stages, plan.stages[1:]) if a.size != b.size)
    total += switches * (statistics.median(switch_costs) if switch_costs else 0.0)
    full.baseline_epochs = None  # the published comparison (300 epochs for etpp), not this run's
    base_epochs = baseline_epochs(full)
    if missing or not base_rate:
        return {'epochs': own.project_epochs, 'missing_stages': missing}
    baseline = base_epochs * IMAGENET_TRAIN / base_rate
    return {'epochs': own.project_epochs, 'baseline_epochs': base_epochs, 'curriculum_h': total / 3600,
            'baseline_h': baseline / 3600, 'speedup': baseline / total, 'switches': switches,
            'theoretical': base_epochs / plan.total_compute}


def measure(own, rest):
    args = train_args(rest)
    plan = plan_for(args)
    base_epochs = baseline_epochs(args)
    run_epochs = own.baseline_run_epochs or base_epochs
    base_argv = without_curriculum_file(rest) + ['--curriculum', 'none', '--input_size', str(plan.base_size),
                                                 '--epochs', str(run_epochs)]
    with tempfile.TemporaryDirectory(prefix='bench-e2e-') as tmp:
        root = own.keep or tmp
        curr_log, curr_wall, curr_notes = run(rest, os.path.join(root, 'curriculum'), own.run_timeout)
        base_log, base_wall, base_notes = run(base_argv, os.path.join(root, 'baseline'), own.run_timeout)
    base_times = [r['train_time_s'] for r in base_log]
    per_base_epoch = sum(base_times[1:]) / (len(base_times) - 1) if len(base_times) > 1 else base_times[0]
    base_total = base_times[0] + per_base_epoch * (base_epochs - 1)
    curr_total = sum(r['train_time_s'] for r in curr_log)
    rates = steady_rates(curr_log)
    base_rates = [r['train_steady_img_s'] for r in base_log if r.get('train_steady_img_s')]
    base_rate = statistics.median(base_rates) if base_rates else None
    # the normal start of an epoch (same B as the one before), apart from a change of B
    starts = [r.get('train_excess_time_s') for i, r in enumerate(curr_log)
              if i and r['input_size'] == curr_log[i - 1]['input_size'] and r.get('train_excess_time_s') is not None]
    epoch_start = statistics.median(starts) if starts else None
    stages, switch_costs = [], []
    for s in plan.stages:
        recs = [r for r in curr_log if r['stage'] == s.index]
        times = [r['train_time_s'] for r in recs]
        if not times:
            continue
        per_epoch = sum(times) / len(times)
        first = curr_log.index(recs[0])
        switch = recs[0].get('train_excess_time_s') if first and curr_log[first - 1]['input_size'] != s.size \
            else None
        if switch is not None:
            switch_costs.append(switch)
        stages.append({'index': s.index, 'size': s.size, 'magnitude': s.magnitude, 'epochs': len(times),
                       'replay': s.replay_times, 'seconds': sum(times), 'per_epoch': per_epoch,
                       'relative': per_epoch / per_base_epoch,
                       'compute_ratio': (s.size / plan.base_size) ** 2 * s.replay_times,
                       'batch': f'{s.batch_size} x {s.update_freq}',
                       'steady_img_s': _rate_for(rates, s.size, s.magnitude, s.replay_times),
                       'switch_s': switch})
    return {'host': host_info(args.device), 'argv': rest, 'plan': plan.name, 'base_size': plan.base_size,
            'equivalent_epochs': plan.total_compute, 'baseline_epochs': base_epochs,
            'baseline_run_epochs': len(base_times), 'theoretical': base_epochs / plan.total_compute,
            'measured': base_total / curr_total, 'curriculum_s': curr_total, 'baseline_s': base_total,
            'baseline_epoch_s': per_base_epoch, 'process_wall_s': {'curriculum': curr_wall, 'baseline': base_wall},
            'baseline_steady_img_s': base_rate, 'epoch_start_s': epoch_start, 'switch_costs_s': switch_costs,
            'projection': project(args, own, rates, base_rate, switch_costs), 'stages': stages,
            'notes': {'curriculum': curr_notes, 'baseline': base_notes}}


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
    hdr = f'{"stage":>5} {"B":>4} {"m":>3} {"batch x freq":>12} {"epochs":>6} {"replay":>6} {"s/epoch":>8} ' \
          f'{"vs base epoch":>13} {"compute ratio":>13} {"time share":>10} {"steady img/s":>12} {"switch s":>8}'
    lines += [hdr, '-' * len(hdr)]
    for r in res['stages']:
        m = '-' if r['magnitude'] is None else str(r['magnitude'])
        rate = f'{r["steady_img_s"]:.1f}' if r.get('steady_img_s') else '-'
        switch = f'{r["switch_s"]:.2f}' if r.get('switch_s') is not None else '-'
        lines.append(f'{r["index"]:>5} {r["size"]:>4} {m:>3} {r["batch"]:>12} {r["epochs"]:>6} {r["replay"]:>6} '
                     f'{r["per_epoch"]:>8.2f} {r["relative"]:>12.3f}x {r["compute_ratio"]:>12.3f}x '
                     f'{100 * r["seconds"] / res["curriculum_s"]:>9.1f}% {rate:>12} {switch:>8}')
    base_rate = f'{res["baseline_steady_img_s"]:.1f} img/s' if res.get('baseline_steady_img_s') else 'not measured'
    start = f'{res["epoch_start_s"]:.2f} s' if res.get('epoch_start_s') is not None else 'not measured'
    lines.append(f'baseline at {res["base_size"]}: steady {base_rate}; an epoch start without a change of B costs '
                 f'{start} (median), a change of B the "switch s" above (its first epoch beyond steady state)')
    pr = res.get('projection')
    if pr and 'speedup' in pr:
        lines.append(f'projected full run from the steady rates (E={pr["epochs"]:g} on {IMAGENET_TRAIN} images, one '
                     f'process, {pr["switches"]} changes of B): curriculum {pr["curriculum_h"]:.1f} h, '
                     f'{pr["baseline_epochs"]}-epoch baseline {pr["baseline_h"]:.1f} h: {pr["speedup"]:.2f}x '
                     f'(theoretical {pr["theoretical"]:.2f}x; measured in this short run {res["measured"]:.2f}x)')
    elif pr:
        lines.append(f'projection of the full run: no steady rate for stages {pr.get("missing_stages")} or the '
                     f'baseline (raise the epochs or lower --print_freq so each epoch has reads past its start)')
    for name, notes in (res.get('notes') or {}).items():
        lines += [f'{name} run: {note}' for note in notes]
    return '\n'.join(lines)


def main(argv=None):
    own, rest = parse(argv)
    # SIGTERM (a scheduler, `timeout`) unwinds like Ctrl-C, so run() ends its training processes
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return report(measure(own, rest), table, own.json)
    except Interrupted:
        print('bench_e2e: stopped by SIGTERM; its training processes were ended', file=sys.stderr, flush=True)
        raise SystemExit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    main()
