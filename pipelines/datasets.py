"""Datasets, per-stage transforms and the loaders.

Training uses ONE DataLoader for the whole run: the dataset holds one transform
per curriculum stage and the batch sampler tags every index with the current
stage and epoch and cuts batches of the stage's size. The sampler runs in the main
process, so a new stage starts at the first batch of its first epoch even with
persistent workers. Augmentation randomness is seeded from (seed, epoch, index),
so a sample's augmentation does not depend on the worker that draws it or on an
interruption: resuming needs only the epoch and the number of batches done.
"""
import atexit
import contextlib
import functools
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours: see _LEAVING)
import os
import random
import re
import signal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from PIL import ImageOps
from timm.data import auto_augment as timm_auto_augment
from torchvision import datasets as tv_datasets
from torchvision import transforms

from curriculum.lowfreq import LanczosResize
from pipelines.errors import BadImageError
from pipelines.fastpath import DeviceTransform, LazyImageFolder, fast_train_transform
from pipelines.gpudata import (DevicePrefetcher, EncodedCollate, EncodedImageFolder, GpuDataTransform,
                               gpu_train_transform)
from pipelines.store import ImageStore, StoreError
from utils import UserError

def _posterize(img, bits_to_keep, **__):
    # timm's PosterizeIncreasing asks for 0 bits at magnitude >= 10 (m9 plus mstd0.5
    # noise gets there). Pillow < 13 returned a black image for 0 bits; Pillow 13 raises.
    # Keep the old result so strong RandAugment never crashes a run.
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


# AugmentOp looks its function up in NAME_TO_OP when a policy is built, so this must run
# before any transform is created (it does: at import of this module).
for _name, _fn in list(timm_auto_augment.NAME_TO_OP.items()):
    if _fn is timm_auto_augment.posterize:
        timm_auto_augment.NAME_TO_OP[_name] = _posterize

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


# ---------------------------------------------------------------------------
# SYNTH: a generated dataset with low- and high-frequency class cues
# ---------------------------------------------------------------------------

class SynthDataset(Dataset):
    """Deterministic generated images with low- and high-frequency class cues.

    Low-frequency cues: a two-colour gradient at some angle and a large shape. High-
    frequency cue: a grating with a period of 2.5-4.5 px and some orientation,
    which survives only at high bandwidth. Classes 2k and 2k+1 share their
    low-frequency layout and differ only in texture, so low-pass views separate the
    pairs and the full bandwidth is needed to tell each pair apart: a low-frequency
    curriculum has something to learn early and something to add late. Every image
    jitters position, colour, phase and noise, all from (seed, split, index).
    """

    SHAPES = ('disk', 'square', 'diamond', 'ring', 'bar')

    def __init__(self, num_classes=10, per_class=100, image_size=64, seed=0, split='train'):
        if num_classes < 2 or per_class < 1 or image_size < 8:
            raise UserError('SYNTH needs --synth_classes >= 2, --synth_per_class >= 1 and '
                            '--synth_image_size >= 8')
        self.num_classes, self.per_class, self.size = num_classes, per_class, image_size
        self.seed = seed
        self.split_id = {'train': 0, 'val': 1}[split]
        self.classes = [f'class_{c:03d}' for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        self._params = [self._class_params(c) for c in range(num_classes)]
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
        self._grid = (yy, xx)

    def _class_params(self, c):
        low = np.random.default_rng([self.seed, 7919, c // 2])
        high = np.random.default_rng([self.seed, 104729, c])
        # the two classes of a pair get clearly different gratings
        orient = (c % 2) * np.pi / 2 + high.uniform(0, np.pi / 2)
        return {
            'col_a': low.uniform(0, 255, 3), 'col_b': low.uniform(0, 255, 3),
            'angle': low.uniform(0, 2 * np.pi),
            'shape': self.SHAPES[(c // 2) % len(self.SHAPES)],
            'centre': low.uniform(0.3, 0.7, 2), 'radius': low.uniform(0.15, 0.28),
            'shape_col': low.uniform(0, 255, 3),
            'period': high.uniform(2.5, 4.5) / self.size, 'orient': orient,
        }

    def __len__(self):
        return self.num_classes * self.per_class

    def render(self, index):
        c = self.targets[index]
        p = self._params[c]
        rng = np.random.default_rng([self.seed, self.split_id, index])
        yy, xx = self._grid
        a = p['angle'] + rng.normal(0, 0.2)
        t = np.clip(0.5 + (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)), 0, 1)[..., None]
        img = p['col_a'] + rng.normal(0, 12, 3) + t * (p['col_b'] - p['col_a'])
        cy, cx = p['centre'] + rng.normal(0, 0.05, 2)
        r = p['radius'] * rng.uniform(0.85, 1.15)
        dy, dx = yy - cy, xx - cx
        mask = {
            'disk': dy ** 2 + dx ** 2 < r ** 2,
            'square': np.maximum(np.abs(dy), np.abs(dx)) < r * 0.85,
            'diamond': np.abs(dy) + np.abs(dx) < r * 1.2,
            'ring': np.abs(np.sqrt(dy ** 2 + dx ** 2) - r * 0.8) < r * 0.3,
            'bar': (np.abs(dy) < r * 0.35) & (np.abs(dx) < r * 1.3),
        }[p['shape']]
        img = np.where(mask[..., None], p['shape_col'] + rng.normal(0, 12, 3), img)
        o = p['orient'] + rng.normal(0, 0.05)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (np.cos(o) * xx + np.sin(o) * yy) / p['period'] + phase)
        img = img + rng.uniform(25, 40) * wave[..., None] + rng.normal(0, 6, img.shape)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), 'RGB')

    def __getitem__(self, index):
        return self.render(index), self.targets[index]


# ---------------------------------------------------------------------------
# building datasets
# ---------------------------------------------------------------------------

def _image_folder(root, what):
    if not root:
        raise UserError(f'{what} is not set: pass --data_path (and --eval_data_path for image_folder)')
    if not os.path.isdir(root):
        raise UserError(f'{what} {root} is not a directory: check --data_path/--eval_data_path')
    try:
        ds = tv_datasets.ImageFolder(root, transform=None)
    except FileNotFoundError:
        raise UserError(f'{what} {root} has no class folders with images ({", ".join(IMG_EXTENSIONS[:3])}, ...): '
                        f'expected <root>/<class>/<image>') from None
    if len(ds) == 0:
        raise UserError(f'{what} {root} holds no images')
    return ds


def build_base_datasets(args, with_val=True):
    """(train, val, nb_classes): datasets that yield (PIL image, label), no transform yet.

    with_val=False (pre-training, which evaluates nothing): val is None and no validation
    folder is needed; the classes are the training set's."""
    ds = args.data_set
    if ds == 'SYNTH':
        kw = dict(num_classes=args.synth_classes, image_size=args.synth_image_size, seed=args.synth_seed)
        train = SynthDataset(per_class=args.synth_per_class, split='train', **kw)
        val = SynthDataset(per_class=args.synth_val_per_class, split='val', **kw) if with_val else None
    elif ds == 'CIFAR':
        root = args.data_path or os.path.join(os.getcwd(), 'data', 'cifar100')
        try:
            train = tv_datasets.CIFAR100(root, train=True, download=True)
            val = tv_datasets.CIFAR100(root, train=False, download=True)
        except Exception as e:  # noqa: BLE001 - download or archive problems
            raise UserError(f'CIFAR-100 could not be loaded from {root} ({e}): put cifar-100-python there '
                            f'or allow the download') from None
    elif ds in ('IMNET', 'image_folder'):
        if ds == 'IMNET':
            if not args.data_path:
                raise UserError('--data_set IMNET needs --data_path holding train/ and val/')
            train_root = os.path.join(args.data_path, 'train')
            val_root = args.eval_data_path or os.path.join(args.data_path, 'val')
        else:
            train_root, val_root = args.data_path, args.eval_data_path
            if not val_root and not args.eval and with_val:
                raise UserError('--data_set image_folder needs --eval_data_path for the validation images')
        val = _image_folder(val_root, 'validation folder') if with_val else None
        train = None if args.eval else _image_folder(train_root, 'training folder')
        if train is not None and val is not None and train.classes != val.classes:
            only_t = sorted(set(train.classes) - set(val.classes))[:3]
            only_v = sorted(set(val.classes) - set(train.classes))[:3]
            raise UserError(f'train and val class folders differ (only in train: {only_t}, only in val: '
                            f'{only_v}): both must hold the same class folders')
    else:
        raise UserError(f'unknown --data_set {ds}: use IMNET, image_folder, CIFAR or SYNTH')
    nb = len((val if val is not None else train).classes)
    if args.nb_classes is not None and args.nb_classes != nb:
        raise UserError(f'--nb_classes {args.nb_classes} disagrees with the data ({nb} classes): '
                        f'drop --nb_classes or fix the dataset')
    return train, val, nb


# ---------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------

def with_magnitude(aa, magnitude):
    """timm's RandAugment string with its magnitude replaced, e.g. rand-m9-mstd0.5-inc1 -> rand-m3-..."""
    if magnitude is None or not aa or aa == 'none':
        return aa
    if not aa.startswith('rand'):
        raise UserError(f'the curriculum sets the RandAugment magnitude but --aa is {aa}: '
                        f'use a RandAugment policy such as rand-m9-mstd0.5-inc1')
    parts = aa.split('-')
    parts = [p for p in parts if not re.fullmatch(r'm\d+(\.\d+)?', p)]
    return '-'.join([parts[0], f'm{magnitude}'] + parts[1:])


# The random-resized-crop area range of the supervised recipes (timm's default); MAE
# pre-training crops from (0.2, 1.0) (main_pretrain.py --crop_scale).
CROP_SCALE = (0.08, 1.0)


def augment_kwargs(args, magnitude):
    """timm's create_transform arguments of a stage's training transform, from the flags.

    The augmentation is a choice of values, never an edit of timm's transform lists: the
    supervised recipes take the augment group's flags (RandAugment at the stage's magnitude,
    colour jitter without it, random erasing); MAE pre-training sets RandAugment, colour
    jitter and erasing off and --crop_scale 0.2 1.0, which leaves timm's random resized crop
    and horizontal flip, MAE's augmentation.  args.crop_scale: the crop's area range
    (default CROP_SCALE).
    """
    aa = with_magnitude(args.aa, magnitude)
    return dict(is_training=True, color_jitter=args.color_jitter if args.color_jitter > 0 else None,
                auto_augment=None if aa in (None, '', 'none') else aa, interpolation=args.train_interpolation,
                re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                scale=tuple(getattr(args, 'crop_scale', None) or CROP_SCALE),
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def train_transform(args, size, magnitude, lowfreq):
    """The CPU pipeline of one stage (its augmentation: augment_kwargs).

    none:    RandomResizedCrop(size) ... at the stage size (the baseline)
    lanczos: the EfficientTrain++ order: crop and RandAugment at the base size, then a
             Lanczos resize to B, then ToTensor/Normalize/RandomErasing
    fourier: the full pipeline at the base size; the crop to B happens on the device
    """
    kw = augment_kwargs(args, magnitude)
    aa = kw['auto_augment']
    if getattr(args, 'data_pipeline', 'published') == 'gpu':
        # the worker draws the same crop, flip and augmentation parameters and reads the
        # file's bytes; decoding and every pixel operation run on the device (pipelines/gpudata.py)
        return gpu_train_transform(size, size if lowfreq == 'none' else args.base_input_size, lowfreq, kw,
                                   aa=aa, re_prob=args.reprob,
                                   re_count=args.recount, augment_at=getattr(args, 'gpu_augment_at', 'base'))
    if getattr(args, 'data_pipeline', 'published') == 'fast':
        # same crop, flip and augmentation, done at the output size; uint8 out, and the
        # normalisation and random erasing happen on the device (pipelines/fastpath.py)
        return fast_train_transform(size, size if lowfreq == 'none' else args.base_input_size, lowfreq, kw)
    if lowfreq == 'none':
        return create_transform(size, **kw)
    base = args.base_input_size
    if lowfreq == 'fourier' or size == base:
        return create_transform(base, **kw)
    # timm's separate=True gives (crop+flip, augment, to-tensor+normalize+erase); the
    # Lanczos resize goes between the last two without touching timm's lists.
    primary, secondary, final = create_transform(base, separate=True, **kw)
    return transforms.Compose([primary, secondary, LanczosResize(size), final])


def eval_transform(size, crop_pct=None):
    """Resize(size / crop_pct, bicubic) + CenterCrop(size); at 384 and above, resize only."""
    if size >= 384:
        resize = [transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)]
    else:
        crop_pct = crop_pct or 0.875
        resize = [transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
                  transforms.CenterCrop(size)]
    return transforms.Compose(resize + [transforms.ToTensor(),
                                        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


class TransformedDataset(Dataset):
    """(transform(image), label); an unreadable image fails naming its file (evaluation skips nothing:
    every image counts in the accuracy)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            img, target = self.base[i]
            return self.transform(img), target
        except _DECODE_ERRORS as e:
            raise BadImageError(f'{_sample_path(self.base, i)} is not a readable image ({type(e).__name__}: '
                                f'{str(e)[:120]}): remove or replace it (evaluation counts every image, '
                                f'so --skip_bad_images does not apply)') from None


# ---------------------------------------------------------------------------
# samplers and loaders
# ---------------------------------------------------------------------------

def _sample_path(base, index):
    samples = getattr(base, 'samples', None)
    return samples[index][0] if samples is not None else f'sample {index}'


# Decoding failures of broken, truncated or non-image files. Transform bugs (ValueError,
# TypeError, ...) are not in this list and still surface as themselves.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)


@contextlib.contextmanager
def caller_rng_kept():
    """Outside a DataLoader worker, restore python's, numpy's and torch's CPU RNG state on exit.

    A loader without workers runs in the training process, whose random streams (dropout,
    mixup) must not depend on the data it loaded; a worker owns its process and skips the
    (numpy: ~90 us) save and restore.
    """
    if torch.utils.data.get_worker_info() is not None:
        yield
        return
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


def seed_sample(seed):
    """Seed python, numpy and torch's CPU generator for one sample."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    # Only the CPU generator: torch.manual_seed also seeds every accelerator backend, which
    # costs ~160 us per call (3-6% of a worker's time per image); transforms draw on the CPU.
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed):
    """Seed python, numpy and torch for one sample; outside a worker, restore the caller's state."""
    with caller_rng_kept():
        seed_sample(seed)
        yield


def sample_seed(seed, epoch, index):
    # a fixed integer mix: the same (seed, epoch, index) gives the same augmentation everywhere
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63 - 1)


class StageTransformDataset(Dataset):
    """Sample `index` through the transform of `stage`, seeded from (seed, epoch, index).

    Unreadable images fail naming the file, or with skip_bad=True are replaced by the
    next readable one and counted in `bad_count` (shared with the workers).
    """

    def __init__(self, base, transforms, seed=0, skip_bad=False):
        self.base, self.transforms, self.seed, self.skip_bad = base, list(transforms), seed, skip_bad
        self.bad_count = multiprocessing.Value('i', 0)

    def __len__(self):
        return len(self.base)

    def _path(self, index):
        return _sample_path(self.base, index)

    def __getitem__(self, key):
        with caller_rng_kept():
            return self._sample(*key)

    def __getitems__(self, keys):
        # torch's fetchers call this with a whole batch of keys (and then collate): the
        # caller's RNG state is saved once per batch instead of once per sample.
        with caller_rng_kept():
            return [self._sample(*key) for key in keys]

    def _sample(self, index, stage, epoch):
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            try:
                seed_sample(sample_seed(self.seed, epoch, i))
                img, target = self.base[i]
                return self.transforms[stage](img), target
            except _DECODE_ERRORS as e:
                if not self.skip_bad:
                    raise BadImageError(f'{self._path(i)} is not a readable image ({type(e).__name__}: '
                                        f'{str(e)[:120]}): remove or replace it, or pass --skip_bad_images true')
                with self.bad_count.get_lock():
                    self.bad_count.value += 1
                print(f'WARNING: skipped unreadable image {self._path(i)} ({type(e).__name__})', flush=True)
        raise BadImageError('no readable image in the training set: check --data_path')


class StageBatchSampler(Sampler):
    """Batches of (index, stage, epoch), sized by the stage the epoch belongs to.

    set_epoch(epoch, skip=k) leaves out the first k batches: a mid-epoch resume
    continues with exactly the batches the interrupted run had not seen.
    """

    def __init__(self, sampler, plan):
        self.sampler, self.plan = sampler, plan
        self.set_epoch(0)

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip
        self.stage = self.plan.stage_at(epoch)
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        bs, tag, epoch = self.stage.loader_batch, self.stage.index, self.epoch
        indices = list(self.sampler)[self.skip * bs:]
        for start in range(0, len(indices) - bs + 1, bs):
            yield [(i, tag, epoch) for i in indices[start:start + bs]]

    def __len__(self):
        return len(self.sampler) // self.stage.loader_batch - self.skip


# Set once the training process is leaving (any exit path: finished, error, SIGTERM
# recovery). Loader workers ignore SIGTERM until then, and end on it from then on.
# multiprocessing's exit handler (multiprocessing.util._exit_function, registered when
# multiprocessing.util is imported, above) terminates daemonic children with SIGTERM and
# then joins them: a worker ignoring SIGTERM at that point hangs the exit forever (it
# happened after a data error in a worker). atexit runs handlers last-registered first,
# so this one sets the flag before that handler terminates the workers.
class SharedFlag:
    """A bool shared with forked or spawned children, read without any lock.

    The workers read it inside their SIGTERM handler.  A multiprocessing.Event would take its
    cross-process lock there, and a second SIGTERM arriving while the handler holds it (a
    scheduler signalling every process, then torchrun signalling each worker's process group)
    re-enters the handler, which then waits forever on its own lock: the worker never ends,
    and the training process blocks in release_workers() on the lock that worker holds.
    One byte of shared memory (multiprocessing.RawValue) is read and written atomically.
    """

    def __init__(self):
        self._value = multiprocessing.get_context().RawValue('b', 0)

    def set(self):
        self._value.value = 1

    def clear(self):
        self._value.value = 0

    def is_set(self):
        return bool(self._value.value)


_LEAVING = SharedFlag()
atexit.register(_LEAVING.set)


def release_workers():
    """The training process is leaving: its loader workers now end on SIGTERM."""
    _LEAVING.set()


def hold_workers():
    """A run starts (again, in this process): its workers ignore SIGTERM until release_workers()."""
    _LEAVING.clear()


def _worker_sigterm(leaving, signum, frame):
    if leaving.is_set():
        os._exit(0)  # nothing of the worker's is worth keeping; no cleanup that could block


def _worker_init(worker_id, leaving=None):
    # Schedulers send SIGTERM to every process of a job. The main process saves a recovery
    # checkpoint and shuts the loader down itself; a worker dying first would crash it instead.
    # Once the main process is leaving (release_workers), SIGTERM ends the worker.
    # Ctrl-C sends SIGINT to every process of the terminal's foreground group: the main
    # process stops and saves (utils.StopRequest); workers leave that to it.
    leaving = _LEAVING if leaving is None else leaving
    signal.signal(signal.SIGTERM, functools.partial(_worker_sigterm, leaving))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardSampler(Sampler):
    """Every rank takes indices rank, rank+world, ...: no padding, so sums over ranks are exact."""

    def __init__(self, n, rank, world):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_train_loader(args, train_base, plan, rank, world):
    transforms_per_stage = [train_transform(args, s.size, s.magnitude, plan.lowfreq) for s in plan.stages]
    pipeline = getattr(args, 'data_pipeline', 'published')
    fast = pipeline in ('fast', 'gpu')
    store_root = getattr(args, 'image_store', None)
    if store_root and not (fast and isinstance(train_base, tv_datasets.ImageFolder)):
        raise UserError('--image_store is read by the fast data path from an image folder: add --data_pipeline fast '
                        'and use --data_set IMNET or image_folder, or drop --image_store')
    if pipeline == 'gpu' and not isinstance(train_base, tv_datasets.ImageFolder):
        raise UserError('--data_pipeline gpu reads image files: use --data_set IMNET or image_folder, '
                        'or --data_pipeline fast')
    collate = None
    if fast and isinstance(train_base, tv_datasets.ImageFolder):
        # the fast path picks the crop and the JPEG decoding scale before decoding; the gpu
        # path picks every parameter and reads the file's bytes (decoded on the device)
        if pipeline == 'gpu':
            train_base = EncodedImageFolder(train_base)
            collate = EncodedCollate(train_base.cpu_decoded)
        else:
            train_base = LazyImageFolder(train_base)
        if store_root:
            try:
                train_base.store = ImageStore.open(store_root, train_base.root, train_base.relpaths())
            except StoreError as e:
                raise UserError(str(e)) from None
    dataset = StageTransformDataset(train_base, transforms_per_stage, seed=args.seed,
                                    skip_bad=getattr(args, 'skip_bad_images', False))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    per_rank = len(sampler)
    for s in plan.stages:
        if per_rank < s.loader_batch:
            raise UserError(f'stage {s.index}: loader batch {s.loader_batch} exceeds the {per_rank} '
                            f'training images per process: lower --batch_size')
    batch_sampler = StageBatchSampler(sampler, plan)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=args.num_workers, pin_memory=args.pin_mem,
        persistent_workers=args.num_workers > 0, collate_fn=collate,
        worker_init_fn=functools.partial(_worker_init, leaving=_LEAVING),
        # its own generator: creating the loader's iterator must not draw from the global RNG,
        # whose stream (dropout, mixup) a resumed run has to continue exactly
        generator=torch.Generator().manual_seed(args.seed))
    return loader, batch_sampler


def build_eval_loader(args, val_base, size, rank, world):
    dataset = TransformedDataset(val_base, eval_transform(size, args.crop_pct))
    if args.dist_eval and world > 1:
        sampler = ShardSampler(len(dataset), rank, world)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=int(1.5 * args.batch_size),
                                       num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False,
                                       worker_init_fn=functools.partial(_worker_init, leaving=_LEAVING),
                                       generator=torch.Generator().manual_seed(args.seed))


# ---------------------------------------------------------------------------
# the device half of the fast and gpu paths, and what the loader counted
# ---------------------------------------------------------------------------

def build_device_transform(args, device, rank=0, world=1, dataset=None):
    """The device half of the fast or gpu data path, else None.

    fast: uint8 -> normalised, random erasing seeded per (seed, epoch, batch, rank), like
    the CPU transforms per sample, so a batch is erased the same way whenever it is loaded
    again (replay buffer refills after a resume).  gpu: decoding, crop, resize, flip,
    RandAugment, normalisation and erasing of an EncodedBatch, every draw made per sample
    by the workers; `dataset` (the training loader's) counts its CPU decodes and names
    files no decoder can read.
    """
    if args.data_pipeline not in ('fast', 'gpu'):
        return None
    if args.data_pipeline == 'gpu':
        fill = tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)  # timm's RandAugment fill
        return GpuDataTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_mode=args.remode,
                                channels_last=args.channels_last, fill=fill, dataset=dataset).to(device)
    return DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=args.reprob, re_mode=args.remode,
                           re_count=args.recount, channels_last=args.channels_last, seed=args.seed, rank=rank,
                           world=world).to(device)


def device_loader(args, loader, device_transform, device):
    """What an epoch iterates: with --data_pipeline gpu and --gpu_prefetch (auto: on CUDA), a
    DevicePrefetcher finishing the next batch's device half while the current one trains."""
    prefetch = args.gpu_prefetch == 'true' or (args.gpu_prefetch == 'auto' and device.type == 'cuda')
    if args.data_pipeline == 'gpu' and prefetch:
        return DevicePrefetcher(loader, device_transform, device)
    return loader


def data_counters(dataset):
    """The training dataset's shared counters: images skipped (--skip_bad_images), store copies
    not usable, images decoded on the CPU by the gpu path (those it has)."""
    counters = [dataset.bad_count]
    store = getattr(dataset.base, 'store', None)
    if store is not None:
        counters.append(store.misses)
    if hasattr(dataset.base, 'cpu_decoded'):
        counters.append(dataset.base.cpu_decoded)
    return counters


def warn_data_problems(dataset):
    """After each epoch: images skipped (--skip_bad_images) and store copies not usable, so far."""
    if dataset.bad_count.value:
        print(f'WARNING: {dataset.bad_count.value} unreadable training images skipped so far (--skip_bad_images)')
    store = getattr(dataset.base, 'store', None)
    if store is not None and store.misses.value:
        print(f'WARNING: {store.misses.value} reduced copies missing, unreadable or stale in --image_store '
              f'{store.root} so far; the originals were decoded instead: rebuild the store with '
              f'scripts/build_image_store.py')
    cpu_decoded = getattr(dataset.base, 'cpu_decoded', None)
    if cpu_decoded is not None and cpu_decoded.value:
        print(f'WARNING: {cpu_decoded.value} training images decoded on the CPU so far (not JPEG, CMYK, '
              f'grayscale, cut short, or rejected by the device decoder; --data_pipeline gpu)')
