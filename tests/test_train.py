"""End-to-end runs of main.py on SYNTH, on CPU."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import main as main_mod
from runner.checkpoint import load_finetune
from pipelines.datasets import SynthDataset, eval_transform
from models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '48', '--synth_val_per_class', '16',
        '--synth_image_size', '40', '--input_size', '32', '--model', 'resnet18', '--batch_size', '32',
        '--device', 'cpu', '--num_workers', '0', '--print_freq', '100', '--warmup_epochs', '1', '--lr', '2e-3',
        '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--aa', 'none', '--pin_mem', 'false']


def run_main(argv):
    args = main_mod.get_args_parser().parse_args(argv)
    return main_mod.main(args)


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


ACC_RE = re.compile(r'\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('run'))
    run_main(TINY + ['--epochs', '4', '--output_dir', out])
    return out


def test_synth_run_learns(trained):
    log = read_log(trained)
    assert [r['epoch'] for r in log] == [0, 1, 2, 3]
    # 4 classes: chance is 25%
    assert log[-1]['test_acc1'] >= 45.0
    assert log[-1]['train_loss'] < log[0]['train_loss']
    for name in ('checkpoint-3.pth', 'checkpoint-best.pth', 'config.json'):
        assert os.path.exists(os.path.join(trained, name))
    assert os.listdir(os.path.join(trained, 'tensorboard'))
    rec = log[-1]
    for key in ('train_lr', 'test_acc5', 'n_parameters', 'stage', 'input_size', 'magnitude', 'progress'):
        assert key in rec
    cfg = json.load(open(os.path.join(trained, 'config.json')))
    assert cfg['args']['model'] == 'resnet18' and cfg['plan']['num_epochs'] == 4


def test_checkpoint_layout_and_rotation(trained):
    names = sorted(n for n in os.listdir(trained) if re.fullmatch(r'checkpoint-\d+\.pth', n))
    assert names == ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-3.pth']  # --save_ckpt_num 3
    from utils import load_checkpoint_file
    ckpt = load_checkpoint_file(os.path.join(trained, 'checkpoint-3.pth'))
    assert {'model', 'optimizer', 'epoch', 'scaler', 'args'} <= set(ckpt)
    assert ckpt['epoch'] == 3 and ckpt['args'].model == 'resnet18'
    assert not [n for n in os.listdir(trained) if n.startswith('.tmp')]


def test_eval_prints_acc_and_matches_direct_computation(trained, capsys):
    ckpt_path = os.path.join(trained, 'checkpoint-3.pth')
    stats = run_main(TINY + ['--eval', 'true', '--resume', ckpt_path])
    out = capsys.readouterr().out
    m = ACC_RE.search(out)
    assert m, out[-2000:]
    acc1, acc5, loss = map(float, m.groups())

    model = create_model('resnet18', num_classes=4)
    from utils import load_checkpoint_file
    model.load_state_dict(load_checkpoint_file(ckpt_path)['model'])
    model.eval()
    val = SynthDataset(num_classes=4, per_class=16, image_size=40, seed=0, split='val')
    tf = eval_transform(32)
    x = torch.stack([tf(val[i][0]) for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(x)
    direct1 = 100.0 * (logits.argmax(-1) == y).float().mean().item()
    direct_loss = F.cross_entropy(logits, y).item()
    assert acc1 == pytest.approx(direct1, abs=1e-3)
    assert loss == pytest.approx(direct_loss, abs=1e-3)
    assert acc5 == pytest.approx(100.0)  # 4 classes: top-5 covers them all
    assert stats['num_images'] == 64


def test_auto_resume_continues_with_same_lr(trained, tmp_path):
    out = str(tmp_path / 'resumed')
    os.makedirs(out)
    shutil.copy(os.path.join(trained, 'checkpoint-1.pth'), out)
    run_main(TINY + ['--epochs', '4', '--output_dir', out])
    resumed = read_log(out)
    full = read_log(trained)
    assert [r['epoch'] for r in resumed] == [2, 3]
    for a, b in zip(resumed, full[2:]):
        assert a['train_lr'] == pytest.approx(b['train_lr'], rel=1e-12)
        assert a['progress'] == b['progress']


def test_rerun_of_finished_run_does_nothing(trained, capsys):
    before = read_log(trained)
    run_main(TINY + ['--epochs', '4', '--output_dir', trained])
    assert read_log(trained) == before
    out = capsys.readouterr().out
    assert 'continuing at epoch 4' in out
    assert 'Nothing left to train: all 4 data epochs of the plan are done' in out and 'Start training' not in out


def test_finetune_drops_mismatched_head(trained, tmp_path, capsys):
    out = str(tmp_path / 'ft')
    argv = [a for a in TINY]
    argv[argv.index('--synth_classes') + 1] = '6'
    run_main(argv + ['--epochs', '1', '--output_dir', out, '--finetune',
                     os.path.join(trained, 'checkpoint-3.pth')])
    text = capsys.readouterr().out
    assert 'Dropped classifier weights' in text and 'fc.weight' in text and 'fc.bias' in text
    assert read_log(out)[0]['epoch'] == 0


def test_finetune_loads_backbone(trained):
    from utils import load_checkpoint_file
    src = load_checkpoint_file(os.path.join(trained, 'checkpoint-3.pth'))['model']
    model = create_model('resnet18', num_classes=6)
    load_finetune(main_mod.get_args_parser().parse_args(
        ['--finetune', os.path.join(trained, 'checkpoint-3.pth')]), model)
    assert torch.equal(model.conv1.weight, src['conv1.weight'])
    assert model.fc.weight.shape[0] == 6


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # torchrun's static rendezvous needs a real port (0 hangs)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           os.path.join(ROOT, 'main.py')] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes_gloo(trained, tmp_path):
    out = str(tmp_path / 'ddp')
    r = _torchrun(TINY + ['--epochs', '2', '--batch_size', '16', '--output_dir', out, '--model', 'test_convnext'])
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(out)
    assert [x['epoch'] for x in log] == [0, 1]
    assert os.path.exists(os.path.join(out, 'checkpoint-1.pth'))
    # only rank 0 prints the accuracy line
    assert len(ACC_RE.findall(r.stdout)) == 2
    assert log[-1]['test_num_images'] == 64

    # distributed evaluation agrees with the single-process one exactly (no padded duplicates)
    ckpt = os.path.join(trained, 'checkpoint-3.pth')
    r = _torchrun(TINY + ['--eval', 'true', '--resume', ckpt])
    assert r.returncode == 0, r.stderr[-3000:]
    single = run_main(TINY + ['--eval', 'true', '--resume', ckpt])
    acc1, _, loss = map(float, ACC_RE.search(r.stdout).groups())
    assert acc1 == pytest.approx(single['acc1'], abs=1e-3)
    assert loss == pytest.approx(single['loss'], abs=1e-3)
