"""--cuda_graph on a real GPU (skipped without one): the captured step computes what the eager step does,
skips a non-finite update on the device, sees lr changes, and with fp16 loss scaling captures and trains.
Seconds on any GPU: the first check for a session that has one."""
import os

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


# ---------------------------------------------------------------------------
# issue 18: a failed capture leaves the allocator as it was; every micro-step's loss is checked
# ---------------------------------------------------------------------------

class _SyncsUnderCapture(torch.nn.Module):
    """A model whose forward reads a value on the host: fine eagerly, illegal in a capture."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x)
        if float(x.abs().amax()) > 1e30:  # a host read: cudaErrorStreamCaptureUnsupported in a capture
            x = x * 0
        return self.fc(x.mean((2, 3)))


def _prefetched(n, shape=(64, 3, 128, 128)):
    """Batches made on another stream and record_stream()ed onto the current one, as the gpu data path's
    DevicePrefetcher hands them over: a block the allocator may free only after both streams' uses."""
    side = torch.cuda.Stream()
    current = torch.cuda.current_stream()
    for _ in range(n):
        with torch.cuda.stream(side):
            x = torch.randn(shape, device='cuda')
            y = torch.randint(0, 5, (shape[0],), device='cuda')
        current.wait_stream(side)
        x.record_stream(current)
        y.record_stream(current)
        yield x, y


def _failed_capture_memory(where, release=True):
    """(reserved MiB after the first two eager steps that follow a failed capture, after 20 more, batch MiB).

    The first two: in training the updates before the capture ran on the capture's side stream, and
    the caching allocator keeps freed blocks per stream, so the first eager steps on the training
    stream take their own blocks once (on an H200, torch 2.11: 424 -> 448 MiB, two 12-MiB batches,
    when measured from the failure itself).  A leak grows with every step after them."""
    import engine
    torch.manual_seed(0)
    model = _SyncsUnderCapture().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), optimizer, utils.LossScaler('cuda', enabled=False),
                     torch.device('cuda'), cuda_graph=True, graph_warmup=1)
    if not release:  # the control: what torch alone leaves behind
        engine.release_failed_capture = lambda graph, pool, device: engine._FAILED_GRAPHS.append(graph)
    step.zero_grad()
    if where == 'trial':
        step.warm_up((64, 3, 128, 128), 5)
    batches = _prefetched(24)
    for it in range(2):  # in training: an eager warm-up update, then the capture (which fails)
        if where == 'training' or it == 0:
            x, y = next(batches)
            step.run(x, y, y, True, it)
            del x, y
    assert not step.cuda_graph and 'failed' in step.graph_note, step.graph_note
    for it in range(2, 4):
        x, y = next(batches)
        step.run(x, y, y, True, it)
        del x, y
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    for it in range(4, 24):
        x, y = next(batches)
        step.run(x, y, y, True, it)
        del x, y
    torch.cuda.synchronize()
    return before / 2 ** 20, torch.cuda.memory_reserved() / 2 ** 20, 64 * 3 * 128 * 128 * 4 / 2 ** 20


@pytest.mark.parametrize('where', ['trial', 'training'])
def test_a_failed_capture_leaves_no_leak(where):
    """Issue 18, 2a: after a capture fails (the trial capture before training, or one in training), 20 eager
    steps on record_stream()ed batches keep the reserved memory within 5% (torch 2.11 alone leaks about one
    batch per step: test_the_leak_is_real_without_the_release)."""
    before, after, batch = _failed_capture_memory(where)
    assert after <= 1.05 * before, (before, after, batch)


def test_the_leak_is_real_without_the_release():
    """The control of the test above, in a child process (it leaves its allocator broken): without
    engine.release_failed_capture, torch that leaves the failed capture listed (2.11) leaks a batch per
    step; a torch that ends it itself (newer) does not, and then the release has nothing to do."""
    import json
    import subprocess
    import sys
    code = (
        'import json, os, sys, torch\n'
        'sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]\n'
        'import test_cuda_graph as t, engine\n'
        'before, after, batch = t._failed_capture_memory("training", release=False)\n'
        'print(json.dumps({"before": before, "after": after, "batch": batch, "torch": torch.__version__}), flush=True)\n'
        'os._exit(0)\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    grew = r['after'] - r['before']
    # torch <= 2.11: about one batch per step (20 steps); newer torch: nothing to leak
    assert grew >= 10 * r['batch'] or grew <= 0.05 * r['before'], r


def test_captured_accumulation_checks_every_micro_steps_loss(monkeypatch):
    """Issue 18, 2b: update_freq 2, both graphs captured; a NaN loss (with finite gradients) in the replayed
    accumulation micro-step skips the update made by the update graph."""
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _MeanPool(),
                                torch.nn.Linear(8, 5)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ce = torch.nn.CrossEntropyLoss()

    def criterion(out, y):  # a negative target: NaN loss, finite gradient (decided on the device)
        return ce(out, y.clamp(min=0)) + torch.where((y < 0).any(), float('nan'), 0.0)
    step = TrainStep(model, criterion, optimizer, utils.LossScaler('cuda', enabled=False), torch.device('cuda'),
                     update_freq=2, cuda_graph=True, graph_warmup=1)
    step.zero_grad()
    weights = []
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 16, 16, generator=g).cuda(), torch.randint(0, 5, (8,), generator=g).cuda())
               for _ in range(10)]
    for it, (x, y) in enumerate(batches):
        if it == 6:  # an accumulation micro-step, replayed (graphs captured at 2 and 3)
            y = y.clone()
            y[0] = -1
        update = it % 2 == 1
        step.run(x, y, y.clamp(min=0), update, it)
        if update:
            weights.append([p.detach().clone() for p in model.parameters()])
    torch.cuda.synchronize()
    assert step.cuda_graph and len(step._graphs) == 2, step.graph_note
    assert all(torch.equal(p, q) for p, q in zip(weights[2], weights[3]))  # update of micro-steps 6, 7
    assert not all(torch.equal(p, q) for p, q in zip(weights[3], weights[4]))
    assert int(step.bad_step) == 6
