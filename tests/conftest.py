import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope='module')
def one_intra_op_thread():
    """For modules of tiny tensors: intra-op threads only add synchronisation, and on a busy
    2-core machine their spin-waiting costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def replay_curriculum(tmp_path):
    """(argv without --curriculum) -> argv training two replayed stages below base 64, one data
    epoch each at --epochs 2 (B=32 m1, B=48 m5; replay 2, buffer 2 loader batches), so a kill
    anywhere lands in a stage whose replay buffer is rebuilt on resume."""
    path = tmp_path / 'replay.json'
    path.write_text(json.dumps({'progress': 'epochs', 'stages': [
        {'share': 0.5, 'size': 32, 'magnitude': 1, 'replay_times': 2, 'buffer_size': 2},
        {'share': 0.5, 'size': 48, 'magnitude': 5, 'replay_times': 2, 'buffer_size': 2}]}))

    def argv(args):
        args = list(args)
        i = args.index('--curriculum')
        del args[i:i + 2]
        return args + ['--curriculum_file', str(path), '--epochs', '2']
    return argv


def _needs_cuda(item):
    """Whether a test needs a CUDA device: marked `cuda`, or skipped without one (a skipif whose
    reason names CUDA, the convention of the tests written before the marker)."""
    if item.get_closest_marker('cuda') is not None:
        return True
    return any('cuda' in str(m.kwargs.get('reason', '')).lower() for m in item.iter_markers('skipif'))


def pytest_collection_modifyitems(config, items):
    """Every test that needs a CUDA device carries the `cuda` marker, so `pytest -m cuda` (the GPU
    suite's first step) selects all of them, new ones included; without a device they skip."""
    skip = pytest.mark.skip(reason='needs a CUDA device (marked cuda)')
    for item in items:
        if _needs_cuda(item):
            item.add_marker('cuda')
            if not torch.cuda.is_available():
                item.add_marker(skip)
