"""A corrupt image, read by a DataLoader worker or not, in training or evaluation: one line naming the
file and the fix, exit 2, within seconds, no process left behind (issue 11).

Each run is a real `python main.py` in a session of its own, bounded by a timeout after which the
whole session is killed: the failure this guards against is a run that never exits.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 90  # a healthy failing run takes ~4 s (mostly imports); a hung one is killed at this point


def session_alive(sid, marker=None):
    """Processes still running (zombies are dead, only not yet reaped) of session `sid`, or whose
    command line holds `marker` (torchrun starts its workers in sessions of their own; forked
    loader workers keep their parent's command line)."""
    alive = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read().decode(errors='replace')
        except (FileNotFoundError, ProcessLookupError):
            continue
        # fields after the name: state ppid pgrp session ...
        if fields[0] != 'Z' and (int(fields[3]) == sid or (marker and marker in cmdline)):
            alive.append(int(pid))
    return alive


def run_main(argv, timeout=TIMEOUT):
    marker = argv[argv.index('--output_dir') + 1] if '--output_dir' in argv else None
    """(rc, stdout, stderr, seconds) of main.py; the whole session is killed if it outlives timeout."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    t0 = time.time()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + argv, cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f'main.py still running after {timeout}s (hung); stderr tail: {err[-2000:]}')
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    seconds = time.time() - t0
    # nothing of the run may survive it (loader workers included)
    deadline = time.time() + 5
    while session_alive(p.pid, marker) and time.time() < deadline:
        time.sleep(0.1)
    left = session_alive(p.pid, marker)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f'processes {left} of the run outlived it')
    return p.returncode, out, err, seconds


def make_folder(root, bad_split):
    """root/{train,val}/{a,b}/*.jpg with the second JPEG of class a in bad_split cut in half."""
    for split, n in (('train', 8), ('val', 4)):
        for c in ('a', 'b'):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                Image.new('RGB', (40, 40), (i * 30, 80 if c == 'a' else 200, 160)).save(
                    os.path.join(root, split, c, f'{i}.jpg'), quality=90)
    bad = os.path.join(root, bad_split, 'a', '1.jpg')
    data = open(bad, 'rb').read()
    with open(bad, 'wb') as f:
        f.write(data[: len(data) // 2])
    return bad


def args_for(root, out, extra=()):
    return ['--data_set', 'IMNET', '--data_path', str(root), '--model', 'test_convnext', '--input_size', '32',
            '--batch_size', '4', '--device', 'cpu', '--num_workers', '2', '--epochs', '1', '--print_freq', '100',
            '--output_dir', str(out)] + list(extra)


def assert_one_line_error(rc, err, bad, fix):
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith('error: ') and bad in lines[0] and fix in lines[0]
    assert 'Traceback' not in err and 'Caught' not in err


def test_truncated_training_jpeg_with_two_workers(tmp_path):
    bad = make_folder(tmp_path / 'data', 'train')
    rc, out, err, seconds = run_main(args_for(tmp_path / 'data', tmp_path / 'out'))
    assert_one_line_error(rc, err, bad, '--skip_bad_images true')
    assert seconds < 60
    # it failed before finishing the epoch: no checkpoint
    assert not [n for n in os.listdir(tmp_path / 'out') if n.endswith('.pth')]


def test_truncated_validation_jpeg_with_two_workers_in_training(tmp_path):
    bad = make_folder(tmp_path / 'data', 'val')
    rc, out, err, seconds = run_main(args_for(tmp_path / 'data', tmp_path / 'out'))
    assert_one_line_error(rc, err, bad, 'remove or replace it')
    assert seconds < 60
    assert not [n for n in os.listdir(tmp_path / 'out') if n.endswith('.pth')]


def test_truncated_validation_jpeg_with_two_workers_in_eval(tmp_path):
    # --eval true: the same one line (evaluating a freshly built model's weights)
    bad = make_folder(tmp_path / 'data', 'val')
    import timm
    ckpt = tmp_path / 'weights.pth'
    torch.save({'model': timm.create_model('test_convnext', num_classes=2).state_dict()}, ckpt)
    rc, out, err, seconds = run_main(args_for(tmp_path / 'data', tmp_path / 'eval',
                                              ['--eval', 'true', '--resume', str(ckpt)]))
    assert_one_line_error(rc, err, bad, 'remove or replace it')


class _SigtermProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM while the run trains
            return torch.tensor(os.getpid())
        time.sleep(60)
        return torch.tensor(-1)


def test_worker_sigterm_policy():
    """Workers ignore SIGTERM while the run trains (the parent's SIGTERM recovery needs them) and end
    on it once the run is leaving: checked in the worker of a real DataLoader."""
    import functools

    from pipelines import datasets
    datasets.hold_workers()
    loader = torch.utils.data.DataLoader(_SigtermProbe(), batch_size=1, num_workers=1,
                                         worker_init_fn=functools.partial(datasets._worker_init,
                                                                          leaving=datasets._LEAVING))
    it = iter(loader)
    try:
        worker = int(next(it))  # the worker survived its SIGTERM
        datasets.release_workers()
        t0 = time.time()
        os.kill(worker, signal.SIGTERM)  # as multiprocessing's exit handler does
        with pytest.raises(RuntimeError, match='exited unexpectedly'):
            next(it)
        assert time.time() - t0 < 30
    finally:
        datasets.hold_workers()
        del it


def _reentered_worker(leaving, rounds):
    """A loader worker whose SIGTERM handler gets a second SIGTERM at every step it takes (a
    scheduler's signal, then torchrun's to the worker's process group, while the first is handled)."""
    from pipelines import datasets
    datasets._worker_init(0, leaving)
    handler = signal.getsignal(signal.SIGTERM)
    state = {'depth': 0, 'sent': 0}

    def each_step(frame, event, arg):
        if state['depth'] == 1 and state['sent'] < rounds:
            state['sent'] += 1
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, inside the outer handler

    def traced(signum, frame):
        state['depth'] += 1
        previous = sys.getprofile()
        sys.setprofile(each_step if state['depth'] == 1 else None)
        try:
            handler(signum, frame)
        finally:
            sys.setprofile(previous)
            state['depth'] -= 1

    signal.signal(signal.SIGTERM, traced)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(7 if state['sent'] else 8)  # 7: the handler came back although re-entered


def test_worker_sigterm_handler_survives_a_second_sigterm_inside_it():
    """The worker's SIGTERM handler re-entered at each of its steps still returns, and the parent can
    then release its workers (a lock taken in the handler deadlocked both: reproduced with
    multiprocessing.Event)."""
    import multiprocessing
    import threading

    from pipelines import datasets
    leaving = datasets.SharedFlag()  # not the module's flag: a deadlock must not reach this process's exit
    p = multiprocessing.get_context('fork').Process(target=_reentered_worker, args=(leaving, 200), daemon=True)
    p.start()
    p.join(30)
    try:
        assert p.exitcode == 7, f'worker stuck in its SIGTERM handler (exit code {p.exitcode})'
    finally:
        if p.exitcode is None:
            p.kill()
            p.join()
    releasing = threading.Thread(target=leaving.set, daemon=True)
    releasing.start()
    releasing.join(10)
    assert not releasing.is_alive(), 'release_workers blocked'
    assert leaving.is_set()


def test_bad_image_on_one_rank_ends_every_rank_under_torchrun(tmp_path):
    """gloo, 2 processes: the rank that reads the file prints the one line and exits 2; torchrun
    then ends the other rank (blocked in, or failing out of, a collective) and reports rank failure."""
    bad = make_folder(tmp_path / 'data', 'train')
    port = 29500 + os.getpid() % 1000
    env = dict(os.environ, OMP_NUM_THREADS='1')
    argv = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
            os.path.join(ROOT, 'main.py')] + args_for(tmp_path / 'data', tmp_path / 'out', ['--num_workers', '1'])
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f'torchrun still running after {TIMEOUT}s: {out[-3000:]}')
    assert p.returncode != 0
    errors = [ln for ln in out.splitlines() if ln.startswith('error: ')]
    assert errors and bad in errors[0] and '--skip_bad_images true' in errors[0], out[-3000:]
    assert 'exitcode  : 2' in out  # torchrun's report names the failing rank's exit 2
    deadline = time.time() + 10
    while session_alive(p.pid, str(tmp_path)) and time.time() < deadline:
        time.sleep(0.1)
    assert not session_alive(p.pid, str(tmp_path))
