"""Distributed setup, metric logging, mixed precision, checkpoints and schedules.

Checkpoints are plain dictionaries in the ConvNeXt/EfficientTrain layout
(``model``, ``optimizer``, ``epoch``, ``scaler``, ``args`` and optionally
``model_ema``), written atomically and read with ``weights_only=True``.
"""
import argparse
import datetime
import glob
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with what the user asked for; main() prints it on one line and exits 2."""


def str2bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('true', 't', 'yes', 'y', '1'):
        return True
    if s in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{v}'")


# ---------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() on all ranks but 0; print(..., force=True) still goes through."""
    import builtins
    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args):
    """Read torchrun's or SLURM's environment; NCCL for CUDA, gloo otherwise."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ['SLURM_NTASKS'])
        args.gpu = int(os.environ.get('SLURM_LOCALID', 0))
        os.environ.setdefault('RANK', str(args.rank))
        os.environ.setdefault('WORLD_SIZE', str(args.world_size))
        os.environ.setdefault('LOCAL_RANK', str(args.gpu))
        if 'MASTER_ADDR' not in os.environ:
            raise UserError('SLURM run without MASTER_ADDR: export MASTER_ADDR (the first node of '
                            '$SLURM_JOB_NODELIST) and MASTER_PORT before srun, as scripts/slurm_train.sh does')
        os.environ.setdefault('MASTER_PORT', '29500')
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.distributed = True
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    args.dist_backend = 'nccl' if use_cuda else 'gloo'
    # every collective fails after this long instead of waiting on a peer that will never
    # come (torchrun ends its other workers only when one of them exits)
    minutes = getattr(args, 'dist_timeout', 30.0)
    if not minutes > 0:
        raise UserError(f'--dist_timeout {minutes} must be a positive number of minutes (default 30)')
    dist.init_process_group(backend=args.dist_backend, init_method='env://',
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=minutes))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def all_reduce_sum(values, device=None):
    """Sum a list of floats over ranks (float64, so counts stay exact).

    The tensor goes where the backend wants it (NCCL: this rank's GPU, gloo: CPU), whatever
    device the values came from (an EMA kept on the CPU, say).
    """
    if not is_dist_avail_and_initialized():
        return [float(v) for v in values]
    on = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.tolist()


def all_finite(tensors):
    """True if every element of every floating tensor is finite, with one host read per device.

    Each tensor is summed in float64 on its device: a sum of finite values of any float
    format (at most 3.4e38 each) cannot overflow float64 for fewer than 1e269 elements, and
    an inf or NaN element makes the sum inf or NaN. The per-tensor sums are stacked and
    read once, so the check costs one synchronisation per device, not one per tensor.
    """
    sums = {}
    for t in tensors:
        if t is not None and t.is_floating_point() and t.numel():
            sums.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float64))
    return all(bool(torch.isfinite(torch.stack(v).sum())) for v in sums.values())


# ---------------------------------------------------------------------------
# metric logging
# ---------------------------------------------------------------------------

class SmoothedValue:
    """A windowed median/average plus the global average of a series."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device):
        self.count, self.total = all_reduce_sum([self.count, self.total], device)

    @property
    def median(self):
        # the lower middle value, as torch.median gives (no tensor: no host read to count)
        return sorted(self.deque)[(len(self.deque) - 1) // 2] if self.deque else 0.0

    @property
    def avg(self):
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / self.count if self.count else 0.0

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues; tensor updates stay on their device until the next read.

    update(loss=t) with a tensor only keeps t (no host read, so the GPU's launch queue
    never runs dry in the step loop); the pending values of every meter are read in one
    transfer when the logger is next read (printed, averaged, saved, synchronised) or
    flush()ed.  `watch` holds extra device tensors read in that same transfer, and
    on_flush(values) receives them: the engine checks divergence and, across ranks, the
    stop flag there.  Plain numbers are taken at once, as before.
    """

    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self._pending = []  # (name, 0-d tensor) in update order
        self.watch = None  # callable -> list of 0-d tensors read with the pending values
        self.on_flush = None  # callable(list of floats) for those

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._pending.append((k, v.detach().reshape(())))
                continue
            self.meters[k].update(float(v))

    def flush(self):
        """Read every pending tensor (and the watched ones) in one device-to-host transfer."""
        watched = list(self.watch()) if self.watch is not None else []
        tensors = [t for _, t in self._pending] + watched
        if tensors:
            device = tensors[0].device
            values = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).tolist()
        else:
            values = []
        pending, self._pending = self._pending, []
        for (k, _), v in zip(pending, values):
            self.meters[k].update(v)
        if self.on_flush is not None:
            self.on_flush(values[len(pending):])

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            if self.__dict__.get('_pending'):
                self.flush()
            return self.meters[attr]
        raise AttributeError(attr)

    def __str__(self):
        self.flush()
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self, device):
        self.flush()
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def averages(self):
        """{name: global average}, after reading what is pending."""
        self.flush()
        return {k: m.global_avg for k, m in self.meters.items()}

    def state_dict(self):
        """Totals and counts: enough to continue an epoch's averages after a mid-epoch resume."""
        self.flush()
        return {k: [m.total, m.count] for k, m in self.meters.items()}

    def load_state_dict(self, state):
        for k, (total, count) in (state or {}).items():
            self.meters[k].total, self.meters[k].count = float(total), float(count)

    def log_every(self, iterable, print_freq, header='', total=None, start_index=0):
        """Yield from iterable, printing progress, ETA and timings every print_freq items.

        start_index: items already done before this call (a mid-epoch resume).
        """
        total = start_index + len(iterable) if total is None else total
        start = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total))
        for i, obj in enumerate(iterable, start=start_index):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                msg = [header, f'[{i:{width}d}/{total}]', f'eta: {eta}', str(self),
                       f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available():
                    msg.append(f'max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB')
                print(self.delimiter.join(m for m in msg if m), flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        done = max(total - start_index, 1)
        print(f'{header} Total time: {elapsed} ({(time.time() - start) / done:.4f} s / it)', flush=True)


class TensorboardLogger:
    def __init__(self, log_dir):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(logdir=log_dir)

    def add_scalars(self, step, prefix='', **values):
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f'{prefix}/{k}' if prefix else k, v, step)

    def flush(self):
        self.writer.flush()


# ---------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------

class LossScaler:
    """Backward, optional unscale + clip, and step, with a GradScaler only for fp16."""

    state_dict_key = 'amp_scaler'

    def __init__(self, device_type, enabled):
        self.enabled = enabled
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = grad_norm(params)
        scale_before = self._scaler.get_scale() if self.enabled else 1.0
        self._scaler.step(optimizer)
        self._scaler.update()
        # A shrinking scale means GradScaler skipped this step for inf/nan gradients.
        self.last_step_skipped = self.enabled and self._scaler.get_scale() < scale_before
        return norm

    # The engine's step (engine.TrainStep) drives the scaler piece by piece, without host reads.
    def scale(self, loss):
        return self._scaler.scale(loss)

    def unscale_(self, optimizer):
        if self.enabled:
            self._scaler.unscale_(optimizer)

    def found_inf(self, optimizer):
        """GradScaler's overflow flag of this iteration (a device tensor; after unscale_)."""
        # GradScaler keeps it per optimizer and device in _per_optimizer_states (torch.amp internals)
        found = self._scaler._per_optimizer_states[id(optimizer)]['found_inf_per_device']
        return sum(v.to(next(iter(found.values())).device) for v in found.values())

    def step(self, optimizer):
        """GradScaler's own skip (reads its overflow flag on the host)."""
        self._scaler.step(optimizer)

    def update(self):
        if self.enabled:
            self._scaler.update()

    def reset_iteration(self):
        """Forget this iteration's unscale record (a CUDA graph capture that failed half-way)."""
        from collections import defaultdict as _dd
        from torch.amp.grad_scaler import _refresh_per_optimizer_state
        self._scaler._per_optimizer_states = _dd(_refresh_per_optimizer_state)

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state):
        if state:
            self._scaler.load_state_dict(state)


def resolved_device(device):
    """The device with its index: a CUDA device without one is the current device.

    torch.device('cuda') != torch.device('cuda:0'), so two names of one device compare
    equal only once resolved.
    """
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device


def grad_norm(params, norm_type=2.0):
    if not params:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.detach(), norm_type) for p in params]), norm_type)


# ---------------------------------------------------------------------------
# schedules: pure functions of training progress
# ---------------------------------------------------------------------------

def cosine_schedule(progress, total, base_value, final_value, warmup=0.0, warmup_start=0.0):
    """Value at `progress` of a linear warmup to base_value, then a cosine to final_value.

    `progress` and `total` are in the same unit (epochs or compute), so the value
    is the same whether it is asked mid-run or after a resume.
    """
    if warmup > 0 and progress < warmup:
        return warmup_start + (base_value - warmup_start) * progress / warmup
    span = max(total - warmup, 1e-12)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def _safe_globals():
    # Released EfficientTrain/ConvNeXt files store 'args' as an argparse.Namespace;
    # that is the only non-tensor class the formats need.
    return [argparse.Namespace]


def _why_unreadable(path, error):
    """One clause on why torch.load refused path, never torch's own advice (it suggests
    weights_only=False, which would run any code a file holds)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except OSError as e:
        return f'cannot be read ({e.strerror})'
    if not head:
        return 'the file is empty'
    # torch.save writes a zip archive (PK..) since torch 1.6, a pickle (protocol 2: 0x80 0x02) before
    if not (head.startswith(b'PK') or head[:1] == b'\x80'):
        return 'it is not a file written by torch.save'
    msg = str(error)
    if 'weights_only' in msg or 'Unsupported global' in msg or 'GLOBAL' in msg:
        return ('it holds Python objects other than tensors and plain values, not loaded because loading '
                'them could run code')
    return 'it is damaged or truncated'


def load_checkpoint_file(path, map_location='cpu'):
    """torch.load without executing pickled code; one-line UserError on failure."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith('.pth'))
        hint = f' (it holds {", ".join(names[:4])}{", ..." if len(names) > 4 else ""})' if names else ''
        raise UserError(f'checkpoint {path} is a directory{hint}: pass a checkpoint file, e.g. '
                        f'{os.path.join(path, "checkpoint-best.pth")}')
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist: check the --resume/--finetune path')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise UserError(f'{path} is not a readable checkpoint ({_why_unreadable(path, e)}): '
                        f'point to a .pth file written by torch.save') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary: '
                        f"expected {{'model': state_dict, ...}}")
    return ckpt


def checkpoint_args(ckpt):
    """A checkpoint's 'args' as a dict: saved as a Namespace (this project's, the released files')
    or a plain dict; {} when absent."""
    a = ckpt.get('args')
    if isinstance(a, argparse.Namespace):
        return vars(a)
    return a if isinstance(a, dict) else {}


def plain_args(args):
    """A Namespace of plain values only, so weights_only loading accepts it."""
    out = argparse.Namespace()
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            # the exact built-in type: subclasses (runner.args' --input_size default) would not load
            setattr(out, k, v if v is None else next(t for t in (bool, int, float, str) if isinstance(v, t))(v))
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            setattr(out, k, list(v))
        else:
            setattr(out, k, str(v))
    return out


def file_mode():
    """The permissions open() gives a new file under the current umask (0644 under umask 022).

    mkstemp creates its files 0600; a checkpoint renamed from one would be unreadable to
    colleagues on a shared filesystem while log.txt (plain open) is not.
    """
    umask = None
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        with open('/proc/self/status', encoding='ascii') as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith('Umask:')), None)
    except OSError:
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path, write, binary):
    """write(f) into a temporary file in path's directory, fsync, rename over path, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path) + '.', dir=directory)
    try:
        os.fchmod(fd, file_mode())
        with (os.fdopen(fd, 'wb') if binary else os.fdopen(fd, 'w', encoding='utf-8')) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory):
    """Put a directory's entries (files just renamed into it) on disk; a no-op where unsupported."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, fsync, then rename over path."""
    _atomic_write(path, lambda f: torch.save(obj, f), binary=True)


_CKPT_RE = re.compile(r'checkpoint-(\d+)\.pth$')


def list_epoch_checkpoints(output_dir):
    """[(epoch_number, path)] of checkpoint-N.pth files, newest number first."""
    found = []
    for p in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth')):
        m = _CKPT_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def rotate_checkpoints(output_dir, keep):
    """Delete all but the newest `keep` checkpoint-N.pth (called after a save succeeded)."""
    if keep is None or keep <= 0:
        return
    for _, p in list_epoch_checkpoints(output_dir)[keep:]:
        try:
            os.remove(p)
        except OSError:
            pass


RECOVERY_NAME = 'checkpoint-recovery.pth'


def checkpoint_position(ckpt):
    """(epoch, batches done) where training continues from this checkpoint."""
    if 'step' in ckpt:
        return int(ckpt['epoch']), int(ckpt['step'])
    return int(ckpt['epoch']) + 1, 0


def find_resume_checkpoint(output_dir):
    """The loadable checkpoint in output_dir that is furthest along, by recorded progress.

    Damaged files (a kill mid-write of a non-atomic copy, a full disk) are skipped with a warning.
    """
    paths = [p for _, p in list_epoch_checkpoints(output_dir)]
    recovery = os.path.join(output_dir, RECOVERY_NAME)
    if os.path.exists(recovery):
        paths.append(recovery)
    best = None
    for p in paths:
        try:
            ckpt = load_checkpoint_file(p)
        except UserError as e:
            print(f'WARNING: skipping damaged checkpoint: {e}')
            continue
        if 'model' not in ckpt or 'epoch' not in ckpt:
            print(f'WARNING: skipping {p}: no model/epoch entry')
            continue
        pos = checkpoint_position(ckpt)
        if best is None or pos > best[0]:
            best = (pos, p, ckpt)
    if best is None:
        return None, None
    return best[1], best[2]


def save_json_line(path, record):
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def rng_state():
    """This process's python, numpy, torch (and CUDA) generator states, as plain values and tensors."""
    import random
    import numpy as np
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': [version, list(words), gauss],
             'numpy': [name, torch.from_numpy(keys.astype('int64')), int(pos), int(has_gauss), float(cached)],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random
    import numpy as np
    version, words, gauss = state['python']
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype('uint32'), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states():
    """Every rank's generator states, in rank order (all ranks must call this)."""
    mine = rng_state()
    if not is_dist_avail_and_initialized():
        return [mine]
    out = [None] * get_world_size()
    dist.all_gather_object(out, mine)
    return out


class StopRequest:
    """Remembers a SIGTERM (what schedulers send before killing a job) or a Ctrl-C (SIGINT)
    instead of dying at once; training stops at the next optimizer step on every rank.

    A second Ctrl-C raises KeyboardInterrupt at once (for a run that does not reach its
    next step, e.g. a stalled loader); main.cli turns that into one line and exit 130.
    Only one that comes later than REPEAT_S: under torchrun a worker can get the same
    SIGINT twice at once, from the terminal or a kill of the whole job and forwarded by
    torchrun, and that must still save.
    """
    SIGNALS = ('SIGTERM', 'SIGINT')
    REPEAT_S = 1.0

    def __init__(self):
        self.signum = None
        self.first = None

    def install(self):
        import signal
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, frame):
        import signal
        now = time.monotonic()
        if self.signum is not None and signum == signal.SIGINT and now - self.first > self.REPEAT_S:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self.first = signum, now

    def requested(self):
        return self.signum is not None

    @property
    def name(self):
        import signal
        return signal.Signals(self.signum).name if self.signum is not None else None


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; exit_code: 128 + the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message, signum=15):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def remove_stale_temp_files(output_dir):
    """Temporary files of atomic_save/atomic_write_text left by a killed run (never a real checkpoint)."""
    for p in glob.glob(os.path.join(output_dir, '.tmp-*')):
        try:
            os.remove(p)
        except OSError:
            pass


def truncate_log(path, first_epoch):
    """Drop log.txt records of epochs >= first_epoch: they are about to be written again."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get('epoch', -1) < first_epoch and 'final_test_at_base' not in rec:
            keep.append(json.dumps(rec) + '\n')
    if len(keep) != len(lines):
        atomic_write_text(path, ''.join(keep))


def atomic_write_text(path, text):
    """Write text to a temporary file beside path, fsync, then rename over path."""
    _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path, data):
    """Write bytes (e.g. an encoded PNG) to a temporary file beside path, fsync, then rename over path."""
    _atomic_write(path, lambda f: f.write(data), binary=True)


def keyed_seed(*parts):
    """A 63-bit seed from a key ('name', seed, epoch, step, rank, ...): a hash, so no two keys share a
    stream, and a batch's draws depend only on its position, never on what was drawn before it."""
    key = '/'.join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], 'little') % (2 ** 63 - 1)


def seed_everything(seed):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def check_writable_dir(path, what='--output_dir'):
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix='.write-test-', delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f'{what} {path} cannot be written ({e.strerror}): choose a writable directory') from None
