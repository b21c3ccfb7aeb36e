"""bench_e2e.py ends its training processes (the whole tree) when it is interrupted or times out."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import fault_inject  # noqa: E402

# long enough to be running when it is interrupted; loader workers give the tree a second level
LONG = ['--data_set', 'SYNTH', '--synth_classes', '2', '--synth_per_class', '64', '--synth_image_size', '72',
        '--model', 'resnet18', '--curriculum', 'etpp', '--base_input_size', '64', '--epochs', '200',
        '--batch_size', '4', '--device', 'cpu', '--num_workers', '1', '--pin_mem', 'false']


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _start(extra=()):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_e2e.py'), *extra, *LONG],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _watch(proc, send=None, limit=90):
    """Every pid seen below proc until it exits; `send` goes to it once its training process has a
    loader worker (the tree is two deep)."""
    seen, sent, t0 = set(), False, time.time()
    while proc.poll() is None and time.time() - t0 < limit:
        below = fault_inject._descendants(proc.pid)
        seen.update(below)
        if send is not None and not sent and len(below) >= 2:
            os.kill(proc.pid, send)
            sent = True
        time.sleep(0.1)
    return seen, sent


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='needs /proc to list process trees')
@pytest.mark.parametrize('how', ['sigterm', 'ctrl-c', 'timeout'])
def test_bench_e2e_ends_its_training_processes(how):
    proc = _start(['--run_timeout', '12'] if how == 'timeout' else [])
    try:
        seen, sent = _watch(proc, {'sigterm': signal.SIGTERM, 'ctrl-c': signal.SIGINT}.get(how))
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            fault_inject.signal_run(proc, signal.SIGKILL)
            proc.wait()
    assert len(seen) >= 2, out[-2000:]  # the training process and its loader worker
    assert proc.returncode != 0
    if how == 'timeout':
        assert '--run_timeout' in out
    else:
        assert sent
    deadline = time.time() + 10
    while any(_alive(p) for p in seen) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in seen if _alive(p)], out[-2000:]
