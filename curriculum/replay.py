"""Replay buffer of EfficientTrain++ for CPU- or IO-bound data loading.

At small bandwidths a training step costs (224/B)^2 less while decoding and augmenting
a JPEG does not, so loading becomes the bottleneck.  The loader then delivers
batch/replay_times fresh samples per step and the buffer fills the rest of the step's
batch with augmented samples kept from earlier steps.

Mechanics (METHOD.md "Replay buffer", as the published reference implements them):

- Each fresh loader batch is split along the batch axis into `num_chunks` (32) equal
  chunks, which are appended to a FIFO.
- `buffer_size` counts loader batches, not chunks or samples: the FIFO holds at most
  buffer_size x num_chunks chunks, i.e. buffer_size loader batches' worth of samples.
  After an append that overflows it, the oldest num_chunks chunks (the oldest batch)
  are evicted.  E.g. DeiT-S at B=96 (buffer 1920, loader batch 512/4 = 128 per GPU)
  keeps 1920 x 128 = 245,760 samples, about 13.6 GB of fp16 per process.
- The step then trains on the fresh batch followed by (replay_times - 1) x num_chunks
  chunks drawn uniformly with replacement from the whole FIFO, the chunks just added
  included; mixup / cutmix come afterwards, in the caller.
- In steady state each step draws (replay_times - 1) x num_chunks chunks from
  buffer_size x num_chunks and a chunk lives buffer_size steps, so every sample is used
  replay_times times on average (once fresh) whatever buffer_size is.  That is why the
  caller divides the data epochs by replay_times and keeps steps and compute unchanged
  (with update_freq 1).

Chunks are stored on the CPU as fp16 (halving host memory); targets are stored exactly,
in their own dtype.  Drawn chunks return to the fresh batch's device and dtype.  At each
stage, whose bandwidth differs, a new buffer is started.

The buffer is not saved (it would be ~14 GB per process): it is a function of the last
buffer_size loader batches of the stage, and every loaded batch is reproducible (seeded
per sample and per batch), so a resumed run rebuilds it with `refill` from the batches
`history` names, slot for slot, and continues bit-exactly.
"""
from typing import Callable, Iterable, List, Optional, Tuple

import torch

__all__ = ["ReplayBuffer", "history"]


class ReplayBuffer:
    """FIFO of augmented sample chunks, replayed uniformly with replacement.

    buffer_size: capacity in loader batches (>= 1 when replay_times > 1).
    replay_times: the step's batch is replay_times x the fresh batch; 1 disables replay
        (step returns its inputs unchanged and nothing is stored).
    num_chunks: chunks per fresh batch; the fresh batch size must be a multiple of it.
    generator: CPU torch.Generator for the draws (reproducible replay); None uses the
        global RNG.
    """

    def __init__(self, buffer_size: int, replay_times: int, num_chunks: int = 32,
                 generator: Optional[torch.Generator] = None,
                 storage_dtype: torch.dtype = torch.float16):
        for name, value, lowest in (("replay_times", replay_times, 1), ("num_chunks", num_chunks, 1),
                                    ("buffer_size", buffer_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
        if replay_times > 1 and buffer_size < 1:
            raise ValueError(f"replay_times={replay_times} needs buffer_size >= 1, got {buffer_size}")
        self.buffer_size = buffer_size
        self.replay_times = replay_times
        self.num_chunks = num_chunks
        self.generator = generator
        self.storage_dtype = storage_dtype
        self.capacity = buffer_size * num_chunks if replay_times > 1 else 0
        # A ring of slots: slot order is not age order, but draws are uniform over the
        # filled slots, so only which chunks are present matters; the write cursor
        # always overwrites the oldest chunk.
        self._images: List[Optional[torch.Tensor]] = [None] * self.capacity
        self._targets: List[Optional[torch.Tensor]] = [None] * self.capacity
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        """Number of chunks held."""
        return self._count

    def clear(self) -> None:
        self._images = [None] * self.capacity
        self._targets = [None] * self.capacity
        self._next = 0
        self._count = 0

    @property
    def num_samples(self) -> int:
        return sum(t.shape[0] for t in self._targets if t is not None)

    def _append(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        # copy=True: the caller (mixup) may modify its batch in place after step(); the
        # stored chunks must not alias it, also when no dtype / device change happens.
        # Casting on the batch's device first halves the device-to-host transfer.
        images = images.detach().to(self.storage_dtype).to("cpu", copy=True)
        targets = targets.detach().to("cpu", copy=True)
        # Chunks are views into one per-batch tensor; the chunks of a batch are added
        # and (capacity being a multiple of num_chunks) evicted together, so no batch
        # storage outlives its chunks.
        for img, tgt in zip(images.chunk(self.num_chunks), targets.chunk(self.num_chunks)):
            self._images[self._next] = img
            self._targets[self._next] = tgt
            self._next = (self._next + 1) % self.capacity
            self._count = min(self._count + 1, self.capacity)

    def refill(self, appended: int, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Rebuild the buffer of a run that had appended `appended` loader batches (this stage).

        batches: the last min(appended, buffer_size) of them, oldest first, as step() got
        them.  Batch b went to slots [(b mod buffer_size) x num_chunks, ...), so the
        rebuilt ring equals the original slot for slot and the next draws pick the same
        chunks.
        """
        self.clear()
        keep = min(appended, self.buffer_size)
        self._next = ((appended - keep) % self.buffer_size) * self.num_chunks
        n = 0
        for images, targets in batches:
            self._append(images, targets)
            n += 1
        if n != keep:
            raise ValueError(f"refill needs the last {keep} of {appended} loader batches, got {n}")

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the fresh batch, return it followed by the replayed chunks."""
        if self.replay_times == 1:
            return images, targets
        n = images.shape[0]
        if targets.shape[0] != n:
            raise ValueError(f"images and targets disagree on the batch size: {n} vs {targets.shape[0]}")
        if n == 0 or n % self.num_chunks:
            # Equal chunks keep the output batch exactly replay_times x the fresh one
            # (mixup needs an even, fixed batch); load with drop_last=True.
            raise ValueError(f"fresh batch size {n} must be a positive multiple of num_chunks={self.num_chunks}")
        if self._count:
            held = self._images[(self._next - 1) % self.capacity]
            if held.shape[1:] != images.shape[1:]:
                raise ValueError(f"batch samples of shape {tuple(images.shape[1:])} do not match the "
                                 f"buffered {tuple(held.shape[1:])}; start a new ReplayBuffer for a new stage")
        self._append(images, targets)
        num_draws = (self.replay_times - 1) * self.num_chunks
        picks = torch.randint(self._count, (num_draws,), generator=self.generator).tolist()
        # One concatenation on the host and one transfer, instead of a copy per chunk.
        replay_images = torch.cat([self._images[i] for i in picks])
        replay_targets = torch.cat([self._targets[i] for i in picks])
        replay_images = replay_images.to(images.device, images.dtype, non_blocking=True)
        replay_targets = replay_targets.to(targets.device, non_blocking=True)
        return torch.cat([images, replay_images]), torch.cat([targets, replay_targets])

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(buffer_size={self.buffer_size}, replay_times={self.replay_times}, "
                f"num_chunks={self.num_chunks}, held_chunks={self._count}/{self.capacity})")


def history(stage_epochs: Iterable[int], steps_in: Callable[[int], int], epoch: int, step: int,
            buffer_size: int) -> Tuple[int, List[Tuple[int, int, int]]]:
    """(batches appended before (epoch, step) in the stage, [(epoch, first, last), ...]).

    stage_epochs: the stage's epochs (ascending); steps_in(e): loader batches of epoch e.
    The ranges name the last min(appended, buffer_size) of those batches, oldest first,
    as (epoch, first batch, one past the last batch) to reload for ReplayBuffer.refill.
    """
    spans = []
    for e in stage_epochs:
        if e > epoch:
            break
        spans.append((e, step if e == epoch else steps_in(e)))
    appended = sum(n for _, n in spans)
    need, ranges = min(appended, buffer_size), []
    for e, n in reversed(spans):
        if need == 0:
            break
        take = min(n, need)
        if take:
            ranges.append((e, n - take, n))
        need -= take
    return appended, ranges[::-1]
