import pytest
import torch

from curriculum.replay import ReplayBuffer, history


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _batch(batch_index, n=64, size=8):
    """Images whose every pixel holds the sample's id (exact in fp16); targets = id."""
    ids = torch.arange(n) + batch_index * n
    images = ids.float().view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, ids


def test_replay_times_one_is_identity():
    buf = ReplayBuffer(buffer_size=0, replay_times=1)
    images, targets = _batch(0)
    out_images, out_targets = buf.step(images, targets)
    assert out_images is images and out_targets is targets
    assert len(buf) == 0


def test_output_batch_and_pairing():
    buf = ReplayBuffer(buffer_size=4, replay_times=4, num_chunks=32, generator=torch.Generator().manual_seed(0))
    for b in range(6):
        images, targets = _batch(b)
        out_images, out_targets = buf.step(images, targets)
        assert out_images.shape == (256, 3, 8, 8) and out_targets.shape == (256,)
        assert out_images.dtype == images.dtype and out_targets.dtype == torch.int64
        assert torch.equal(out_images[:64], images) and torch.equal(out_targets[:64], targets)
        # Each replayed sample keeps its own target.
        assert torch.equal(out_images[:, 0, 0, 0].long(), out_targets)
        # Replayed chunks are whole chunks (2 consecutive ids starting at an even id)
        # of batches still in the buffer (the last 4, the one just added included).
        replay = out_targets[64:].view(-1, 2)
        assert torch.equal(replay[:, 1] - replay[:, 0], torch.ones(96, dtype=torch.long))
        assert (replay[:, 0] % 2 == 0).all()
        assert (replay // 64 >= max(0, b - 3)).all() and (replay // 64 <= b).all()


def test_buffer_is_bounded_fifo_in_fp16():
    buf = ReplayBuffer(buffer_size=2, replay_times=2, num_chunks=8)
    for b in range(5):
        images, targets = _batch(b, n=16)
        buf.step(images.double() / 7, targets.int())
        assert len(buf) == min(8 * (b + 1), 16)
        assert buf.num_samples == min(16 * (b + 1), 32)
    held_images = [c for c in buf._images if c is not None]
    held_targets = torch.cat([t for t in buf._targets if t is not None])
    assert all(c.dtype == torch.float16 and c.device.type == "cpu" for c in held_images)
    assert held_targets.dtype == torch.int32  # targets kept in their own dtype
    # Only the two newest batches (ids 48..79) remain.
    assert sorted(held_targets.tolist()) == list(range(48, 80))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replayed_values_are_fp16_copies_of_fresh_samples(dtype):
    g = torch.Generator().manual_seed(1)
    buf = ReplayBuffer(buffer_size=3, replay_times=3, num_chunks=4, generator=torch.Generator().manual_seed(2))
    fresh = {}
    for b in range(4):
        images = torch.randn(8, 3, 6, 6, generator=g).to(dtype)
        targets = torch.arange(8) + 8 * b
        for i, t in enumerate(targets.tolist()):
            fresh[t] = images[i].clone()
        out_images, out_targets = buf.step(images, targets)
        assert out_images.dtype == dtype
        for img, t in zip(out_images[8:], out_targets[8:].tolist()):
            assert torch.equal(img, fresh[t].half().to(dtype))
        # Mixup works in place on the batch; the buffer must not alias it (an fp16
        # batch needs no cast, so this checks the explicit copy).
        images.mul_(0)
        out_images.mul_(0)


def test_deterministic_with_seeded_generator():
    def run(seed):
        buf = ReplayBuffer(buffer_size=3, replay_times=2, num_chunks=4, generator=torch.Generator().manual_seed(seed))
        return [buf.step(*_batch(b, n=8))[1] for b in range(5)]

    first, again, other = run(123), run(123), run(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_each_sample_used_replay_times_on_average():
    # A chunk lives buffer_size steps and each step draws (r-1) x num_chunks of the
    # buffer_size x num_chunks chunks, so it is replayed r-1 times on average.
    buf = ReplayBuffer(buffer_size=5, replay_times=3, num_chunks=4, generator=torch.Generator().manual_seed(0))
    uses = torch.zeros(400 * 8)
    for b in range(400):
        _, targets = buf.step(*_batch(b, n=8))
        uses += torch.bincount(targets, minlength=uses.numel())
    steady = uses[8 * 10: 8 * 390]  # ids that lived a full lifetime in the buffer
    assert abs(steady.mean().item() - 3.0) < 0.1


def test_invalid_use_is_rejected():
    with pytest.raises(ValueError):
        ReplayBuffer(buffer_size=0, replay_times=2)
    with pytest.raises(ValueError):
        ReplayBuffer(buffer_size=4, replay_times=0)
    buf = ReplayBuffer(buffer_size=4, replay_times=2, num_chunks=32)
    with pytest.raises(ValueError, match="multiple of num_chunks"):
        buf.step(*_batch(0, n=48))
    buf.step(*_batch(0, n=64, size=8))
    with pytest.raises(ValueError, match="new ReplayBuffer"):
        buf.step(*_batch(1, n=64, size=16))
    buf.clear()
    assert len(buf) == 0
    assert buf.step(*_batch(1, n=64, size=16))[0].shape == (128, 3, 16, 16)


@pytest.mark.parametrize("appended", [0, 2, 4, 7, 13])
def test_refill_rebuilds_the_ring_slot_for_slot(appended):
    """A buffer refilled from the last batches continues with the same draws as the original."""
    original = ReplayBuffer(buffer_size=4, replay_times=2, num_chunks=8)
    for b in range(appended):
        original._append(*_batch(b, n=16))
    count, ranges = history([0, 1, 2], lambda e: 5, appended // 5, appended % 5, 4)
    assert count == appended
    wanted = [e * 5 + b for e, first, last in ranges for b in range(first, last)]
    assert wanted == list(range(appended - min(appended, 4), appended))
    rebuilt = ReplayBuffer(buffer_size=4, replay_times=2, num_chunks=8)
    rebuilt.refill(appended, (_batch(b, n=16) for b in wanted))
    assert (rebuilt._next, rebuilt._count) == (original._next, original._count)
    for a, b in zip(original._targets, rebuilt._targets):
        assert (a is None and b is None) or torch.equal(a, b)
    fresh = _batch(99, n=16)
    torch.manual_seed(5)
    images_a, targets_a = original.step(*fresh)
    torch.manual_seed(5)
    images_b, targets_b = rebuilt.step(*fresh)
    assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b)


def test_history_spans_epochs_of_the_stage_only():
    steps = {3: 10, 4: 10, 5: 10}.__getitem__
    assert history([3, 4, 5], steps, 5, 4, 12) == (24, [(4, 2, 10), (5, 0, 4)])
    assert history([3, 4, 5], steps, 3, 0, 12) == (0, [])
    assert history([3, 4, 5], steps, 4, 0, 30) == (10, [(3, 0, 10)])


def test_refill_with_the_wrong_number_of_batches_fails():
    buf = ReplayBuffer(buffer_size=4, replay_times=2, num_chunks=8)
    with pytest.raises(ValueError, match="last 3 of 3"):
        buf.refill(3, (_batch(b, n=16) for b in range(2)))
