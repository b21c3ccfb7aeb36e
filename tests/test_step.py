"""The training step object (engine.TrainStep): host reads, skipping non-finite updates on the device,
the CUDA-graph flag's CPU behaviour, and the reads-per-step target of issue 12."""
import contextlib
import io

import pytest
import torch

import engine
import main as main_mod
import runner.loop as runner_loop
from runner.checkpoint import plain_lr
from runner.stage import warm_shape
import utils
from engine import TrainStep, TrainingDiverged, train_one_epoch

# Every way a tensor's value reaches Python: each is a host read (a device sync on a GPU).
READS = ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__', 'numpy', '__format__')


@contextlib.contextmanager
def counting_reads():
    counter = {'n': 0}
    saved = {}
    for name in READS:
        original = getattr(torch.Tensor, name)
        saved[name] = original

        def wrapper(self, *a, _original=original, **k):
            counter['n'] += 1
            return _original(self, *a, **k)
        setattr(torch.Tensor, name, wrapper)
    try:
        yield counter
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


TINY = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '40', '--synth_val_per_class', '2',
        '--synth_image_size', '36', '--input_size', '32', '--model', 'resnet18', '--batch_size', '4',
        '--device', 'cpu', '--num_workers', '1', '--epochs', '2', '--print_freq', '20', '--warmup_epochs', '1',
        '--model_ema', 'true', '--clip_grad', '1.0', '--pin_mem', 'false', '--aa', 'none', '--log_dir', 'none']


def test_host_reads_per_step_on_a_tiny_synth_run(monkeypatch, one_intra_op_thread):
    """Issue 12's target: at most 0.3 host reads of tensor values per step with --print_freq 20."""
    seen = {'reads': 0, 'steps': 0}
    real = runner_loop.train_one_epoch

    def counted(step, loader, epoch, **kw):
        # loader workers are other processes: the count is the training loop's own
        with counting_reads() as c:
            out = real(step, loader, epoch, **kw)
        seen['reads'] += c['n']
        seen['steps'] += len(loader)
        return out

    monkeypatch.setattr(runner_loop, 'train_one_epoch', counted)
    with contextlib.redirect_stdout(io.StringIO()):
        main_mod.main(main_mod.get_args_parser().parse_args(TINY + ['--disable_eval', 'true']))
    assert seen['steps'] == 80
    per_step = seen['reads'] / seen['steps']
    print(f'{seen["reads"]} host reads in {seen["steps"]} steps: {per_step:.3f} per step')
    assert per_step <= 0.3, f'{seen["reads"]} host reads in {seen["steps"]} steps'
    assert seen['reads'] > 0  # the prints and the epoch end do read


def _tiny_step(opt='adamw', lr=0.1, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    params = model.parameters()
    if opt == 'adamw':
        optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    elif opt == 'sgd_plain':
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)  # no fused kernel: the restore path
    else:
        raise ValueError(opt)
    scaler = utils.LossScaler('cpu', enabled=False)
    return TrainStep(model, torch.nn.CrossEntropyLoss(), optimizer, scaler, torch.device('cpu'), **kw)


class Loader:
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _batches(n, poison_at=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, 2, 2, generator=g)
        if i == poison_at:
            x[0, 0, 0, 0] = float('nan')
        out.append((x, torch.randint(0, 3, (4,), generator=g)))
    return out


@pytest.mark.parametrize('opt', ['adamw', 'sgd_plain'])
def test_non_finite_loss_is_skipped_on_the_device_and_reported_at_the_next_read(opt):
    step = _tiny_step(opt, model_ema=None)
    weights = []

    def on_update(done, meters, stop):
        weights.append([p.detach().clone() for p in step.model.parameters()])

    with pytest.raises(TrainingDiverged) as e, contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(step, Loader(_batches(6, poison_at=2)), 5, hparams_at=lambda f: (0.1, 0.0),
                        print_freq=4, on_update=on_update)
    msg = str(e.value)
    assert 'epoch 5' in msg and 'step 2/6' in msg and 'nan' in msg
    # the read at step 4 raised: steps 2..4 ran, and the poisoned update changed nothing
    assert len(weights) == 5
    for a, b in zip(weights[1], weights[2]):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in step.model.parameters())
    # later finite updates go on (the run stops at the read, not at the bad step)
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))


def test_ema_never_sees_a_skipped_update():
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ema = ModelEmaV3(model, decay=0.5)
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), torch.optim.AdamW(model.parameters(), lr=0.1, fused=True),
                     utils.LossScaler('cpu', enabled=False), torch.device('cpu'), model_ema=ema)
    with pytest.raises(TrainingDiverged), contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(step, Loader(_batches(3, poison_at=0)), 0, hparams_at=lambda f: (0.1, 0.0), print_freq=2)
    assert all(torch.isfinite(p).all() for p in ema.module.parameters())


def test_fp16_scaler_overflow_is_a_skip_not_a_divergence():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            return x.flatten(1)[:, :3] * self.w

    scaler = utils.LossScaler('cpu', enabled=True)
    step = TrainStep(M(), lambda out, y: (out * torch.tensor([1e38, 1.0, 1.0])).sum(1).mean(),
                     torch.optim.AdamW([w], lr=0.1, fused=True), scaler, torch.device('cpu'))
    x = torch.ones(2, 3, 2, 2)
    out = step.run(x, torch.zeros(2, dtype=torch.long), None, True, 0)
    assert torch.isfinite(out['loss'])
    assert torch.equal(w.detach(), torch.ones(3))  # skipped on the device
    assert scaler._scaler.get_scale() < 65536.0  # and the scale backed off
    assert int(step.bad_step) == -1


def test_accumulation_matches_one_big_batch():
    """update_freq 2 of two half batches = one step on the whole batch (mean losses)."""
    batches = _batches(2)
    a = _tiny_step('sgd_plain', lr=0.5, update_freq=2)
    b = _tiny_step('sgd_plain', lr=0.5)
    with contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(a, Loader(batches), 0, hparams_at=lambda f: (0.5, 0.0), print_freq=100)
        x = torch.cat([batches[0][0], batches[1][0]])
        y = torch.cat([batches[0][1], batches[1][1]])
        train_one_epoch(b, Loader([(x, y)]), 0, hparams_at=lambda f: (0.5, 0.0), print_freq=100)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_cuda_graph_flag_on_cpu_says_why_in_one_line_and_trains_eagerly():
    step = _tiny_step(cuda_graph=True)
    assert not step.cuda_graph
    assert step.graph_note.startswith('--cuda_graph: not captured (cpu device')
    assert '\n' not in step.graph_note
    with contextlib.redirect_stdout(io.StringIO()):
        stats = train_one_epoch(step, Loader(_batches(4)), 0, hparams_at=lambda f: (0.1, 0.0), print_freq=2)
    assert stats['loss'] > 0


@pytest.mark.parametrize('kw, needle', [
    (dict(weight_decay_varies=True), 'weight decay'),
    (dict(compiled=True), '--compile'),
])
def test_graph_blockers(kw, needle):
    model = torch.nn.Linear(2, 2)
    why = engine.graph_blocker(model, torch.optim.AdamW(model.parameters(), fused=True), torch.device('cuda'), **kw)
    assert needle in why
    why = engine.graph_blocker(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cuda'))
    assert 'fused' in why
    assert engine.graph_blocker(model, torch.optim.AdamW(model.parameters(), fused=True),
                                torch.device('cuda')) is None


def test_metric_logger_keeps_tensors_until_read():
    log = utils.MetricLogger()
    with counting_reads() as c:
        for i in range(10):
            log.update(loss=torch.tensor(float(i)), lr=0.1)
        assert c['n'] == 0
        assert log.averages()['loss'] == pytest.approx(4.5)
        assert c['n'] == 1  # one transfer for all pending values
    assert log.state_dict()['loss'] == [45.0, 10.0]


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float('inf')


def test_non_finite_gradient_with_a_finite_loss_is_divergence_without_fp16_scaling():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 3)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return _InfGrad.apply(self.lin(x.flatten(1)))

    step = TrainStep(M(), torch.nn.CrossEntropyLoss(), torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True),
                     utils.LossScaler('cpu', enabled=False), torch.device('cpu'))
    before = [p.detach().clone() for p in lin.parameters()]
    with pytest.raises(TrainingDiverged, match='gradient norm is non-finite') as e, \
            contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(step, Loader(_batches(3)), 1, hparams_at=lambda f: (0.1, 0.0), print_freq=2)
    assert 'step 0/3' in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))


def test_warm_up_runs_the_shapes_and_changes_nothing_training_sees():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    model.train()
    step = TrainStep(model, SoftTargetCrossEntropy(), torch.optim.AdamW(model.parameters(), fused=True),
                     utils.LossScaler('cpu', enabled=False), torch.device('cpu'),
                     mixup_fn=Mixup(mixup_alpha=0.8, num_classes=5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step.warm_up((2, 3, 8, 8), 5, channels_last=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert not step.optimizer.state


@pytest.mark.parametrize('make', [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
], ids=['adamw_fused', 'sgd_fused'])
def test_fused_skip_leaves_weights_and_optimizer_state_untouched(make):
    """The found_inf attribute protocol (torch's Adam/SGD.step read optimizer.found_inf and pass it
    to the fused kernel, which returns early on exactly 1.0; Adam then takes the step count back):
    a NaN loss changes neither the weights nor exp_avg / exp_avg_sq / step / momentum_buffer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    opt = make(model.parameters())
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, utils.LossScaler('cpu', enabled=False),
                     torch.device('cpu'))
    assert step.fused_skip
    good, bad = _batches(3, poison_at=1)[:2]
    step.run(*good, None, True, 0)  # a real update first: the state exists and is non-trivial
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    out = step.run(*bad, None, True, 1)
    assert not torch.isfinite(out['loss'])
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
        assert p.grad is None  # gradients dropped as after any update
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    assert not hasattr(opt, 'found_inf') and not hasattr(opt, 'grad_scale')
    assert int(step.bad_step) == 1
    step.run(*good, None, True, 2)  # and a finite update after it moves on
    assert not all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))
    if 'step' in opt.state[model[1].weight]:
        assert float(opt.state[model[1].weight]['step']) == 2.0


def test_eager_update_keeps_gradient_memory_once_a_graph_is_captured():
    """A captured graph holds the gradients' addresses: an eager update of a shape not captured
    yet zeroes them in place instead of freeing them (set_to_none) for the allocator to reuse."""
    step = _tiny_step()
    x, y = _batches(1)[0]
    step.run(x, y, None, True, 0)
    assert all(p.grad is None for p in step.model.parameters())  # no graph: freed as usual
    step.run(x, y, None, False, 1)
    grads = [p.grad for p in step.model.parameters()]
    step._graphs[('pretend', 'captured')] = None
    step.run(x, y, None, True, 2)
    for p, g in zip(step.model.parameters(), grads):
        assert p.grad is g and not g.any()


class _FakeStream:
    def wait_stream(self, other):
        pass


def _fake_cuda(monkeypatch, fail_capture=False, torch_ends_routing=False):
    """torch.cuda's stream/graph calls of TrainStep's --cuda_graph path, faked so its Python side runs on a
    CPU.  As on a GPU, a capture computes nothing: its body runs (the Python side) and every value it wrote
    (weights, gradients, optimizer state, the loss record) is put back at its end; replay() runs the step's
    captured code again (_micro, and _update for an update graph) on the graph's static inputs.

    fail_capture: True, or a predicate of the capture's number (0, 1, ...): that capture raises in its
    __exit__ (capture_end).  The caching allocator's routing to the capture's pool is modelled as torch
    2.11 does it: begun at capture start, ended only by a capture that succeeds (torch_ends_routing=True:
    also by a failed one, as newer torch does)."""
    log = []
    routed = set()
    captures = []
    fails = fail_capture if callable(fail_capture) else (lambda n: fail_capture)

    class Graph:
        def replay(self):
            log.append('replay')
            step = _STATE['step']
            for key, (graph, static_in, static_out) in step._graphs.items():
                if graph is self:
                    loss, _ = step._micro(*static_in, key[-1], cache_enabled=False)
                    static_out['loss'].copy_(loss)  # a replay writes its outputs in place
                    if key[-1]:
                        static_out['grad_norm'].copy_(step._update(set_to_none=False, ema=step.ema_on_device))

        def reset(self):
            log.append('reset')

    class Capture:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode='global'):
            log.append(('capture', capture_error_mode, stream))
            self.pool, self.number = pool, len(captures)
            captures.append(self)

        def __enter__(self):
            routed.add(self.pool)
            self.saved = [(t, t.detach().clone()) for t in _tensors(_STATE['step'])]
            return None

        def __exit__(self, *exc):
            with torch.no_grad():
                for t, v in self.saved:
                    t.copy_(v)
            if fails(self.number) and exc[0] is None:
                if torch_ends_routing:
                    routed.discard(self.pool)
                raise RuntimeError('operation not permitted when stream is capturing')
            if exc[0] is None:
                routed.discard(self.pool)
            return False

    def end(index, pool):
        if pool not in routed:
            raise RuntimeError('endAllocatePool: not currently recording to mempool_id')
        routed.discard(pool)
        log.append(('endAllocateToPool', pool))

    class Generator:  # the device's default CUDA generator: its state copied before each capture
        def clone_state(self):
            return ('state before capture', len(captures))

        def graphsafe_set_state(self, state):
            log.append(('generator restored', state))

    gen = Generator()
    current, side = _FakeStream(), _FakeStream()
    monkeypatch.setattr(engine, '_generator_before_capture', lambda device: (gen, gen.clone_state()))
    monkeypatch.setattr(engine, 'graph_blocker', lambda *a, **k: None)
    monkeypatch.setattr(engine, '_capture_stream', lambda device: side)
    monkeypatch.setattr(engine, '_FAILED_GRAPHS', [])
    monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: current)
    monkeypatch.setattr(torch.cuda, 'set_stream', lambda s: log.append(('set_stream', s)))
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    monkeypatch.setattr(torch.cuda, 'graph_pool_handle', lambda: ('pool', len(captures)))
    monkeypatch.setattr(torch.cuda, 'CUDAGraph', Graph)
    monkeypatch.setattr(torch.cuda, 'graph', Capture)
    monkeypatch.setattr(torch._C, '_cuda_endAllocateToPool', end, raising=False)
    monkeypatch.setattr(torch._C, '_cuda_releasePool', lambda index, pool: log.append(('releasePool', pool)),
                        raising=False)
    monkeypatch.setattr(engine, '_is_ddp', lambda m: False)
    return log, current, side, routed


_STATE = {}


def _tensors(step):
    """Every tensor a step writes: weights, their gradients, the optimizer's state, the loss record."""
    opt = step.optimizer
    out = [step._loss_ok]
    for g in opt.param_groups:
        for p in g['params']:
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
            out.extend(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    return out


def _graphed_step(**kw):
    step = _tiny_step(cuda_graph=True, **kw)
    _STATE['step'] = step
    return step


@pytest.mark.parametrize('fail', [False, True], ids=['captured', 'capture_fails'])
def test_cuda_graph_capture_plumbing(monkeypatch, fail):
    """What a capture needs besides the kernels: eager warm-up updates on the side stream first, then lr in
    device tensors filled in place, capturable=True (Adam/AdamW refuse capture without it), gradients that
    stay allocated, thread-local capture mode; a failed capture restores all that and the stream, and
    hands the allocator back (routing to its pool ended, the pool's use released: issue 18)."""
    log, current, side, routed = _fake_cuda(monkeypatch, fail_capture=fail)
    step = _graphed_step(graph_warmup=2)
    opt = step.optimizer
    assert step.cuda_graph and step.graph_note is None
    x, y = _batches(1)[0]
    for it in range(2):  # the warm-up updates: eager, no capture yet
        step.run(x, y, None, True, it)
        assert not step._graphs and not log and isinstance(opt.param_groups[0]['lr'], float)
    out = step.run(x, y, None, True, 2)
    assert torch.isfinite(out['loss'])
    assert log[0] == ('capture', 'thread_local', side)
    if not fail:
        assert log[1:] == ['replay'] and len(step._graphs) == 1 and not routed
        lr = opt.param_groups[0]['lr']
        assert isinstance(lr, torch.Tensor) and opt.param_groups[0]['capturable']
        assert all(p.grad is not None and not p.grad.any() for p in step.model.parameters())
        engine.apply_hparams(opt, 0.25, 0.0)
        assert opt.param_groups[0]['lr'] is lr and float(lr) == 0.25  # filled in place: replays see it
        saved = plain_lr(opt.state_dict())['param_groups'][0]  # what a checkpoint holds
        assert type(saved['lr']) is float and saved['lr'] == 0.25 and saved['capturable'] is False
        assert opt.param_groups[0]['capturable']  # the checkpoint copy only
        step.zero_grad()
        assert all(p.grad is not None for p in step.model.parameters())  # in place: the graph holds them
    else:
        pool = ('pool', 0)
        assert log[1:6] == [('set_stream', current), 'reset', ('endAllocateToPool', pool), ('releasePool', pool),
                            ('generator restored', ('state before capture', 0))]
        assert not routed  # the allocator routes nothing to the failed capture's pool any more
        assert not step.cuda_graph and 'capture failed (RuntimeError: operation not permitted' in step.graph_note
        assert isinstance(opt.param_groups[0]['lr'], float) and not opt.param_groups[0]['capturable']
        before = [p.detach().clone() for p in step.model.parameters()]
        step.run(x, y, None, True, 3)  # eager from now on
        assert len(log) == 6
        assert not all(torch.equal(a, p) for a, p in zip(before, step.model.parameters()))


def test_a_failed_capture_gives_the_cuda_generator_its_state_back(monkeypatch):
    """A failed capture leaves torch 2.11's CUDA generator in capture mode, and every later eager random op
    on the device fails ("Offset increment outside graph capture", seen on an H200): the state copied
    before the capture is put back (graphsafe_set_state), and a generator that refuses stops the run."""
    calls = []

    class Gen:
        def clone_state(self):
            calls.append('clone')
            return 'copy'

        def graphsafe_set_state(self, state):
            calls.append(('set', state))

    monkeypatch.setattr(torch.cuda, 'default_generators', (Gen(), Gen()), raising=False)
    assert engine._generator_before_capture(torch.device('cpu')) is None
    saved = engine._generator_before_capture(torch.device('cuda', 1))
    assert calls == ['clone'] and saved[1] == 'copy'
    assert engine._restore_generator(saved) is None and calls[-1] == ('set', 'copy')
    assert engine._restore_generator(None) is None

    class Refuses(Gen):
        def graphsafe_set_state(self, state):
            raise RuntimeError('Expected a CUDA Generator')
    assert 'CUDA generator: RuntimeError: Expected a CUDA Generator' in engine._restore_generator((Refuses(), 'copy'))


def test_a_failed_capture_torch_already_cleaned_is_not_released_twice(monkeypatch):
    """Newer torch ends the routing (and releases the pool) itself: a second release would free a pool
    under live graphs, so endAllocateToPool's "not recording" means: nothing to give back."""
    log, current, side, routed = _fake_cuda(monkeypatch, fail_capture=True, torch_ends_routing=True)
    step = _graphed_step(graph_warmup=1)
    x, y = _batches(1)[0]
    step.run(x, y, None, True, 0)
    step.run(x, y, None, True, 1)
    assert not step.cuda_graph and not routed
    assert not any(e[0] in ('endAllocateToPool', 'releasePool') for e in log if isinstance(e, tuple))


@pytest.mark.parametrize('where', ['trial', 'training'])
def test_an_allocator_that_cannot_be_restored_stops_the_run_in_one_line(monkeypatch, where):
    log, current, side, routed = _fake_cuda(monkeypatch, fail_capture=True)

    def release(index, pool):
        raise RuntimeError('use_count INTERNAL ASSERT FAILED')
    monkeypatch.setattr(torch._C, '_cuda_releasePool', release, raising=False)
    step = _graphed_step(graph_warmup=1)
    x, y = _batches(1)[0]
    with pytest.raises(utils.UserError) as e:
        if where == 'trial':
            step.warm_up((4, 3, 2, 2), 3)
        else:
            step.run(x, y, None, True, 0)
            step.run(x, y, None, True, 1)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('--cuda_graph true: a CUDA graph capture failed')
    assert msg.endswith('rerun with --cuda_graph false')


@pytest.mark.parametrize('fail', [False, True], ids=['probe_passes', 'probe_fails'])
def test_a_trial_capture_before_training_decides_eager_or_graphed(monkeypatch, fail):
    """Issue 18, 2a: warm_up (before a stage's first batch) captures the forward and backward once into a
    throw-away graph and pool; a failure there gives the allocator back and trains eagerly from the start,
    and either way nothing of training changed (weights, gradients, the random stream)."""
    log, current, side, routed = _fake_cuda(monkeypatch, fail_capture=fail)
    step = _graphed_step()
    weights = [p.detach().clone() for p in step.model.parameters()]
    rng = torch.get_rng_state()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        step.warm_up((4, 3, 2, 2), 3)
    assert log[0] == ('capture', 'thread_local', side)
    assert _same(weights, [p.detach() for p in step.model.parameters()])
    assert all(p.grad is None for p in step.model.parameters())
    assert torch.equal(rng, torch.get_rng_state()) and not routed
    if fail:
        pool = ('pool', 0)
        assert ('endAllocateToPool', pool) in log and ('releasePool', pool) in log
        assert not step.cuda_graph
        assert step.graph_note.startswith('--cuda_graph: a trial capture before training failed (RuntimeError')
        assert out.getvalue() == step.graph_note + '\n'
    else:
        assert step.cuda_graph and step.graph_note is None and not step._graphs
    x, y = _batches(1)[0]
    step.run(x, y, None, True, 0)  # training starts (eagerly, or with the graph's warm-up updates)
    assert not _same(weights, [p.detach() for p in step.model.parameters()])


def test_warm_shape_is_given_to_graphed_steps_for_their_trial_capture(monkeypatch):
    from types import SimpleNamespace
    args = SimpleNamespace(channels_last=False)
    stage = SimpleNamespace(batch_size=8, size=96)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    plain = SimpleNamespace(device=torch.device('cuda'), warmed=False, cuda_graph=False)
    assert warm_shape(args, plain, stage, 10) is None  # nothing to tune
    graphed = SimpleNamespace(device=torch.device('cuda'), warmed=False, cuda_graph=True)
    assert warm_shape(args, graphed, stage, 10) == ((8, 3, 96, 96), 10, False)
    assert graphed.warmed and warm_shape(args, graphed, stage, 10) is None  # once per step


def _poisonable(criterion):
    """criterion, except that a batch with a negative target has a NaN loss whose gradient is finite (only
    the loss check can tell); decided on the device, so a captured graph sees it per replay."""
    def loss(out, y):
        bad = (y < 0).any()
        return criterion(out, y.clamp(min=0)) + torch.where(bad, float('nan'), 0.0)
    return loss


def _accumulate(monkeypatch, graph, fail=None, update_freq=3, n=12, poison_loss_at=()):
    """n micro-steps of update_freq with a fake capture (graph) or eagerly; the weights after each update."""
    if graph:
        _fake_cuda(monkeypatch, fail_capture=fail or False)
    torch.manual_seed(0)
    step = _graphed_step(graph_warmup=1, update_freq=update_freq) if graph else _tiny_step(update_freq=update_freq)
    step.criterion = _poisonable(step.criterion)
    weights = []
    with contextlib.redirect_stdout(io.StringIO()):
        for it, (x, y) in enumerate(_batches(n)):
            if it in poison_loss_at:
                y = y.clone()
                y[0] = -1
            if it % update_freq == 0:
                engine.apply_hparams(step.optimizer, 0.1, 0.0)
            update = (it + 1) % update_freq == 0
            step.run(x, y, None, update, it)
            if update:
                weights.append([p.detach().clone() for p in step.model.parameters()])
    return step, weights


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_capture_failing_mid_accumulation_keeps_the_gradients_accumulated(monkeypatch):
    """Issue 18, 2c: micro-steps 3 and 4 accumulate through the captured accumulation graph, the update
    graph's capture at micro-step 5 fails: the update still holds all three micro-steps, as the eager
    run's does."""
    _, eager = _accumulate(monkeypatch, graph=False)
    monkeypatch.undo()
    # captures: 0 = accumulation graph (micro-step 3), 1 = update graph (micro-step 5): fails
    step, got = _accumulate(monkeypatch, graph=True, fail=lambda n: n == 1)
    assert not step.cuda_graph and 'capture failed' in step.graph_note
    for a, b in zip(eager, got):
        for p, q in zip(a, b):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert not _same(eager[0], eager[1])


@pytest.mark.parametrize('graph', [False, True], ids=['eager', 'captured'])
def test_every_micro_steps_loss_decides_the_update(monkeypatch, graph):
    """Issue 18, 2b: a non-finite loss in any micro-step of an update skips the update, also when that
    micro-step is a replayed accumulation graph and the update another graph: the record is one device
    bool written in place, which both graphs share."""
    step, w = _accumulate(monkeypatch, graph=graph, poison_loss_at=(4,))  # micro-steps 3-5: update 1
    if graph:
        assert step.cuda_graph and len(step._graphs) == 2  # micro-step 4 was a replay
    assert _same(w[0], w[1])  # skipped
    assert not _same(w[1], w[2]) and not _same(w[2], w[3])  # later updates go on
    assert int(step.bad_step) == 4
    flag = step._loss_ok
    assert flag.dtype == torch.bool and bool(flag)  # reset in place by every update


def test_fused_sgd_skipped_first_update_leaves_a_zero_momentum():
    """A skipped first update of fused SGD with momentum: the next finite update is the first one, exactly
    (torch's fused kernel would have left torch.empty_like memory as the momentum buffer)."""
    good, bad = _batches(3, poison_at=1)[:2]
    runs = []
    for batches in ([bad, good], [good]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                              fused=True)
        step = TrainStep(model, torch.nn.CrossEntropyLoss(), opt, utils.LossScaler('cpu', enabled=False),
                         torch.device('cpu'))
        for it, b in enumerate(batches):
            step.run(*b, None, True, it)
        runs.append((list(model.parameters()), [opt.state[p]['momentum_buffer'] for p in model.parameters()]))
    for a, b in zip(*[params + bufs for params, bufs in runs]):
        assert torch.equal(a, b)


def test_ema_on_a_cuda_device_without_an_index_counts_as_on_the_device(monkeypatch):
    """--device cuda (no index) and an EMA on cuda:0 are the same device: the EMA goes into the graph."""
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    assert utils.resolved_device('cuda') == utils.resolved_device(torch.device('cuda', 0)) == torch.device('cuda', 0)
    assert utils.resolved_device('cuda:1') == torch.device('cuda', 1)
    assert utils.resolved_device('cpu') == torch.device('cpu')
