"""One training epoch and one evaluation pass, with explicit arguments."""
import contextlib
import math
import time

import torch
import torch.nn.functional as F

import utils
from optim_factory import apply_hparams, device_lr, host_lr


class TrainingDiverged(RuntimeError):
    pass


def _autocast(device, amp_dtype, cache_enabled=True):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=cache_enabled)


def _is_ddp(model):
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def graph_blocker(model, optimizer, device, *, weight_decay_varies=False, compiled=False):
    """Why this step cannot be captured in a CUDA graph here, or None."""
    if device.type != 'cuda':
        return f'{device.type} device: CUDA graphs need a CUDA device'
    if compiled:
        return '--compile true: the compiled model is not captured by hand (use one or the other)'
    if _is_ddp(model):
        return ('DistributedDataParallel: its gradient buckets are built and all-reduced from the host, '
                'not captured here')
    if not getattr(optimizer, '_step_supports_amp_scaling', False):
        return (f'{type(optimizer).__name__} has no fused kernel taking a device-side lr and skip flag '
                f'(timm\'s Lamb, for one, keeps its step count and bias corrections on the host)')
    if weight_decay_varies:
        return '--weight_decay_end: a weight decay that changes every step would be frozen into the graph'
    return None


def _zero_momentum_buffers(optimizer):
    """Give fused SGD zero momentum buffers before its first step; True once nothing is left to do.

    torch's _fused_sgd makes the buffers of a first step with torch.empty_like and lets the
    kernel fill them; a skipped step (found_inf, e.g. an fp16 overflow at the initial scale)
    returns before that and SGD.step keeps the uninitialised memory as momentum.  With zero
    dampening a zero buffer gives the same first step (buf = grad).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    for g in optimizer.param_groups:
        if g['momentum'] == 0 or g['dampening'] != 0:
            continue
        for p in g['params']:
            if p.requires_grad and optimizer.state[p].get('momentum_buffer') is None:
                optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return True


class TrainStep:
    """One stage's training step: the objects a step needs, built once per stage.

    prepare() finishes a loaded batch on the device, eagerly, in the published order:
    device transform (the fast path's normalise + erasing; called as
    ``device_transform(samples, epoch, it)`` after ``samples.to(device)``), Fourier crop,
    replay, mixup (drawn on the host).  run() is the model step: forward and backward
    under autocast with loss scaling, and on the last micro-step of an update: unscale,
    clip, the optimizer step and the EMA.

    Nothing here reads a tensor on the host.  A non-finite loss (or gradient norm) skips
    the update on the device: fused torch optimizers take GradScaler's found_inf flag;
    others get their gradients zeroed and their parameters restored from a copy taken
    before the step (an fp16 GradScaler with such an optimizer keeps GradScaler's own
    skip, which reads its flag once per update).  The first step whose loss was
    non-finite is remembered on the device (bad_step) for the next read to report.

    With cuda_graph=True (CUDA only) the model step is captured per input shape after
    `graph_warmup` eager updates and replayed; lr lives in device tensors of the param
    groups (apply_hparams fills them).  The same _micro/_update code runs eagerly and
    inside the graph, so its logic is tested on the CPU.
    """

    def __init__(self, model, criterion, optimizer, loss_scaler, device, *, update_freq=1, max_norm=None,
                 model_ema=None, mixup_fn=None, amp_dtype=None, lowfreq=None, replay=None,
                 device_transform=None, stage_desc='', cuda_graph=False, graph_warmup=3,
                 weight_decay_varies=False, compiled=False):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.loss_scaler, self.device = loss_scaler, torch.device(device)
        self.update_freq, self.max_norm, self.model_ema = update_freq, max_norm, model_ema
        self.mixup_fn, self.amp_dtype, self.lowfreq, self.replay = mixup_fn, amp_dtype, lowfreq, replay
        self.device_transform, self.stage_desc = device_transform, stage_desc
        self.params = [p for g in optimizer.param_groups for p in g['params'] if p.requires_grad]
        self.fused_skip = bool(getattr(optimizer, '_step_supports_amp_scaling', False))
        self.scaler_skip = loss_scaler.enabled and not self.fused_skip
        self._snapshot = None
        # torch.device('cuda') != torch.device('cuda:0'): compare the resolved devices (a plain
        # --device cuda would otherwise leave the EMA out of the graph, "kept on the CPU")
        self.ema_on_device = model_ema is not None and \
            utils.resolved_device(next(model_ema.module.parameters()).device) == utils.resolved_device(self.device)
        self.graph_note = None
        self.cuda_graph = False
        if cuda_graph:
            why = graph_blocker(model, optimizer, self.device, weight_decay_varies=weight_decay_varies,
                                compiled=compiled)
            if why:
                self.graph_note = f'--cuda_graph: not captured ({why}); training goes on eagerly'
            else:
                self.cuda_graph = True
                if model_ema is not None and not self.ema_on_device:
                    self.graph_note = '--cuda_graph: the EMA is kept on the CPU and updated eagerly after each replay'
        self.graph_warmup = graph_warmup
        self._graphs = {}  # (shape, update) -> (graph, static inputs, static outputs)
        self._updates_seen = {}
        self._pool = None
        # this update's micro-steps so far all had a finite loss: one device bool written in
        # place, so a captured accumulation micro-step and the captured update share it
        self._loss_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._with_grad = self.params
        self._buffers_ready = False
        self.begin_epoch(0)

    # ------------------------------------------------------------------ bookkeeping
    def begin_epoch(self, epoch):
        """Reset the device-side divergence record for a new epoch."""
        self.epoch = epoch
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)

    def _track(self, loss, it, norm=None):
        """Remember (on the device) the first step of the epoch whose loss is not finite.

        Without fp16 loss scaling a non-finite gradient norm is divergence too (with it,
        an overflow the scaler skips and backs off from, as GradScaler always did).
        """
        bad = ~torch.isfinite(loss)
        if norm is not None and not self.loss_scaler.enabled:
            bad = bad | ~torch.isfinite(norm)
        first = (self.bad_step < 0) & bad
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, it), self.bad_step)
        self.bad_loss = torch.where(first, loss.float(), self.bad_loss)

    def diverged_error(self, bad_step, bad_loss, num_steps, elsewhere=False):
        what = 'loss is'
        if elsewhere:
            where = 'non-finite on another rank'
        elif math.isfinite(bad_loss):
            what, where = 'gradient norm is', f'non-finite (loss {bad_loss:.4g})'
        else:
            where = bad_loss
        stage = f' ({self.stage_desc})' if self.stage_desc else ''
        return TrainingDiverged(f'{what} {where} at epoch {self.epoch}, step {int(bad_step)}/{num_steps}{stage}: '
                                f'training diverged; lower --lr, enable --clip_grad, or use --amp_dtype bfloat16')

    # ------------------------------------------------------------------ the step
    def prepare(self, samples, targets, epoch, it):
        """The batch as the model sees it: (samples, targets, hard targets or None for accuracy)."""
        samples = samples.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.device_transform is not None:
            samples = self.device_transform(samples, epoch, it)
        if self.lowfreq is not None:
            samples = self.lowfreq(samples)
        if self.replay is not None:
            samples, targets = self.replay.step(samples, targets)
        hard = targets if self.mixup_fn is None else None
        if self.mixup_fn is not None:
            samples, targets = self.mixup_fn(samples, targets)
        return samples, targets, hard

    def _micro(self, samples, targets, hard, update, cache_enabled=True):
        """Forward and backward of one micro-batch; (loss, accuracy or None), on the device."""
        sync = self.model.no_sync() if (not update and hasattr(self.model, 'no_sync')) else contextlib.nullcontext()
        with sync:
            with _autocast(self.device, self.amp_dtype, cache_enabled):
                loss, output = self.forward_loss(self.model, samples, targets)
            self.loss_scaler.scale(loss / self.update_freq).backward()
        loss = loss.detach().float()
        self._loss_ok.logical_and_(torch.isfinite(loss))
        acc = None if hard is None else (output.detach().argmax(-1) == hard).float().mean()
        return loss, acc

    def forward_loss(self, model, samples, targets):
        """(loss, output) of `model` on a prepared batch: the criterion on its logits.  A step of
        another task (MAEStep) overrides this, dummy_batch and prepare, and keeps the rest."""
        output = model(samples)
        return self.criterion(output, targets), output

    def dummy_batch(self, shape, num_classes):
        """(inputs, targets) of zeros with a prepared batch's shapes, for warm_up."""
        x = torch.zeros(shape, device=self.device)
        if self.mixup_fn is not None:
            y = torch.full((shape[0], num_classes), 1.0 / num_classes, device=self.device)
        else:
            y = torch.zeros(shape[0], dtype=torch.long, device=self.device)
        return x, y

    def _update(self, set_to_none=True, ema=True):
        """Unscale, clip, the guarded optimizer step, scaler update, EMA; returns the gradient norm."""
        self.loss_scaler.unscale_(self.optimizer)
        params = [p for p in self.params if p.grad is not None]
        self._with_grad = params  # what a capture gives persistent gradients (unused ones stay None)
        if self.max_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:
            norm = utils.grad_norm(params)
        ok = self._loss_ok & torch.isfinite(norm)
        self._loss_ok.fill_(True)  # the next update's micro-steps start afresh
        if self.fused_skip:
            # GradScaler's protocol for fused optimizers: the kernel skips when found_inf != 0
            # (torch.optim.Adam/AdamW/SGD read these attributes in step()).
            # (the kernels skip only on exactly 1.0)
            skip = ~ok
            if self.loss_scaler.enabled:
                skip = skip | (self.loss_scaler.found_inf(self.optimizer) > 0)
            found_inf = skip.float()
            if not self._buffers_ready:
                self._buffers_ready = _zero_momentum_buffers(self.optimizer)
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif self.scaler_skip:
            self.loss_scaler.step(self.optimizer)  # GradScaler's skip: one host read of its flag
        else:
            with torch.no_grad():
                for p in params:
                    p.grad.copy_(torch.where(ok, p.grad, 0.0))
                if self._snapshot is None or len(self._snapshot) != len(params):
                    self._snapshot = [torch.empty_like(p) for p in params]
                torch._foreach_copy_(self._snapshot, [p.detach() for p in params])
            self.optimizer.step()
            with torch.no_grad():
                for p, saved in zip(params, self._snapshot):
                    p.copy_(torch.where(ok, p, saved))
        self.loss_scaler.update()
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if ema and self.model_ema is not None:
            self.model_ema.update(self._unwrapped())
        return norm

    def warm_up(self, shape, num_classes, channels_last=False):
        """Run this stage's shapes once (forward and backward on zeros) without changing training.

        cuDNN autotuning (cudnn.benchmark) and the allocator's first blocks for a new B then
        happen here, while the loader fills its first batches of the stage, instead of in the
        first steps.  Nothing training sees changes: the batch-norm statistics and every
        buffer are restored, the random streams forked, the gradients dropped, the optimizer,
        scaler and EMA untouched; the unwrapped module runs (no DDP communication).
        With --cuda_graph this runs on the capture stream and is followed by a trial capture
        of the same forward and backward (probe_capture), before any batch of the stage.
        """
        module = self._unwrapped()
        buffers = [b.detach().clone() for b in module.buffers()]
        x, y = self.dummy_batch(shape, num_classes)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        devices = [self.device] if self.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices), self._on_capture_stream():
            with _autocast(self.device, self.amp_dtype):
                loss, _ = self.forward_loss(module, x, y)
            loss.backward()
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers):
                b.copy_(saved)
        self.zero_grad()
        if self.cuda_graph:
            self.probe_capture(module, x, y)

    @contextlib.contextmanager
    def _on_capture_stream(self):
        """Eager work that precedes a capture runs on the capture stream, as torch.cuda.graph asks."""
        if not self.cuda_graph:
            yield
            return
        stream = _capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def zero_grad(self):
        """Drop the gradients (and the update's loss record); in place once graphs are captured
        (they hold the gradients' memory)."""
        self.optimizer.zero_grad(set_to_none=not self._graphs)
        self._loss_ok.fill_(True)

    def _unwrapped(self):
        m = self.model
        m = getattr(m, '_orig_mod', m)
        return getattr(m, 'module', m)

    def run(self, samples, targets, hard, update, it):
        """One micro-step (an update when `update`); {'loss', 'class_acc', 'grad_norm'} as device tensors."""
        if self.cuda_graph:
            out = self._run_graphed(samples, targets, hard, update, it)
            if out is not None:
                return out
        loss, acc = self._micro(samples, targets, hard, update)
        # once a graph is captured it holds the gradients' addresses: an eager update (a shape
        # not captured yet) zeroes them in place instead of freeing memory a replay writes to
        norm = self._update(set_to_none=not self._graphs) if update else None
        self._track(loss, it, norm)
        return {'loss': loss, 'class_acc': acc, 'grad_norm': norm}

    # ------------------------------------------------------------------ CUDA graphs
    def probe_capture(self, module, x, y):
        """Capture this stage's forward and backward on (x, y) into a throw-away graph and pool.

        Run before the stage's first batch (warm_up), so a model or setting that cannot be
        captured is found before anything of the run depends on it: training then goes on
        eagerly (one line says why), or stops with one line if torch's allocator cannot be
        put back (release_failed_capture).  Nothing executes in a capture, so weights,
        buffers, gradients and random streams are as before; the graph and its pool are
        freed at once.
        """
        grads = [p.grad for p in self.params]
        pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        devices = [self.device] if self.device.type == 'cuda' else []
        try:
            with torch.random.fork_rng(devices=devices):
                with self._capturing(graph, pool):
                    with _autocast(self.device, self.amp_dtype, cache_enabled=False):
                        loss, _ = self.forward_loss(module, x, y)
                    loss.backward()
                    del loss  # pool memory: freed before the pool is
        except utils.UserError:
            raise  # the allocator could not be restored: stop
        except Exception as e:  # noqa: BLE001 - any capture failure: train eagerly
            self._fall_back(f'--cuda_graph: a trial capture before training failed ({_why(e)}); '
                            f'training goes on eagerly')
        finally:
            for p, g in zip(self.params, grads):
                p.grad = g  # a capture's backward may have handed out new (never computed) gradients
        del graph  # its pool goes back to the allocator
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _capturing(self, graph, pool):
        """torch.cuda.graph on the capture stream; a failed capture leaves the stream and torch's
        allocator as before it (release_failed_capture), or raises UserError (stop) if it cannot."""
        stream = torch.cuda.current_stream(self.device)
        rng = _generator_before_capture(self.device)
        try:
            # thread_local: under the default "global" mode a CUDA call of another thread during the
            # capture (the DataLoader's pin-memory thread's cudaHostAlloc, the gpu pipeline's
            # prefetch thread) fails there with cudaErrorStreamCaptureUnsupported and kills the run;
            # those threads never touch the capturing stream, so only this thread is restricted
            with torch.cuda.graph(graph, pool=pool, stream=_capture_stream(self.device),
                                  capture_error_mode='thread_local'):
                yield
        except BaseException as e:
            # torch.cuda.graph.__exit__ leaves its capture stream current when capture_end()
            # raises (an invalidated capture): training goes on on the stream it had
            torch.cuda.set_stream(stream)
            # training goes on eagerly: this step's graphs go first, so the pool they share with
            # the failed capture has no live user when that capture's use of it is given back
            self._graphs.clear()
            stuck = release_failed_capture(graph, pool, self.device) or _restore_generator(rng)
            if stuck:
                raise utils.UserError(f'--cuda_graph true: a CUDA graph capture failed ({_why(e)}) and torch\'s '
                                      f'memory allocator could not be restored ({stuck}); rerun with '
                                      f'--cuda_graph false') from e
            raise

    def _run_graphed(self, samples, targets, hard, update, it):
        key = (tuple(samples.shape), samples.dtype, tuple(targets.shape), hard is None, update)
        entry = self._graphs.get(key)
        if entry is None:
            # eager warm-up updates first (cuDNN autotuning, optimizer state, the AMP scale)
            # on a side stream, as torch.cuda.graph requires
            seen = self._updates_seen.get(key[:-1], 0)
            if seen < self.graph_warmup:
                if update:
                    self._updates_seen[key[:-1]] = seen + 1
                return self._side_stream_eager(samples, targets, hard, update, it)
            try:
                entry = self._capture(key, samples, targets, hard, update)
            except utils.UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any capture failure: train on eagerly
                self._abandon_graphs(_why(e))
                return None
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, (samples, targets, hard)):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        graph.replay()
        loss = static_out['loss'].clone()
        out = {'loss': loss, 'class_acc': None if static_out['class_acc'] is None else static_out['class_acc'].clone(),
               'grad_norm': None if static_out['grad_norm'] is None else static_out['grad_norm'].clone()}
        if update and self.model_ema is not None and not self.ema_on_device:
            self.model_ema.update(self._unwrapped())
        self._track(loss, it, out['grad_norm'])
        return out

    def _side_stream_eager(self, samples, targets, hard, update, it):
        with self._on_capture_stream():
            loss, acc = self._micro(samples, targets, hard, update)
            norm = self._update(set_to_none=not self._graphs) if update else None  # see run()
            self._track(loss, it, norm)
        return {'loss': loss, 'class_acc': acc, 'grad_norm': norm}

    def _capture(self, key, samples, targets, hard, update):
        torch.cuda.synchronize(self.device)
        device_lr(self.optimizer, self.device)  # filled in place by apply_hparams: replays see it
        for g in self.optimizer.param_groups:
            if 'capturable' in g:
                # Adam/AdamW.step() refuses to run under capture unless every group says
                # capturable=True (Optimizer._accelerator_graph_capture_health_check), fused or
                # not; with fused=True the flag changes nothing else (the step counts are on the
                # device already).  SGD has no such flag and no such check.
                g['capturable'] = True
        # the one-time "capturable=True but run uncaptured" warning would be noise: eager
        # steps of shapes not captured yet run the same fused kernel
        self.optimizer._warned_capturable_if_run_uncaptured = True
        # persistent zero gradients: the captured backward accumulates into them and the
        # update graph zeroes them again, so micro-step and update graphs compose
        for p in self._with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        static_in = (samples.clone(), targets.clone(), None if hard is None else hard.clone())
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with self._capturing(graph, self._pool):
                loss, acc = self._micro(*static_in, update, cache_enabled=False)
                norm = self._update(set_to_none=False, ema=self.ema_on_device) if update else None
        except BaseException:
            # nothing ran: the gradients accumulated so far (earlier micro-steps) hold, but a
            # gradient the captured backward handed out was never computed
            for p, g in zip(self.params, grads):
                p.grad = g
            raise
        self._graphs[key] = (graph, static_in, {'loss': loss, 'class_acc': acc, 'grad_norm': norm})
        print(f'CUDA graph captured: input {tuple(samples.shape)}, {"update" if update else "accumulation"} step'
              f'{" (" + self.stage_desc + ")" if self.stage_desc else ""}', flush=True)
        return self._graphs[key]

    def release(self):
        """Give back the captured graphs and their memory pool: the next stage's step (another B or
        micro-batch) captures its own, and two stages' pools at once could pass the device memory
        that a stage's micro-batch fills (--stage_batch auto, large).  Training with this step
        afterwards would capture again."""
        if not self._graphs and self._pool is None:
            return
        self._graphs.clear()
        self._updates_seen.clear()
        self._pool = None
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()  # the pool's blocks, now unused, back to the device

    def _fall_back(self, note):
        """Train eagerly from here on: lr back to numbers, capturable off; the gradients and the
        update's loss record stay (a capture that failed mid-accumulation ran nothing)."""
        self.graph_note = note  # benchmarks report it
        print(note, flush=True)
        self.cuda_graph = False
        self._graphs.clear()
        host_lr(self.optimizer)
        for g in self.optimizer.param_groups:
            if 'capturable' in g:
                g['capturable'] = False

    def _abandon_graphs(self, why):
        self._fall_back(f'--cuda_graph: capture failed ({why}); training goes on eagerly')
        # a capture that failed in the update ran GradScaler.unscale_ (its bookkeeping only)
        self.loss_scaler.reset_iteration()


class MAEStep(TrainStep):
    """A masked-autoencoder pre-training step (models/mae.py): TrainStep with the loss the model
    returns and no labels, everything else (accumulation, loss scaling, clipping, the guarded
    update, CUDA graphs, warm-up) shared.

    prepare() finishes the batch as TrainStep does (device transform, low-pass, replay; no
    mixup) and draws the batch's mask noise: uniform (N, L) noise from a generator seeded by
    the batch's position (seed, epoch, loader batch, rank, world; utils.keyed_seed), on the
    device.  The noise takes the place of the targets, so a captured step takes it as a
    graph input, and a resumed or replayed run masks every batch as the uninterrupted run
    did, whatever else drew random numbers.  The labels the loader yields are dropped.
    """

    def __init__(self, *a, seed=0, rank=0, world=1, **kw):
        super().__init__(*a, **kw)
        self.seed, self.rank, self.world = seed, rank, world
        self._generator = torch.Generator(device=self.device)

    def prepare(self, samples, targets, epoch, it):
        samples, _, _ = super().prepare(samples, targets, epoch, it)
        n, _, h, w = samples.shape
        patch = self._unwrapped().patch_size
        self._generator.manual_seed(utils.keyed_seed('mae-mask', self.seed, epoch, it, self.rank, self.world))
        noise = torch.rand(n, (h // patch) * (w // patch), device=self.device, generator=self._generator)
        return samples, noise, None

    def forward_loss(self, model, samples, targets):
        loss, _, _ = model(samples, noise=targets)
        return loss, None

    def dummy_batch(self, shape, num_classes):
        n, _, h, w = shape
        patch = self._unwrapped().patch_size
        noise = torch.arange((h // patch) * (w // patch), dtype=torch.float32, device=self.device)
        return torch.zeros(shape, device=self.device), noise.expand(n, -1).contiguous()


def _why(e):
    """An exception as a short one-line reason."""
    first = str(e).splitlines()[0][:160] if str(e) else ''
    return f'{type(e).__name__}: {first}'


# Graphs whose capture failed: kept alive for the rest of the process.  torch (2.11 and
# older) leaves a pinned-host-allocator routing entry for such a capture, whose filter
# refers to the graph object; it must not point to freed memory.  They hold no device memory.
_FAILED_GRAPHS = []


def release_failed_capture(graph, pool, device):
    """Undo what a failed capture left in torch's CUDA caching allocator; None when done, else why not.

    capture_begin routes allocations on the capture stream to the graph's private pool
    (beginAllocateToPool, which also counts one use of the pool); capture_end ends that
    (endAllocateToPool) only after cudaStreamEndCapture succeeded, and the graph gives
    its use of the pool back only after a successful capture.  So on torch <= 2.11 a
    failed capture stays listed as underway, and while one is, the allocator defers the
    free of every block used on a second stream (record_stream: the gpu data path's
    batches) until no capture is underway, i.e. forever: about one batch per step until
    the run dies out of memory; and empty_cache() trips an internal assert.  Newer torch
    ends the routing in capture_end or reset() itself.

    Here: reset() (newer torch cleans up there); then, if allocations are still routed
    to the pool (endAllocateToPool succeeds: older torch), end that and give back the
    capture's use of the pool, which nothing else would.  Callers drop every other graph
    of the pool first, so a release can never free memory a live graph uses.
    """
    device = utils.resolved_device(device)
    _FAILED_GRAPHS.append(graph)
    try:
        graph.reset()
    except Exception:  # noqa: BLE001 - a half-made graph may refuse; the allocator is what matters
        pass
    end = getattr(torch._C, '_cuda_endAllocateToPool', None)
    release = getattr(torch._C, '_cuda_releasePool', None)
    if end is None or release is None:
        return 'this torch has no _cuda_endAllocateToPool/_cuda_releasePool'
    try:
        end(device.index, pool)
    except RuntimeError:
        return None  # "not currently recording to mempool_id": torch ended it already
    try:
        release(device.index, pool)
    except RuntimeError as e:
        return f'releasePool: {_why(e)}'
    return None


def _generator_before_capture(device):
    """(the device's default CUDA generator, a copy of its state) before a capture, for
    _restore_generator; None where there is nothing to restore (CPU, a torch without the calls).

    capture_begin puts the generator's state in capture mode (capture_prologue) and only a
    successful capture_end takes it out (capture_epilogue).  After a failed capture torch 2.11
    leaves it there, and the next eager random op on the device (dropout, drop path, random
    erasing, randn) fails: "Offset increment outside graph capture encountered unexpectedly"
    (seen on an H200, torch 2.11).  A capture consumes no eager offsets, so the copy taken
    before it is exactly the state eager work continues from.
    """
    device = utils.resolved_device(device)
    if device.type != 'cuda':
        return None
    gen = torch.cuda.default_generators[device.index]
    if not hasattr(gen, 'clone_state') or not hasattr(gen, 'graphsafe_set_state'):
        return None
    return gen, gen.clone_state()


def _restore_generator(saved):
    """Give the generator the state copied before a failed capture (graphsafe_set_state swaps
    the state object, the copy's not being in capture mode); None when done, else why not."""
    if saved is None:
        return None
    gen, state = saved
    try:
        gen.graphsafe_set_state(state)
    except RuntimeError as e:
        return f'CUDA generator: {_why(e)}'
    return None


_CAPTURE_STREAMS = {}


def _capture_stream(device):
    """The side stream of graph warm-up and capture: one per device, from torch's high-priority pool.

    torch.cuda.Stream() hands out torch's 32 pooled streams per priority round-robin: the
    default capture stream of torch.cuda.graph could be the very stream the data prefetcher
    (pipelines.gpudata.DevicePrefetcher, a new one each epoch) or torchvision's JPEG decoder
    enqueues on from their thread, and their work would then be captured into the training
    graph.  Those (and NCCL's streams) come from the default-priority pool; this one does not.
    """
    device = utils.resolved_device(device)
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return _CAPTURE_STREAMS[device]


# Reads of the device, in step-loop terms: the step loop reads the logger's pending values
# at print steps (log_every prints them) and, under DDP, every STOP_CHECK_STEPS micro-steps
# at most, where the ranks agree on a SIGTERM (so all stop at the same step within a few
# seconds) and on divergence.
STOP_CHECK_STEPS = 25


class _Started:
    """A loader whose iterator is created at once (its workers start prefetching), iterated later."""

    def __init__(self, loader):
        self.length = len(loader)
        self.iterator = iter(loader)

    def __len__(self):
        return self.length

    def __iter__(self):
        return self.iterator


def train_one_epoch(step, data_loader, epoch, *, hparams_at, log_writer=None, global_step=0, print_freq=10,
                    header=None, start_step=0, meter_state=None, stop_requested=None, on_update=None,
                    warm_shape=None):
    """Train `step` (a TrainStep) over one pass of data_loader; returns the epoch's averages.

    hparams_at(frac) -> (lr, weight_decay) at fraction frac of this epoch; it is asked
    before every optimizer update.  Resuming mid-epoch: data_loader yields only the
    batches after start_step and meter_state continues the epoch's averages.

    No tensor is read on the host inside the loop except when the metric logger is read:
    at print steps, every STOP_CHECK_STEPS micro-steps under DDP, when on_update saves
    (its meters.state_dict()), and at the end.  Each read checks the device-side
    divergence record: a non-finite loss raises TrainingDiverged naming its step (its
    update was already skipped on the device, so it reached neither weights nor EMA).
    Under DDP every read also all-reduces (diverged, stop requested), so all ranks raise
    together and stop at the same update.  on_update(batches_done, metric_logger, stop)
    runs after every optimizer update; stop=True there means: save and stop.
    warm_shape: (input shape, classes, channels_last) to run once through step.warm_up while
    the loader starts (a new stage's shapes on a GPU), or None.
    Returns the averaged metrics plus 'steady_img_s' and 'warm_time_s' (see _Timing; log.txt
    gets them as train_steady_img_s and train_warm_time_s).
    """
    step.model.train(True)
    step.begin_epoch(epoch)
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.load_state_dict(meter_state)
    header = header or f'Epoch: [{epoch}]'
    num_steps = start_step + len(data_loader)
    if num_steps == 0:
        raise utils.UserError('the training loader yields no batch: lower --batch_size')
    distributed = utils.is_dist_avail_and_initialized()
    update_freq = step.update_freq
    # an update every STOP_CHECK_STEPS micro-steps or fewer, the same on every rank
    check_every = update_freq * max(1, STOP_CHECK_STEPS // update_freq)
    state = {'stop': False}
    timing = _Timing()

    def local_stop():
        return stop_requested is not None and stop_requested()

    def watched():
        return [step.bad_step, step.bad_loss]

    def on_flush(values):
        bad_step, bad_loss = values
        flags = [1.0 if bad_step >= 0 else 0.0, 1.0 if local_stop() else 0.0]
        if distributed:
            # one rank alone raising would leave the others waiting in DDP's all-reduce
            flags = utils.all_reduce_sum(flags, step.device)
        state['stop'] = state['stop'] or flags[1] > 0
        if flags[0] > 0:
            raise step.diverged_error(bad_step, bad_loss, num_steps, elsewhere=bad_step < 0)
        timing.read(state['it'], state.get('images', 0))

    metric_logger.watch, metric_logger.on_flush = watched, on_flush
    step.zero_grad()
    lr = wd = 0.0
    state.update(it=start_step, images=0)
    loader = _Started(data_loader)  # the workers start loading now
    if warm_shape is not None:
        step.warm_up(*warm_shape)
    batches = metric_logger.log_every(loader, print_freq, header, start_index=start_step)
    for it, (samples, targets) in enumerate(batches, start=start_step):
        state['it'] = it
        if it % update_freq == 0:
            lr, wd = hparams_at(it / num_steps)
            apply_hparams(step.optimizer, lr, wd)
        samples, targets, hard = step.prepare(samples, targets, epoch, it)
        update = (it + 1) % update_freq == 0
        out = step.run(samples, targets, hard, update, it)
        state['images'] += samples.shape[0]
        metric_logger.update(loss=out['loss'], class_acc=out['class_acc'], grad_norm=out['grad_norm'], lr=lr, wd=wd)
        if log_writer is not None and update and it % print_freq == 0:
            # TensorBoard gets the loss at print steps only: each value costs a host read
            log_writer.add_scalars(global_step + it, 'train', loss=float(out['loss']), lr=lr, weight_decay=wd)
        if update:
            if not distributed and local_stop():
                state['stop'] = True  # a Python flag: no device read needed on one process
            elif distributed and (it + 1) % check_every == 0:
                metric_logger.flush()
            if on_update is not None:
                on_update(it + 1, metric_logger, state['stop'])
    step.zero_grad()
    metric_logger.synchronize_between_processes(step.device)
    metric_logger.watch = metric_logger.on_flush = None  # checked and timed: the epoch is over
    print('Averaged stats:', metric_logger, flush=True)
    stats = metric_logger.averages()
    stats.update(timing.summary(step.device))
    return stats


class _Timing:
    """Steady-state throughput of an epoch from the times of its reads (the device is idle after each).

    warm_time_s: from the epoch's start to the first read at or after WARM_STEPS steps (start-up:
    the loader's first batches, cuDNN autotuning or graph capture of new shapes);
    steady_img_s: images per second between that read and the last one;
    excess_time_s: the epoch's time less its images at the steady rate (start-up cost).
    """
    WARM_STEPS = 5

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = None  # (time, images) at the first read past the warm-up
        self.last = None

    def read(self, it, images):
        now = time.perf_counter()
        if self.first is None:
            if images and it + 1 >= self.WARM_STEPS:
                self.first = (now, images)
        else:
            self.last = (now, images)

    def summary(self, device):
        out = {'warm_time_s': round(self.first[0] - self.t0, 4) if self.first else None, 'steady_img_s': None,
               'excess_time_s': None}
        if self.first and self.last and self.last[1] > self.first[1] and self.last[0] > self.first[0]:
            rate = (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
            out['steady_img_s'] = round(rate, 2)
            # what the epoch's start cost beyond steady state (a stage switch: new shapes)
            out['excess_time_s'] = round((self.last[0] - self.t0) - self.last[1] / rate, 4)
        return out


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, reduce=False, print_freq=50, header='Test:', size=None):
    """Top-1, top-5 and mean cross-entropy over the loader (summed over ranks if reduce)."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    metric_logger = utils.MetricLogger(delimiter='  ')
    for images, target in metric_logger.log_every(data_loader, print_freq, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        k = min(5, output.shape[-1])
        topk = output.topk(k, dim=-1).indices
        hits = topk.eq(target[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=-1).sum().item()
        count += target.numel()
    if reduce:
        loss_sum, top1, top5, count = utils.all_reduce_sum([loss_sum, top1, top5, count], device)
    count = max(count, 1.0)
    stats = {'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count, 'loss': loss_sum / count,
             'num_images': int(count)}
    # `size` (the evaluated resolution) goes after the three numbers, so parsers of
    # '* Acc@1 <x> Acc@5 <y> loss <z>' keep working
    at = f' at {size}x{size}' if size else ''
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}{at}', flush=True)
    return stats
