"""The fast low-frequency data path (``--data_pipeline fast``).

The published EfficientTrain++ order decodes the whole JPEG, crops and augments at the
base size (224) and only then resizes to the stage's bandwidth B, so a worker is not
faster at B=96 than at 224 while the GPU step is (224/B)^2 cheaper.  This path does
the same operations in a cheaper order:

1. RandomResizedCrop parameters are drawn from the size in the file header, with timm's
   own sampler (same distribution, same RNG draws as the published order).
2. JPEGs are decoded at 1/2, 1/4 or 1/8 scale (PIL ``Image.draft``, i.e. libjpeg's
   DCT-domain scaling) when the crop box still covers at least B decoded pixels on
   each side (``DRAFT_MARGIN``).  With ``--image_store`` a reduced copy of the image
   (pipelines/store.py) is read instead under the same condition, which also saves the
   Huffman decoding of the full-size file that DCT-domain scaling cannot skip.
3. The box is resampled straight to B with an anti-aliased filter (PIL's convolution
   resize widens its kernel with the reduction factor): bicubic below the base size,
   standing in for the published bicubic crop to 224 followed by the Lanczos resize,
   and the recipe's interpolation at the base size, as published.
4. Flip and RandAugment run at B.  timm builds the RandAugment of an image size from
   that size, so its size-dependent magnitudes follow B: the rand-* policies translate
   by a fraction of the image side (TranslateXRel/YRel), and the absolute translation
   of AutoAugment policies (``translate_const = 0.45 x size``) is scaled by timm.
   Rotation and shear angles, and all colour ops, do not depend on the size.
5. The sample leaves the worker as a uint8 (H, W, 3) tensor (4x less to collate, pin
   and copy than float32); ``DeviceTransform`` converts, normalises and random-erases
   the whole batch on the training device, in the order of the published CPU pipeline.

With ``--lowfreq fourier`` (EfficientTrain) the CPU side stays at the base size (only
steps 1-2 and 5 apply) and the Fourier crop to B still runs on the device after
``DeviceTransform``, so random erasing precedes the crop as in the published order.

How close it is (tests/test_fastpath.py checks all of this).  For the same crop box
and flip, on the 200 ImageNet samples (../shared/data/imagenet-samples), the PSNR of
this path against the published order is 42 dB at B=96 and 44 dB at B=160 (mean; 5th
percentile 35 dB), while the exact Fourier crop of EfficientTrain, the operation
EfficientTrain++'s Lanczos resize approximates, is 28 dB and 35 dB from the published
order.  Per RandAugment op it stays above that yardstick for every op except the
threshold ops (posterize, solarize, solarize-add: 24-27 dB against 26-34 dB), which at
B leave hard contours that the published order's final Lanczos resize softens; running
them 2x supersampled would recover about 3 dB of that for about 8% of the throughput,
which is not done.  The same RandAugment ops and magnitudes are drawn for the same seed,
and the device normalisation and erasing equal timm's CPU ones.  Speed and fidelity of
the filter choice (per-worker images/s relative to the 224 pipeline, PSNR mean at
B=96 / B=160): Lanczos 2.00x / 1.37x, 45 / 45 dB; bicubic 2.14x / 1.50x, 42 / 44 dB;
bilinear 2.28x / 1.64x, 36 / 39 dB (one shared 2-core EPYC, benchmarks/bench_data.py).
"""
import math
import os
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torch.utils.data import Dataset
from torchvision import transforms

from utils import keyed_seed

__all__ = ['DRAFT_MARGIN', 'LazyImageFolder', 'DraftRandomResizedCrop', 'ToUint8HWC', 'fast_train_transform',
           'BatchRandomErasing', 'DeviceTransform']

# Draft only when the decoded crop keeps at least DRAFT_MARGIN x B pixels per side.
# libjpeg's scaled IDCT keeps each 8x8 block's frequencies up to the new Nyquist with no
# roll-off, so a crop decoded to barely B pixels comes out a little sharper than the
# published (bicubic, then Lanczos) result; with the bicubic resize the mean PSNR against
# the published order is 41.8 / 43.0 / 45.0 dB at B=96 for margins 1.0 / 1.25 / no draft,
# while the decode is Huffman-bound (the 1/2-scale decode saves only ~20% of it), so the
# margin buys little speed either way: 1.0, the largest drafting the crop allows.
DRAFT_MARGIN = 1.0
# Pillow: with reducing_gap >= 3 a resize first box-reduces by an integer factor only
# where the remaining reduction is still >= 3, which its documentation calls
# indistinguishable from the direct convolution; it matters for undrafted large crops.
REDUCING_GAP = 3.0


class LazyImageFolder(Dataset):
    """(PIL image opened but not decoded, target) for every file of a torchvision ImageFolder.

    ``Image.open`` reads only the header, so the transform can pick the crop and set the
    JPEG draft scale before the pixels are decoded.  The transform must load or close the
    image (any resize loads it): PIL closes a file it opened itself once a single-frame
    image is loaded.  With a store (pipelines/store.py), each image carries its reduced
    copies as ``img.reduced_copies``, for DraftRandomResizedCrop to decode instead.
    """

    def __init__(self, folder, store=None):
        self.samples = list(folder.samples)
        self.classes = list(folder.classes)
        self.targets = [t for _, t in self.samples]
        self.root = folder.root
        self.store = store
        self._relpaths = None

    def relpaths(self) -> List[str]:
        """Paths relative to the folder (computed once: the store's check needs them first)."""
        if self._relpaths is None:
            self._relpaths = [os.path.relpath(p, self.root) for p, _ in self.samples]
        return self._relpaths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        img = Image.open(path)
        if self.store is not None:
            # the open file's size (no extra system call on the path) identifies the original
            img.reduced_copies = self.store.copies(self.relpaths()[i], os.fstat(img.fp.fileno()).st_size)
        return img, target


def _draft_decode(img: Image.Image, s: int) -> Tuple[Image.Image, float]:
    """(img set to decode at 1/s when it is a JPEG, converted to RGB; its scale)."""
    scale = 1.0
    if s > 1:
        w_before = img.size[0]
        # JpegImageFile.draft picks the largest of 8/4/2/1 with every side still
        # >= the requested one, and returns the image's extent in decoded pixels.
        # Other formats (and loaded images) return None: no scaling.
        res = img.draft('RGB', (max(img.size[0] // s, 1), max(img.size[1] // s, 1)))
        if res is not None:
            scale = w_before / res[1][2]
    if img.mode != 'RGB':
        img = img.convert('RGB')
    return img, scale


def _draft_scale(box_side: float, out: int, margin: float) -> int:
    for s in (8, 4, 2):
        if box_side / s >= margin * out:
            return s
    return 1


class DraftRandomResizedCrop:
    """timm's RandomResizedCrop, with the crop chosen before decoding and reduced-size JPEG decoding.

    interpolation: a timm interpolation name ('bicubic', 'bilinear', 'lanczos', ...,
    'random'); 'random' uses the filter drawn by random_draw.  random_draw: draw bilinear
    or bicubic with ``random.choice`` after the crop, as timm's 'random' interpolation
    does.  ``draft`` turns the reduced-size decoding off (for comparisons).
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), interpolation='bicubic',
                 draft: bool = True, draft_margin: float = DRAFT_MARGIN, reducing_gap: Optional[float] = REDUCING_GAP,
                 random_draw: Optional[bool] = None):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self.random_draw = interpolation == 'random' if random_draw is None else random_draw
        self.draft, self.draft_margin, self.reducing_gap = draft, draft_margin, reducing_gap

    def get_params(self, img: Image.Image) -> Tuple[int, int, int, int]:
        # timm's sampler reads only img.size, which an unloaded PIL image has from its header.
        return RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)

    def _filter(self):
        drawn = None
        if self.random_draw:
            # the draw timm's RandomResizedCropAndInterpolation makes, at the same point
            drawn = random.choice((Image.Resampling.BILINEAR, Image.Resampling.BICUBIC))
        if self.interpolation == 'random':
            return drawn
        return str_to_pil_interp(self.interpolation)

    def decode(self, img: Image.Image, params: Tuple[int, int, int, int]) -> Tuple[Image.Image, float]:
        """(the decoded RGB image to crop from, its scale: full-image pixels per decoded pixel).

        The crop box allows a reduction by s (a power of two, at most 8) while keeping at
        least B decoded pixels per side.  A stored copy of level k dividing s is read
        instead of the original when the image has one; the rest of s (or all of it) is
        left to the JPEG decoder's DCT-domain scaling.  A copy that fails to decode is
        counted as a miss and the original is decoded instead.
        """
        _, _, h, w = params
        s = _draft_scale(min(h, w), self.size, self.draft_margin) if self.draft else 1
        copies = getattr(img, 'reduced_copies', None)
        if copies is not None and s > 1:
            copy, k = copies.open(s, img.size)
            if copy is not None:
                try:
                    # loaded here, so a damaged copy is caught before the original is given up
                    decoded, scale = _draft_decode(copy, s // k)
                    decoded.load()
                except OSError:
                    copies.miss()
                else:
                    img.close()
                    return decoded, k * scale
        return _draft_decode(img, s)

    def crop_resize(self, img: Image.Image, params: Tuple[int, int, int, int]) -> Image.Image:
        """The crop box (top, left, height, width) in full-image pixels, resampled to size x size."""
        i, j, h, w = params
        resample = self._filter()
        img, scale = self.decode(img, params)
        # Decoded pixel k covers full-image pixels [k*scale, (k+1)*scale), so the box maps
        # by plain division; resize takes a fractional box and resamples it exactly.
        box = (j / scale, i / scale, (j + w) / scale, (i + h) / scale)
        return img.resize((self.size, self.size), resample, box=box, reducing_gap=self.reducing_gap)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.crop_resize(img, self.get_params(img))

    def __repr__(self):
        return (f'{self.__class__.__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, '
                f'interpolation={self.interpolation}, draft={self.draft}, margin={self.draft_margin})')


class ToUint8HWC:
    """PIL RGB image -> (H, W, 3) uint8 tensor; DeviceTransform finishes on the device."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # np.array copies into a writable array (torch warns on read-only numpy memory);
        # HWC skips the CPU transpose: on the device (N, H, W, C) permuted to NCHW is
        # already channels_last.
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))

    def __repr__(self):
        return f'{self.__class__.__name__}()'


def fast_train_transform(size: int, base_size: int, lowfreq: str, timm_kwargs: dict, draft: bool = True):
    """The fast CPU pipeline of one stage, producing what the published one would before ToTensor.

    lowfreq: 'lanczos' (crop and augment at B = size), 'fourier' (everything at
    base_size; the device crops to B) or 'none' (the baseline at size).
    timm_kwargs: the create_transform arguments of the published pipeline
    (datasets.train_transform), so RandAugment / colour jitter are timm's own at the
    output size.
    """
    out = base_size if lowfreq == 'fourier' else size
    interp = timm_kwargs.get('interpolation', 'bilinear')
    below_base = lowfreq == 'lanczos' and size < base_size
    # With 'random', the published order draws the filter of its intermediate base-size
    # crop; the draw is kept (random_draw) so both orders consume the same random numbers.
    crop = DraftRandomResizedCrop(out, scale=timm_kwargs.get('scale') or (0.08, 1.0),
                                  interpolation='bicubic' if below_base else interp, draft=draft,
                                  random_draw=interp == 'random')
    kw = dict(timm_kwargs, re_prob=0.)
    _, secondary, _ = create_transform(out, separate=True, **kw)
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(p=0.5), secondary, ToUint8HWC()])


# ---------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------

class BatchRandomErasing:
    """timm's RandomErasing for a whole batch at once, on the batch's device.

    The boxes are drawn with Python's ``random`` exactly as timm's
    ``RandomErasing._erase`` draws them sample after sample (same calls, same order), so
    for the same seed the same boxes are erased; the fill ('const': 0, 'rand': one normal
    colour per box, 'pixel': per-pixel normal noise, all in normalised units) is drawn on
    the device.  timm's own batch mode loops over samples with two small kernels per
    erased box; here each box slot is one masked write for the batch.
    """

    def __init__(self, probability=0.5, mode='const', min_count=1, max_count=None, min_area=0.02,
                 max_area=1 / 3, min_aspect=0.3, max_aspect=None):
        self.probability = probability
        self.mode = (mode or 'const').lower()
        if self.mode not in ('const', 'rand', 'pixel'):
            raise ValueError(f"random erasing mode must be const, rand or pixel, got {mode!r}")
        self.min_count, self.max_count = min_count, max_count or min_count
        self.min_area, self.max_area = min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def sample_boxes(self, n: int, img_h: int, img_w: int, rng=random) -> List[List[Tuple[int, int, int, int]]]:
        """Per sample, the (top, left, height, width) boxes timm would erase, in order.

        rng: the random module (the global stream, as timm) or a random.Random.
        """
        out = []
        area = img_h * img_w
        for _ in range(n):
            boxes = []
            out.append(boxes)
            if rng.random() > self.probability:
                continue
            count = self.min_count if self.min_count == self.max_count else \
                rng.randint(self.min_count, self.max_count)
            for _ in range(count):
                for _attempt in range(10):
                    target_area = rng.uniform(self.min_area, self.max_area) * area / count
                    aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                    h = int(round(math.sqrt(target_area * aspect_ratio)))
                    w = int(round(math.sqrt(target_area / aspect_ratio)))
                    if w < img_w and h < img_h:
                        top = rng.randint(0, img_h - h)
                        left = rng.randint(0, img_w - w)
                        boxes.append((top, left, h, w))
                        break
        return out

    def __call__(self, x: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """Erase in place on a normalised (N, C, H, W) batch; returns x.

        seed: draw boxes and fills from generators seeded with it instead of the global
        streams, so the batch's erasing does not depend on what else drew numbers before.
        """
        n, c, img_h, img_w = x.shape
        rng, gen = random, None
        if seed is not None:
            rng = random.Random(seed)
            gen = torch.Generator(device=x.device)
            gen.manual_seed(seed)
        per_sample = self.sample_boxes(n, img_h, img_w, rng)
        slots = max((len(b) for b in per_sample), default=0)
        if slots == 0:
            return x
        dev = x.device
        ys = torch.arange(img_h, device=dev).view(1, img_h, 1)
        xs = torch.arange(img_w, device=dev).view(1, 1, img_w)
        # Later boxes of a sample overwrite earlier ones, as timm's sequential writes do.
        for k in range(slots):
            rows = [(s, *b[k]) for s, b in enumerate(per_sample) if len(b) > k]
            p = torch.tensor(rows, dtype=torch.int64)
            if dev.type == 'cuda':
                p = p.pin_memory().to(dev, non_blocking=True)
            idx, top, left, h, w = p.unbind(1)
            m = ((ys >= top.view(-1, 1, 1)) & (ys < (top + h).view(-1, 1, 1)) &
                 (xs >= left.view(-1, 1, 1)) & (xs < (left + w).view(-1, 1, 1))).unsqueeze(1)
            if self.mode == 'pixel':
                fill = torch.randn((len(rows), c, img_h, img_w), dtype=x.dtype, device=dev, generator=gen)
            elif self.mode == 'rand':
                fill = torch.randn((len(rows), c, 1, 1), dtype=x.dtype, device=dev, generator=gen)
            else:
                fill = torch.zeros((), dtype=x.dtype, device=dev)
            x[idx] = torch.where(m, fill, x[idx])
        return x

    def __repr__(self):
        return (f'{self.__class__.__name__}(p={self.probability}, mode={self.mode}, '
                f'count=({self.min_count}, {self.max_count}))')


class DeviceTransform(torch.nn.Module):
    """uint8 (N, H, W, 3) batch -> normalised float32 (N, 3, H, W), then random erasing.

    The arithmetic is torchvision's ToTensor + Normalize (x / 255, then - mean, then
    / std, in float32), so on the same device it gives the same values bit for bit.
    channels_last: keep the NHWC memory layout (free here, since the batch arrives as
    NHWC) instead of making the batch contiguous NCHW.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0., re_mode: str = 'const',
                 re_count: int = 1, channels_last: bool = False, seed: Optional[int] = None, rank: int = 0,
                 world: int = 1):
        super().__init__()
        self.seed, self.rank, self.world = seed, rank, world
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last
        self.erasing = BatchRandomErasing(re_prob, mode=re_mode, max_count=re_count) if re_prob > 0 else None

    def batch_seed(self, epoch: int, step: int) -> Optional[int]:
        """The erasing seed of a rank's batch `step` of `epoch` (None without a seed: global streams)."""
        if self.seed is None:
            return None
        # a hash with its own prefix: no (epoch, step, rank) shares a stream with the CPU
        # transforms' per-sample seeds (datasets.sample_seed) or with another batch
        return keyed_seed('device-erasing', self.seed, epoch, step, self.rank, self.world)

    def forward(self, x: torch.Tensor, epoch: Optional[int] = None, step: Optional[int] = None) -> torch.Tensor:
        """epoch, step: the batch's position, which seeds its random erasing (with a seed)."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != self.mean.shape[1]:
            raise TypeError(f'DeviceTransform expects a uint8 (N, H, W, {self.mean.shape[1]}) batch from the fast '
                            f'data pipeline, got {x.dtype} {tuple(x.shape)}')
        if self.mean.device != x.device:
            self.to(x.device)
        x = x.permute(0, 3, 1, 2)
        if not self.channels_last:
            x = x.contiguous()
        # .float() keeps the (dense) channels_last strides: preserve_format.
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            x = self.erasing(x, None if epoch is None else self.batch_seed(epoch, step))
        return x

    def extra_repr(self):
        return f'channels_last={self.channels_last}, erasing={self.erasing}'
