"""--cuda_graph on a real GPU (skipped without one): the captured step computes what the eager step does,
skips a non-finite update on the device, sees lr changes, and with fp16 loss scaling captures and trains.
Seconds on any GPU: the first check for a session that has one."""
import pytest
import torch

import utils
from engine import TrainStep
from optim_factory import apply_hparams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (CUDA graph capture)')

POISON = 5


def _batches(n=9):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        x = torch.randn(8, 3, 16, 16, generator=g)
        if i == POISON:
            x[0, 0, 0, 0] = float('nan')
        out.append((x.cuda(), torch.randint(0, 5, (8,), generator=g).cuda()))
    return out


class _MeanPool(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _train(graph, update_freq=1, fp16=False, opt='adamw'):
    torch.manual_seed(0)
    # a mean over the pixels, not AdaptiveAvgPool2d: its CUDA backward adds atomically (not deterministic)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _MeanPool(),
                                torch.nn.Linear(8, 5)).cuda()
    if opt == 'adamw':
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.05, fused=True)
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), optimizer, utils.LossScaler('cuda', enabled=fp16),
                     torch.device('cuda'), update_freq=update_freq, max_norm=1.0, cuda_graph=graph, graph_warmup=2,
                     amp_dtype=torch.float16 if fp16 else None)
    step.begin_epoch(0)
    step.zero_grad()
    snapshots = []
    for it, (x, y) in enumerate(_batches(9 * update_freq)):
        if it % update_freq == 0:
            apply_hparams(optimizer, 1e-2 / (1 + it), 0.05)  # a new lr every update: replays must see it
        update = (it + 1) % update_freq == 0
        step.run(x, y, y, update, it)
        if update:
            snapshots.append([p.detach().clone() for p in model.parameters()])
    torch.cuda.synchronize()
    return step, snapshots


@pytest.mark.parametrize('update_freq', [1, 2])
@pytest.mark.parametrize('opt', ['adamw', 'sgd'])
def test_captured_step_matches_the_eager_one(monkeypatch, update_freq, opt):
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    eager, ref = _train(False, update_freq, opt=opt)
    step, got = _train(True, update_freq, opt=opt)
    assert step.cuda_graph and step.graph_note is None, step.graph_note
    assert len(step._graphs) == (1 if update_freq == 1 else 2)
    for a, b in zip(ref, got):
        for p, q in zip(a, b):
            # a replay that missed an lr change would be off by ~1e-3
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    # the poisoned micro-step's update changed nothing, and the step is reported
    bad_update = POISON // update_freq  # the update holding the poisoned micro-step
    for p, q in zip(got[bad_update - 1], got[bad_update]):
        assert torch.equal(p, q)
    assert int(step.bad_step) == POISON and int(eager.bad_step) == POISON


def test_fp16_loss_scaling_is_captured_and_trains():
    step, got = _train(True, fp16=True)
    assert step.cuda_graph and len(step._graphs) == 1, step.graph_note
    assert all(torch.isfinite(p).all() for p in got[-1])
    assert not all(torch.equal(p, q) for p, q in zip(got[-2], got[-1]))
    assert torch.isfinite(step.loss_scaler._scaler._scale).all()
    for p, q in zip(got[POISON - 1], got[POISON]):
        assert torch.equal(p, q)


def _end_to_end_argv(tmp_path, device):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    for k in range(96):
        d = root / f'c{k % 3}'
        d.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(70, 110)), int(rng.integers(70, 110))
        img = (rng.random((h, w, 3)) * 64 + np.linspace(0, 180, w)[None, :, None]).astype(np.uint8)
        Image.fromarray(img).save(d / f'{k}.jpg', quality=90)
    return ['--data_set', 'image_folder', '--data_path', str(root), '--eval_data_path', str(root),
            '--model', 'resnet18', '--curriculum', 'none', '--input_size', '64', '--epochs', '2',
            '--batch_size', '8', '--device', device, '--num_workers', '2', '--pin_mem', 'true',
            '--data_pipeline', 'gpu', '--gpu_prefetch', 'true', '--cuda_graph', 'true', '--use_amp', 'true',
            '--model_ema', 'true', '--print_freq', '4', '--output_dir', str(tmp_path / 'out'), '--log_dir', 'none',
            '--save_ckpt_freq', '1']


def test_training_run_captures_next_to_the_loader_and_prefetch_threads(tmp_path, capsys):
    """main.py end to end: the capture happens while the DataLoader's pin-memory thread and the gpu data
    path's prefetch thread work (thread_local capture mode, a capture stream of its own), with fp16
    scaling and the EMA in the graph; the run trains, evaluates and checkpoints."""
    import json
    import main as main_mod
    main_mod.main(main_mod.get_args_parser().parse_args(_end_to_end_argv(tmp_path, 'cuda')))
    out = capsys.readouterr().out
    assert 'CUDA graph captured: input (8, 3, 64, 64), update step' in out, out[-3000:]
    assert 'capture failed' not in out and 'not captured' not in out and 'kept on the CPU' not in out
    log = [json.loads(line) for line in open(tmp_path / 'out' / 'log.txt')]
    assert len(log) == 2 and all(r['train_loss'] == r['train_loss'] for r in log)  # finite, not NaN
    assert (tmp_path / 'out' / 'checkpoint-1.pth').exists()
