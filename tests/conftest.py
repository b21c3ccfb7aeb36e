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
