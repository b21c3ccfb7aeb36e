"""Kill a training run at random points, restart it each time, and check the result is exact.

    python scripts/fault_inject.py --kills 3 -- --data_set SYNTH --model resnet18 \
        --input_size 32 --epochs 3 --batch_size 32 --device cpu --num_workers 0 --deterministic true

Runs main.py (or --entry main_pretrain.py) with the given arguments twice: once uninterrupted (the reference) and once
killed `--kills` times (SIGKILL by default, or SIGTERM as a scheduler would, or SIGINT; sent to every
process of the run at once, torchrun's workers and loader workers included) at random
training steps and restarted with the same command. Then compares the final
checkpoints tensor by tensor (model, EMA, optimizer) and the log.txt records. Exit
status 0 when they are identical, 1 otherwise. `--nproc 2` runs both under torchrun.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r'^Epoch: \[\d+/\d+\].*\[\s*\d+/\d+\]')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def command(train_args, output_dir, nproc, entry='main.py'):
    main = os.path.join(ROOT, entry)
    argv = list(train_args) + ['--output_dir', output_dir, '--print_freq', '1']
    if nproc > 1:
        return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                f'--master_port={_free_port()}', main] + argv
    return [sys.executable, main] + argv


def _descendants(pid):
    """Every process below pid, from /proc (Linux; elsewhere none are found)."""
    children = {}
    try:
        entries = [e for e in os.listdir('/proc') if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(stat[stat.rindex(')') + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_run(proc, sig):
    """Send sig to a run and every process below it at once, as a scheduler or a node failure does.

    The process group is not enough: torchrun starts each worker in a session of its own.
    The processes are listed before any is signalled (a killed parent's children would be
    re-parented and no longer traceable to it).
    """
    for pid in [proc.pid] + _descendants(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_once(cmd, kill_after=None, sig=signal.SIGKILL, log=None, timeout=None):
    """Run cmd; if kill_after is set, send sig to all its processes after that many step lines.

    Returns (exit code, number of step lines seen).  A run still going after `timeout`
    seconds (a hang) is killed with all its processes and reported as an error; so is one
    whose caller is interrupted, so no training process outlives this call.
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    # reading the output blocks, so the time limit is enforced from another thread
    hung = threading.Event()
    watchdog = threading.Timer(timeout, lambda: (hung.set(), signal_run(proc, signal.SIGKILL))) if timeout else None
    steps, sent = 0, False
    try:
        if watchdog:
            watchdog.start()
        for line in proc.stdout:
            if log is not None:
                log.write(line)
            if STEP_LINE.match(line):
                steps += 1
                if kill_after is not None and steps >= kill_after and not sent:
                    signal_run(proc, sig)
                    sent = True
        proc.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.returncode is None:  # the caller was interrupted
            signal_run(proc, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    # a run that ended by itself just as the time ran out was not hung
    if hung.is_set() and proc.returncode != 0:
        raise SystemExit(f'{" ".join(cmd[:2])} ... still running after {timeout:.0f}s (a hang?): killed; '
                         f'its output is in the run log')
    return proc.returncode, steps


def last_checkpoint(output_dir):
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir)
             for m in [re.fullmatch(r'checkpoint-(\d+)\.pth', n)] if m]
    if not found:
        raise SystemExit(f'no checkpoint-N.pth in {output_dir}')
    return os.path.join(output_dir, max(found)[1])


def _flatten(prefix, obj, out):
    import torch
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f'{prefix}.{k}', v, out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(f'{prefix}.{i}', v, out)
    else:
        out[prefix] = obj
    return out


def compare(ref_dir, test_dir):
    """A list of differences between two finished runs (empty when identical)."""
    import torch
    sys.path.insert(0, ROOT)
    from utils import load_checkpoint_file
    problems = []
    a_path, b_path = last_checkpoint(ref_dir), last_checkpoint(test_dir)
    if os.path.basename(a_path) != os.path.basename(b_path):
        problems.append(f'final checkpoints differ in name: {a_path} vs {b_path}')
    a, b = load_checkpoint_file(a_path), load_checkpoint_file(b_path)
    for key in ('model', 'model_ema', 'optimizer', 'scaler', 'epoch'):
        fa, fb = _flatten(key, a.get(key), {}), _flatten(key, b.get(key), {})
        if fa.keys() != fb.keys():
            problems.append(f'{key}: different entries')
            continue
        for k in fa:
            x, y = fa[k], fb[k]
            same = torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x == y
            if not same:
                problems.append(f'{k} differs')
                break
    logs = []
    for d in (ref_dir, test_dir):
        with open(os.path.join(d, 'log.txt')) as f:
            # wall-clock times and throughputs differ between any two runs
            logs.append([{k: v for k, v in json.loads(line).items() if not k.endswith(('_time_s', '_img_s'))}
                         for line in f])
    if logs[0] != logs[1]:
        ea = [r.get('epoch') for r in logs[0]]
        eb = [r.get('epoch') for r in logs[1]]
        problems.append(f'log.txt differs (epochs {ea} vs {eb})' if ea != eb else 'log.txt values differ')
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                usage='%(prog)s [options] -- ENTRY POINT ARGUMENTS',
                                epilog='After --: the entry point\'s flags (see python main.py --help), without '
                                       '--output_dir.')
    p.add_argument('--kills', type=int, default=3, help='how many times the run is killed and restarted')
    p.add_argument('--signal', choices=['KILL', 'TERM', 'INT'], default='KILL',
                   help='KILL: a crash; TERM: a scheduler\'s stop; INT: Ctrl-C (both save a recovery checkpoint)')
    p.add_argument('--nproc', type=int, default=1, help='processes per run (torchrun --nproc_per_node) when > 1')
    p.add_argument('--seed', type=int, default=0, help='seed for choosing the kill points')
    p.add_argument('--workdir', default='out/fault_inject',
                   help='holds reference/ and faulty/ (the two runs\' output directories) and their logs')
    p.add_argument('--entry', default='main.py', choices=['main.py', 'main_pretrain.py'],
                   help='the training entry point to run (main_pretrain.py: MAE pre-training)')
    p.add_argument('--run_timeout', type=float, default=1800,
                   help='seconds one training run may take before it is treated as hung and killed')
    p.add_argument('train_args', nargs=argparse.REMAINDER, help='-- then the main.py arguments')
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ['--'] else args.train_args
    if any(a == '--output_dir' for a in train_args):
        raise SystemExit('error: do not pass --output_dir; the script uses <workdir>/reference and <workdir>/faulty')
    rng = random.Random(args.seed)
    sig = getattr(signal, f'SIG{args.signal}')
    ref_dir, test_dir = os.path.join(args.workdir, 'reference'), os.path.join(args.workdir, 'faulty')
    for d in (ref_dir, test_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    with open(os.path.join(args.workdir, 'reference.out'), 'w') as log:
        rc, total_steps = run_once(command(train_args, ref_dir, args.nproc, args.entry), log=log,
                                  timeout=args.run_timeout)
    if rc != 0:
        raise SystemExit(f'reference run failed (exit {rc}): see {args.workdir}/reference.out')
    print(f'reference: {total_steps} training steps')

    done_kills, attempts = 0, 0
    with open(os.path.join(args.workdir, 'faulty.out'), 'w') as log:
        while done_kills < args.kills and attempts < args.kills * 3:
            attempts += 1
            kill_after = rng.randint(1, max(1, total_steps // (args.kills + 1)))
            t = time.time()
            rc, steps = run_once(command(train_args, test_dir, args.nproc, args.entry), kill_after=kill_after, sig=sig,
                                 log=log, timeout=args.run_timeout)
            if rc == 0:
                break  # finished before the kill point
            done_kills += 1
            print(f'kill {done_kills}: SIG{args.signal} after {kill_after} steps of this attempt '
                  f'(exit {rc}, {time.time() - t:.1f}s)')
        rc, _ = run_once(command(train_args, test_dir, args.nproc, args.entry), log=log, timeout=args.run_timeout)
    if rc != 0:
        raise SystemExit(f'final restart failed (exit {rc}): see {args.workdir}/faulty.out')
    problems = compare(ref_dir, test_dir)
    if problems:
        print('NOT identical after', done_kills, 'kills:')
        for pr in problems:
            print('  ' + pr)
        return 1
    print(f'identical: final checkpoint and log.txt match the uninterrupted run after {done_kills} kills')
    return 0


if __name__ == '__main__':
    sys.exit(main())
