"""The training plan: stages, their epochs, and one measure of training progress.

A plan is a list of stages. Each stage has a bandwidth B (``size``), a
RandAugment magnitude, a number of data epochs (passes of the loader), a per-GPU
batch and update_freq, and replay settings. Epoch ``e`` of the run belongs to
exactly one stage.

Progress is a float that grows by ``epoch_weight(e)`` over epoch ``e``:
- ``compute``: equivalent epochs at ``base_size`` ((B/base)^2 per data epoch, times
  replay_times since a replayed epoch takes replay_times as many steps), as
  EfficientTrain++ schedules its learning rate; a stage may carry its model's own
  per-image cost relative to the base size instead of (B/base)^2 (``Stage.cost``: MAE,
  whose encoder sees a fixed share of the patches plus a class token);
- ``epochs``: one per data epoch, as EfficientTrain (ICCV) and the baseline do.
Every schedule (lr, weight decay) is a pure function of progress, so resuming
only needs (epoch, step) and the plan, which is rebuilt from the same arguments.  A stage
may scale the learning rate by its ``lr_scale`` (--stage_batch large: its global batch over
the published one); the scale is a function of the stage, so of progress too
(``stage_at_progress``).
"""
import bisect
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional


@dataclass(frozen=True)
class Stage:
    index: int
    size: int
    magnitude: Optional[int]
    epochs: int
    batch_size: int
    update_freq: int
    replay_times: int = 1
    buffer_size: int = 0
    start_epoch: int = 0
    # compute of one image at `size` over one at the base size; None: (size / base)^2
    cost: Optional[float] = None
    # the stage's learning rate over the schedule's (--stage_batch large: its global batch over
    # the published plan's); 1.0 otherwise
    lr_scale: float = 1.0

    @property
    def loader_batch(self):
        return self.batch_size // self.replay_times

    def relative_cost(self, base_size):
        return (self.size / base_size) ** 2 if self.cost is None else self.cost

    def epoch_compute(self, base_size):
        """Compute of one data epoch of this stage, in epochs at base_size."""
        return self.relative_cost(base_size) * self.replay_times

    def compute(self, base_size):
        return self.epochs * self.epoch_compute(base_size)


@dataclass
class Plan:
    name: str
    stages: List[Stage]
    base_size: int
    progress_unit: str = 'epochs'
    lowfreq: str = 'none'
    warmup: float = 0.0
    budget: float = 0.0
    notes: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.progress_unit not in ('epochs', 'compute'):
            raise ValueError(f'unknown progress unit {self.progress_unit}')
        start, fixed = 0, []
        for i, s in enumerate(self.stages):
            fixed.append(replace(s, index=i, start_epoch=start))
            start += s.epochs
        self.stages = fixed
        self._stage_of_epoch = [s.index for s in self.stages for _ in range(s.epochs)]
        self._cum = [0.0]
        for e in range(self.num_epochs):
            self._cum.append(self._cum[-1] + self.epoch_weight(e))

    @property
    def num_epochs(self):
        return sum(s.epochs for s in self.stages)

    def stage_at(self, epoch):
        if not 0 <= epoch < self.num_epochs:
            raise IndexError(f'epoch {epoch} outside the plan (0..{self.num_epochs - 1})')
        return self.stages[self._stage_of_epoch[epoch]]

    def epoch_weight(self, epoch):
        s = self.stage_at(epoch)
        return s.epoch_compute(self.base_size) if self.progress_unit == 'compute' else 1.0

    def stage_at_progress(self, progress):
        """The stage training is in at `progress`: epoch e spans [progress(e), progress(e + 1)),
        and the end of the run belongs to the last stage."""
        e = bisect.bisect_right(self._cum, progress) - 1
        return self.stages[self._stage_of_epoch[min(max(e, 0), self.num_epochs - 1)]]

    def progress(self, epoch, frac=0.0):
        """Progress at `frac` (0..1) of the way through data epoch `epoch`."""
        if epoch >= self.num_epochs:
            return self._cum[-1]
        return self._cum[epoch] + frac * self.epoch_weight(epoch)

    @property
    def total_progress(self):
        return self._cum[-1]

    @property
    def total_compute(self):
        return sum(s.compute(self.base_size) for s in self.stages)

    def progress_after_plain_epochs(self, n):
        """Progress after `n` epochs counted at each stage's own epoch scale.

        A replayed epoch counts as replay_times epochs here, since it takes that many
        epochs' worth of steps. This is how the published recipes count warmup.
        """
        p, left = 0.0, float(n)
        for s in self.stages:
            span = s.epochs * s.replay_times
            w = s.relative_cost(self.base_size) if self.progress_unit == 'compute' else 1.0 / s.replay_times
            take = min(left, span)
            p += take * w
            left -= take
            if left <= 0:
                break
        return p

    # What reduces an image to bandwidth B, by --lowfreq and --data_pipeline ('fourier' runs
    # on the device whatever the pipeline).  A new pipeline adds its entry here.
    LOWFREQ_OPS = {
        ('fourier', None): 'B by Fourier crop on the device',
        ('lanczos', 'published'): 'B by Lanczos resize on the CPU, published pipeline',
        ('lanczos', 'fast'): 'B by bicubic resize of the crop to B on the CPU, fast pipeline',
        ('lanczos', 'gpu'): 'B by anti-aliased bicubic resize of the crop to B on the device, gpu pipeline',
        ('none', None): 'no low-frequency crop',
    }

    def lowfreq_op(self, pipeline='published'):
        ops = self.LOWFREQ_OPS
        return ops.get((self.lowfreq, None)) or ops.get((self.lowfreq, pipeline)) or \
            f'B by {self.lowfreq}, {pipeline} pipeline'

    def table(self, baseline_epochs=None, pipeline='published', world=1, per='GPU', images=None):
        """The whole plan as text: one row per stage, then totals, speedups and notes.

        baseline_epochs: also compare with a baseline of that many epochs at the base size
        (the paper's 300-epoch one when that is the comparison the run makes); world and
        per: processes and what one is ('GPU' or 'process'), for the global batch and the
        batch line; images: training images per data epoch, for the optimizer steps (None:
        not known, '-').
        """
        base = self.base_size
        total = self.total_compute
        # the RandAugment magnitude column only where some stage has one (MAE: none)
        mag = any(s.magnitude is not None for s in self.stages)
        m_head = f' {"m":>3}' if mag else ''
        hdr = (f'{"stage":>5} {"B":>4}{m_head} {"epochs":>15} {"equiv ep":>9} {"compute":>8} '
               f'{"batch x freq":>12} {"global":>7} {"lr x":>5} {"opt steps":>10} {"replay":>8}')
        lines = [f'Training plan: {self.name} ({self.lowfreq_op(pipeline)}; base {base}, '
                 f'schedules follow {self.progress_unit})', hdr, '-' * len(hdr)]
        for s in self.stages:
            rep = f'{s.replay_times}x/{s.buffer_size}' if s.replay_times > 1 else '-'
            ep = f'{s.start_epoch}-{s.start_epoch + s.epochs - 1} ({s.epochs})'
            m = f' {"-" if s.magnitude is None else s.magnitude:>3}' if mag else ''
            steps = self.optimizer_steps(s, images, world)
            lines.append(f'{s.index:>5} {s.size:>4}{m} {ep:>15} {s.compute(base):>9.2f} '
                         f'{100 * s.compute(base) / total:>7.1f}% {f"{s.batch_size} x {s.update_freq}":>12} '
                         f'{world * s.batch_size * s.update_freq:>7} {s.lr_scale:>5.2f} '
                         f'{"-" if steps is None else steps:>10} {rep:>8}')
        lines.append('-' * len(hdr))
        lines.append(f'total: {self.num_epochs} data epochs, {total:.2f} equivalent epochs at {base}')
        if total > 0 and abs(total - self.num_epochs) > 1e-9:
            # meaningful for any budget: the same passes over the data, all at the base size
            lines.append(f'theoretical speedup vs the same {self.num_epochs} data epochs at {base}: '
                         f'{self.num_epochs / total:.2f}x')
        if baseline_epochs and total > 0:
            lines.append(f'theoretical speedup vs the {baseline_epochs}-epoch baseline at {base}: '
                         f'{baseline_epochs / total:.2f}x')
        if self.stages:
            unit = 'GPU' if per == 'GPU' else 'process'
            procs = f'{world} {unit}' + ('' if world == 1 else 'es' if unit == 'process' else 's')
            globals_ = sorted({world * s.batch_size * s.update_freq for s in self.stages})
            glob = ' or '.join(map(str, globals_)) + (' (by stage)' if len(globals_) > 1 else '')
            lines.append(f'{procs} ("batch x freq" is per {unit}): global batch {glob} per optimizer step')
            if images:
                total_steps = sum(self.optimizer_steps(s, images, world) for s in self.stages)
                lines.append(f'{total_steps} optimizer steps in all, for {images} training images per data epoch')
        for n in self.notes:
            lines.append(f'note: {n}')
        return '\n'.join(lines)

    @staticmethod
    def optimizer_steps(stage, images, world=1):
        """Optimizer steps of `stage` on `world` processes for `images` training images per data
        epoch (None when not known): as the loader deals them, each process takes images // world
        (the sampler drops the rest), whole loader batches, an update every update_freq of them."""
        if not images:
            return None
        batches = (images // world) // stage.loader_batch
        return stage.epochs * (batches // stage.update_freq)

    def summary(self):
        """Plain values for config.json."""
        return {
            'name': self.name, 'budget_epochs': self.budget, 'base_size': self.base_size,
            'progress_unit': self.progress_unit,
            'lowfreq': self.lowfreq, 'warmup': self.warmup, 'num_epochs': self.num_epochs,
            'total_compute': self.total_compute,
            'stages': [{k: getattr(s, k) for k in ('index', 'size', 'magnitude', 'epochs', 'batch_size',
                                                   'update_freq', 'replay_times', 'buffer_size',
                                                   'start_epoch')}
                       | ({} if s.cost is None else {'cost': s.cost})
                       | ({} if s.lr_scale == 1.0 else {'lr_scale': s.lr_scale}) for s in self.stages],
        }


def relative_cost(cost, size, base):
    """Per-image compute at `size` over that at `base`: cost(size) / cost(base) for a model's
    own compute model (a callable of the input size), (size / base)^2 without one."""
    if cost is None:
        return (size / base) ** 2
    return float(cost(size)) / float(cost(base))


def split_rounded(amounts):
    """Integers whose running sums are the rounded running sums of `amounts`.

    Custom curriculum files use this; the et/etpp presets cut stage ends as the official
    drivers do instead (presets.driver_spans).

    Rounding the cumulative boundaries (not each piece) keeps the total within 0.5
    of the exact one, e.g. 108.9 + 108.9 -> 109 + 109 but 39.2 x 4 -> 39, 39, 40, 39.
    """
    out, acc, prev = [], 0.0, 0
    for a in amounts:
        acc += a
        b = int(math.floor(acc + 0.5))
        out.append(b - prev)
        prev = b
    return out
