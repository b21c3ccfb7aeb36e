"""The GPU data path (``--data_pipeline gpu``): workers read bytes and draw parameters, the device does the rest.

Worker side (``GpuSampleTransform``, one per stage, run by datasets.StageTransformDataset
under the per-sample seed).  Every random choice is drawn in the order and with the calls
of ``--data_pipeline fast`` (pipelines/fastpath.py) and timm's per-sample RandomErasing:

1. the RandomResizedCrop box with timm's sampler from the size in the file header;
   timm's bilinear/bicubic draw when --train_interpolation random;
2. the flip (``torch.rand(1) < 0.5``, torchvision's RandomHorizontalFlip);
3. RandAugment's ops and magnitudes (pipelines.gpu_randaug.RandAugmentParams: the draws
   of timm's RandAugment at the size it runs at);
4. the random-erasing boxes at the output size (timm's RandomErasing draws, per sample, as
   the published pipeline draws them) and a seed for their noise.

The file's bytes are then read as they are: the image store's reduced copy of level k when
the crop allows the fast path to read it (same rule, ``fastpath._draft_scale`` and
``StoredCopies.open``), else the original.  Nothing is decoded, except files the GPU
decoder cannot take, recognised from the header (not JPEG, or not RGB/YCbCr: CMYK,
grayscale, PNG renamed .JPEG) or by a missing end-of-image marker (decoded by PIL to find
out whether it is readable at all: a truncated file fails as today, ``--skip_bad_images``
skips it as today).  Those few come decoded as raw RGB and are counted
(``EncodedImageFolder.cpu_decoded``, warned after each epoch).

``collate_encoded`` packs a batch as an ``EncodedBatch``: one flat uint8 tensor of all
payloads with offsets, a float64 geometry table, the RandAugment parameters, the erasing
boxes.  It pins and moves like a tensor (``.to(device, non_blocking=True)`` moves the
erasing boxes; the bytes and the other parameters stay in pinned host memory, where the
decoder and the per-chunk planning read them without waiting for the device).

Device side (``GpuDataTransform``, datasets.build_device_transform), per batch, in chunks of
similar crop sizes of at most ``chunk`` images and ``chunk_pixels`` padded box pixels, so
a batch of originals does not spike device memory: decode
(``decode_jpegs``, the one decoder call: torchvision's batched nvJPEG on CUDA, libjpeg-turbo
on the CPU), crop and resize each box with an anti-aliased separable filter as two
batched matrix products (``resample_weights``: PIL's convolution-resize kernels over the
box alone and PIL's order of the two passes, as timm's crop-then-resize has them), flip,
RandAugment (``apply_rand_augment``), normalisation, random erasing, channels_last.  At
Lanczos stages (B below the base size) in the published order (``--gpu_augment_at base``,
the default) the crop is resampled to the base size and augmented there, then
``lanczos_resize`` low-passes it to B (curriculum.lowfreq.LanczosResize's PIL resize)
before normalisation and erasing; ``--gpu_augment_at stage`` crops to B and augments at B
(the fast path's order).  Samples the
device decoder rejects at run time (a failed batched call is bisected) are decoded on
the CPU (counted with the others); a sample no decoder can read raises ``BadImageError``
naming the file, or with ``--skip_bad_images`` is counted, reported and replaced by the
mean colour.  ``DevicePrefetcher`` (``--gpu_prefetch``) runs the next batch's device half
in a helper thread and CUDA stream while the current batch trains.

Every draw is made per sample in the worker, so the device half is a function of the
batch alone (the erasing noise is seeded from the batch's sample seeds): exact resume
and replay-buffer refills hold as for the other pipelines.
"""
import functools
import hashlib
import multiprocessing
import random
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from pipelines.errors import BadImageError
from pipelines.fastpath import DRAFT_MARGIN, BatchRandomErasing, LazyImageFolder, _draft_scale
from pipelines.gpu_randaug import RandAugmentParams, apply_rand_augment, rand_augment_hparams
from utils import resolved_device

__all__ = ['EncodedImageFolder', 'GpuSampleTransform', 'EncodedBatch', 'collate_encoded', 'decode_jpegs',
           'resample_weights', 'resample_planes', 'lanczos_resize', 'vertical_first', 'GpuDataTransform',
           'PreparedBatch', 'DevicePrefetcher', 'FILTERS', 'KIND_JPEG', 'KIND_RGB']

KIND_JPEG, KIND_RGB = 0, 1
# filter ids carried per sample; PIL's names for the three filters the pipeline can draw
FILTERS = {'bilinear': 0, 'bicubic': 1, 'lanczos': 2}
# geometry table columns (float64: every integer here is exact)
G_KIND, G_H, G_W, G_TOP, G_LEFT, G_BH, G_BW, G_FLIP, G_FILTER, G_INDEX = range(10)
G_COLS = 10
# bytes searched for the end-of-image marker: encoders may pad a few bytes after it
_EOI_WINDOW = 64


class EncodedImageFolder(LazyImageFolder):
    """LazyImageFolder that also counts the samples decoded on a CPU instead of the device."""

    def __init__(self, folder, store=None):
        super().__init__(folder, store)
        # summed over the loader's worker processes (which inherit it) and the device side
        self.cpu_decoded = multiprocessing.Value('q', 0)

    def __getitem__(self, i):
        img, target = super().__getitem__(i)
        img.sample_index = i  # names the file if the device cannot decode it either
        return img, target

    def count_cpu_decoded(self, n: int = 1) -> None:
        with self.cpu_decoded.get_lock():
            self.cpu_decoded.value += n


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor to `device` without waiting: a copy from pageable memory would
    synchronise the stream (the previous step's kernels) first; from pinned memory it is queued."""
    device = torch.device('cpu' if device is None else device)
    if device.type != 'cuda':
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _read_all(img: Image.Image) -> bytes:
    fp = img.fp
    fp.seek(0)
    return fp.read()


def _has_eoi(data: bytes) -> bool:
    return b'\xff\xd9' in data[-_EOI_WINDOW:]


def _gpu_decodable(img: Image.Image) -> bool:
    # YCbCr/RGB baseline or progressive JPEG: what nvJPEG decodes to RGB.  'L' (grayscale)
    # and 'CMYK' go to the CPU, as does anything that is not a JPEG whatever its name says.
    return img.format in ('JPEG', 'MPO') and img.mode == 'RGB'  # MPO: a JPEG with more frames after it


class GpuSampleTransform:
    """One stage's worker half: (unloaded PIL image from LazyImageFolder) -> a sample record.

    out_size: the size of the batch the device returns (B, or the base size with --lowfreq
    fourier); erasing boxes are drawn at it.  work_size: the size the crop is resampled to
    and RandAugment runs at (default out_size; the base size at Lanczos stages in the
    published order, where the device low-passes to out_size afterwards).
    filter_name: the resize filter ('bicubic' for a crop straight to B below the base size,
    as in the fast path, else the recipe's); random_draw: draw timm's bilinear/bicubic
    choice (--train_interpolation random), which then picks the filter unless below the base size.
    ra: a RandAugmentParams (drawn at work_size) or None; erasing: a BatchRandomErasing or None.
    """

    def __init__(self, out_size: int, filter_name: str, random_draw: bool = False, ra=None,
                 erasing: Optional[BatchRandomErasing] = None, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.),
                 draft_margin: float = DRAFT_MARGIN, work_size: Optional[int] = None):
        if filter_name not in FILTERS and filter_name != 'random':
            raise ValueError(f'filter must be one of {sorted(FILTERS)} or random, got {filter_name!r}')
        self.size, self.filter_name, self.random_draw = int(out_size), filter_name, random_draw
        self.work_size = int(work_size or out_size)
        self.ra, self.erasing = ra, erasing
        self.scale, self.ratio, self.draft_margin = tuple(scale), tuple(ratio), draft_margin
        self.num_layers = ra.num_layers if ra is not None else 0
        self.ra_width = ra.width if ra is not None else 0
        self.max_boxes = erasing.max_count if erasing is not None else 0

    def draw(self, img: Image.Image):
        """(crop box (top, left, h, w) in full-image pixels, filter id, flip, RA params, erasing boxes, seed)."""
        box = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        drawn = random.choice(('bilinear', 'bicubic')) if self.random_draw else None
        filt = drawn if self.filter_name == 'random' else self.filter_name
        flip = bool(torch.rand(1) < 0.5)  # torchvision RandomHorizontalFlip's draw
        ra = self.ra() if self.ra is not None else None
        boxes, seed = [], 0
        if self.erasing is not None:
            boxes = self.erasing.sample_boxes(1, self.size, self.size, rng=random)[0]
            seed = random.getrandbits(62)
        return box, FILTERS[filt], flip, ra, boxes, seed

    def payload(self, img: Image.Image, box):
        """(kind, uint8 array, (h, w) of its image, its scale k, decoded here): the bytes to decode or RGB."""
        s = _draft_scale(min(box[2], box[3]), self.work_size, self.draft_margin)
        copies = getattr(img, 'reduced_copies', None)
        if copies is not None and s > 1:
            copy, k = copies.open(s, img.size)
            if copy is not None:
                data = _read_all(copy)
                ok = _gpu_decodable(copy) and _has_eoi(data)
                w, h = copy.size
                copy.close()
                if ok:
                    img.close()
                    return KIND_JPEG, np.frombuffer(data, np.uint8), (h, w), k, False
                copies.miss()  # cut short (or not a JPEG): the original instead
        data = _read_all(img)
        w, h = img.size
        if _gpu_decodable(img) and _has_eoi(data):
            img.close()
            return KIND_JPEG, np.frombuffer(data, np.uint8), (h, w), 1, False
        # Rare: decoded here, at full size; a file PIL cannot read raises one of
        # datasets._DECODE_ERRORS, which StageTransformDataset handles as for any pipeline.
        rgb = np.asarray(img.convert('RGB'), dtype=np.uint8)
        img.close()
        return KIND_RGB, rgb.reshape(-1), rgb.shape[:2], 1, True

    def __call__(self, img: Image.Image):
        box, filt, flip, ra, boxes, seed = self.draw(img)
        kind, data, (h, w), k, on_cpu = self.payload(img, box)
        top, left, bh, bw = box
        # the box in the payload's pixels: copy pixel m covers original pixels [m*k, (m+1)*k)
        geom = [kind, h, w, top / k, left / k, bh / k, bw / k, float(flip), filt, getattr(img, 'sample_index', -1)]
        er = np.full((self.max_boxes, 4), -1, dtype=np.int32)
        for n, b in enumerate(boxes):
            er[n] = b
        return {'data': data, 'geom': geom, 'ra': ra, 'erase': er, 'seed': seed, 'cpu': on_cpu, 'size': self.size,
                'work': self.work_size}

    def __repr__(self):
        work = f', augmented at {self.work_size}' if self.work_size != self.size else ''
        return (f'{self.__class__.__name__}(size={self.size}{work}, filter={self.filter_name}, '
                f'randaugment={self.ra is not None}, erasing={self.erasing})')


class EncodedBatch:
    """A batch of encoded images and their augmentation parameters (what the device transform consumes).

    data: flat uint8 payloads (JPEG bytes or raw RGB), offsets: int64 (N+1); geom: float64
    (N, G_COLS); ra: float64 (N, layers, K) from gpu_randaug.RandAugmentParams, or None;
    erase: int32 (N, boxes, 4), -1 for none; seeds: int64 (N,).  ``device`` is where the
    decoded batch goes; the payloads stay in host memory, where decoders read them.
    out_size: the side of the returned batch; work_size: the side the crops are resampled
    to and augmented at (a Lanczos low-pass to out_size follows when they differ).
    """

    __slots__ = ('data', 'offsets', 'geom', 'ra', 'erase', 'seeds', 'out_size', 'device', 'has_erase', 'work_size')

    def __init__(self, data, offsets, geom, ra, erase, seeds, out_size, device=None, has_erase=None, work_size=None):
        self.data, self.offsets, self.geom, self.ra = data, offsets, geom, ra
        self.erase, self.seeds, self.out_size = erase, seeds, int(out_size)
        self.work_size = int(work_size or out_size)
        self.device = torch.device('cpu') if device is None else torch.device(device)
        # decided on the host, where the boxes are made: no device synchronisation later
        self.has_erase = bool((erase[..., 0] >= 0).any()) if has_erase is None else has_erase

    def __len__(self):
        return self.geom.shape[0]

    @property
    def shape(self):
        """(N, 3, size, size): the shape the device transform returns."""
        return (len(self), 3, self.out_size, self.out_size)

    def pin_memory(self, device=None):
        # DataLoader(pin_memory=True) calls this in its pinning thread
        return EncodedBatch(self.data.pin_memory(), self.offsets, self.geom, None if self.ra is None else
                            self.ra.pin_memory(), self.erase.pin_memory(), self.seeds, self.out_size, self.device,
                            self.has_erase, self.work_size)

    def to(self, device, non_blocking=False):
        """The erasing boxes to `device` (used there); the bytes, the geometry, the RandAugment
        parameters and the seeds stay on the host, where the decoder and the per-sample planning
        read them (no device-to-host synchronisation)."""
        device = torch.device(device)
        return EncodedBatch(self.data, self.offsets, self.geom, self.ra, to_device(self.erase, device),
                            self.seeds, self.out_size, device, self.has_erase, self.work_size)

    def payload(self, i: int) -> torch.Tensor:
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]


def collate_encoded(samples, cpu_counter=None):
    """[(sample record, target)] -> (EncodedBatch, int64 targets); counts the worker's CPU decodes."""
    recs = [r for r, _ in samples]
    lengths = [len(r['data']) for r in recs]
    offsets = torch.zeros(len(recs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    data = torch.from_numpy(np.concatenate([r['data'] for r in recs]))
    geom = torch.tensor([r['geom'] for r in recs], dtype=torch.float64)
    ra = torch.stack([r['ra'] for r in recs]) if recs[0]['ra'] is not None else None
    erase = torch.from_numpy(np.stack([r['erase'] for r in recs]))
    seeds = torch.tensor([r['seed'] for r in recs], dtype=torch.int64)
    n_cpu = sum(r['cpu'] for r in recs)
    if n_cpu and cpu_counter is not None:
        with cpu_counter.get_lock():
            cpu_counter.value += n_cpu
    out_size = recs[0]['size']
    targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return EncodedBatch(data, offsets, geom, ra, erase, seeds, out_size, work_size=recs[0].get('work')), targets


class EncodedCollate:
    """collate_encoded with the dataset's CPU-decode counter (a picklable callable for the DataLoader)."""

    def __init__(self, counter=None):
        self.counter = counter

    def __call__(self, samples):
        return collate_encoded(samples, self.counter)


# ---------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------

_DEPRECATION = 'The image decoding and encoding capabilities of TorchVision'


def _filter_decode_deprecation() -> None:
    # torchvision 0.29 warns on every decode that its decoders are deprecated in favour of
    # TorchCodec: nothing a user can act on, and it would come once per batch.  Only that
    # message, from torchvision's modules, is ignored; the filter is added once (again only
    # if something reset the filters, as pytest does per test).
    for f in warnings.filters:
        if f[0] == 'ignore' and f[1] is not None and f[1].pattern == _DEPRECATION:
            return
    warnings.filterwarnings('ignore', message=_DEPRECATION, category=DeprecationWarning, module='torchvision')


_DECODE_STREAMS = {}


def _decode_stream(device: torch.device):
    """The stream the device decoder's outputs are allocated on: one per device, nothing else runs there."""
    device = resolved_device(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return _DECODE_STREAMS[device]


def decode_jpegs(payloads: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """Decode JPEG byte tensors (on the host) to RGB uint8 (3, H, W) on `device`: the one decoder call.

    torchvision.io.decode_jpeg: a list input is one batched nvJPEG call on CUDA (the
    inputs stay on the host; outputs on the device) and libjpeg-turbo per image on the
    CPU.  TorchCodec, which torchvision 0.29 points to, was measured and not chosen
    (README "Performance"); it is used when torchvision no longer has the decoder.  Raises
    RuntimeError when the decoder rejects an input.

    On CUDA the decoder allocates its outputs on the caller's stream but writes them from
    its own stream (and nvJPEG's hardware engine ignores stream order), without waiting
    for the caller's stream: a block freed on the caller's stream while queued kernels
    still read it (the previous chunk's images, resampling buffers) could be handed to
    the decoder and overwritten early -- silent corruption (pytorch/vision#9606,
    meta-pytorch/torchcodec#1634).  So the decoder is called with a stream of its own
    current (_decode_stream): the caching allocator hands a stream only blocks freed on
    that same stream, and there only images this function returned, each marked as used
    on the caller's stream (record_stream), so their blocks come back only once the
    caller's kernels are done with them.  The caller's stream then waits for the decode
    stream (no host wait; the decoder's own wait for its stream stays in it).  Were the
    pooled stream the caller's own, the caller's stream is drained first instead.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        mode = ImageReadMode.RGB
    except ImportError:  # a torchvision without its decoders: TorchCodec's takes the same call
        from torchcodec.decoders import decode_jpeg
        mode = 'RGB'
    _filter_decode_deprecation()
    if device.type != 'cuda':
        return list(decode_jpeg(payloads, mode=mode, device=device))
    caller = torch.cuda.current_stream(device)
    stream = _decode_stream(device)
    if stream == caller:
        caller.synchronize()
        return list(decode_jpeg(payloads, mode=mode, device=device))
    with torch.cuda.stream(stream):
        out = list(decode_jpeg(payloads, mode=mode, device=device))
    caller.wait_stream(stream)
    for img in out:
        img.record_stream(caller)
    return out


def _kernel(filt: int, x: torch.Tensor) -> torch.Tensor:
    """PIL's resampling kernels (Imaging/Resample.c): triangle, bicubic a=-0.5, Lanczos-3."""
    ax = x.abs()
    if filt == FILTERS['bilinear']:
        return (1 - ax).clamp_min(0)
    if filt == FILTERS['bicubic']:
        a = -0.5
        near = ((a + 2) * ax - (a + 3)) * ax * ax + 1
        far = (((ax - 5) * ax + 8) * ax - 4) * a
        return torch.where(ax < 1, near, torch.where(ax < 2, far, torch.zeros_like(ax)))
    return torch.where(ax < 3, torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(ax))


_SUPPORT = {0: 1.0, 1: 2.0, 2: 3.0}


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: torch.Tensor, out: int,
                     extent: int, filt: Sequence[int], device=None) -> torch.Tensor:
    """Per sample, the (out, extent) float32 matrix resampling [start, start + length) of a line to `out` pixels.

    PIL's convolution resize with a box (ImagingResample's precompute_coeffs): output pixel
    o is centred at start + (o + 0.5) * scale in source coordinates (pixel x spans
    [x, x + 1)); when shrinking, the kernel is widened by the scale (anti-aliasing); taps
    outside [0, in_size) are dropped and the rest renormalised.  start, length, in_size:
    float64 (N,) host tensors in the coordinates of the (cropped) source line; extent: its
    padded length; filt: the N filter ids.  Built on `device`.
    """
    scale = length / out
    fscale = scale.clamp_min(1.0)
    support = torch.tensor([_SUPPORT[f] for f in filt], dtype=torch.float64) * fscale
    centre = start[:, None] + (torch.arange(out, dtype=torch.float64)[None] + 0.5) * scale[:, None]
    # PIL: xmin = int(centre - support + 0.5) clipped at 0, xmax = int(centre + support + 0.5) at in_size
    lo = torch.clamp(torch.floor(centre - support[:, None] + 0.5), min=0)
    hi = torch.minimum(torch.floor(centre + support[:, None] + 0.5), in_size[:, None])
    # the big (N, out, extent) tensors in float32 on the device: source positions are
    # below 2^14, so float32 keeps the kernel arguments to ~1e-3 pixel
    small = to_device(torch.cat([centre, lo, hi], 1).float(), device)
    centre, lo, hi = small.split(out, 1)
    fscale = to_device(fscale.float(), device)
    x = torch.arange(extent, dtype=torch.float32, device=device)[None, None]
    arg = (x - centre[..., None] + 0.5) / fscale[:, None, None]
    filt_t = to_device(torch.tensor(list(filt)), device)
    w = None
    for f in sorted(set(filt)):
        k = _kernel(f, arg)
        w = k if w is None else torch.where((filt_t == f).view(-1, 1, 1), k, w)
    w = w * ((x >= lo[..., None]) & (x < hi[..., None]))
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


@functools.lru_cache(maxsize=None)
def _pillow_may_go_vertical_first() -> bool:
    """Whether this Pillow runs the vertical pass of a resize first when the height shrinks much
    more than the width (Pillow 13, python-pillow/Pillow#9549; before, always horizontal first).
    Found by trying it on a small image where the two orders differ."""
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.integers(0, 2, (40, 10, 3)) * 255).astype(np.uint8))
    one = np.asarray(img.resize((8, 5), Image.BILINEAR))
    vertical = np.asarray(img.resize((10, 5), Image.BILINEAR).resize((8, 5), Image.BILINEAR))
    horizontal = np.asarray(img.resize((8, 40), Image.BILINEAR).resize((8, 5), Image.BILINEAR))
    return np.array_equal(one, vertical) and not np.array_equal(one, horizontal)


def vertical_first(in_w: torch.Tensor, in_h: torch.Tensor, out: int) -> torch.Tensor:
    """Per image (host tensors of its sides), whether PIL resizes it to out x out vertical pass first.

    The order matters: each pass rounds to 8 bits, and a vertical pass first differs by up
    to ~17 grey levels at sharp edges (Lanczos).  Pillow 13 goes vertical first when the
    height shrinks by more than twice what the width does (found on 600 random sizes).
    """
    if not _pillow_may_go_vertical_first():
        return torch.zeros(in_h.shape, dtype=torch.bool)
    return (in_h > out) & ((in_h - out) > 2 * (in_w - out))


def resample_planes(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, vfirst: torch.Tensor) -> torch.Tensor:
    """PIL's separable resize as batched matrix products: (n, 3, h, w) -> (n, 3, out, out) float32 integers.

    wy: (n, out, h), wx: (n, out, w) from resample_weights (or broadcastable (1, ...));
    vfirst: host bool (n,), the pass order (vertical_first).  Each pass is rounded to 8 bits
    and clipped, as PIL's intermediate image is (it matters for bicubic/Lanczos overshoot).
    """
    def h_then_v(x, wy, wx):
        x = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)
        return torch.matmul(wy.unsqueeze(1), x)

    def v_then_h(x, wy, wx):
        x = torch.matmul(wy.unsqueeze(1), x).round_().clamp_(0, 255)
        return torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))

    if not vfirst.any():
        out = h_then_v(x, wy, wx)
    elif vfirst.all():
        out = v_then_h(x, wy, wx)
    else:
        n = x.shape[0]
        out = x.new_empty(n, x.shape[1], wy.shape[1], wx.shape[1])
        wy, wx = wy.expand(n, -1, -1), wx.expand(n, -1, -1)
        for flag, fn in ((False, h_then_v), (True, v_then_h)):
            rows = torch.nonzero(vfirst == flag).view(-1)  # host
            idx = to_device(rows, x.device)
            out.index_copy_(0, idx, fn(x.index_select(0, idx), wy.index_select(0, idx), wx.index_select(0, idx)))
    return out.round_().clamp_(0, 255)


def lanczos_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> (n, 3, size, size) as PIL's img.resize((size, size), LANCZOS) of each image
    (curriculum.lowfreq.LanczosResize, EfficientTrain++'s low-pass), to PIL's rounding."""
    n, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    dev = x.device

    def weights(length):
        f64 = torch.tensor([float(length)], dtype=torch.float64)
        return resample_weights(torch.zeros(1, dtype=torch.float64), f64, f64, size, length, [FILTERS['lanczos']],
                                dev)

    vfirst = vertical_first(torch.full((n,), w), torch.full((n,), h), size)
    return resample_planes(x.float(), weights(h), weights(w), vfirst).to(torch.uint8)


class GpuDataTransform(torch.nn.Module):
    """EncodedBatch -> normalised float32 (N, 3, B, B) on the batch's device (see the module docstring).

    chunk, chunk_pixels: the most images, and padded crop pixels, decoded and resampled at once.

    counter: the dataset's ``cpu_decoded`` (samples the device decoder rejected are added);
    bad_count / skip_bad / paths: the dataset's unreadable-image handling for samples no
    decoder can read (without them such a sample raises).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_mode: str = 'const',
                 channels_last: bool = False, chunk: int = 64, chunk_pixels: int = 64 * 448 * 448,
                 fill: Sequence[int] = (124, 116, 104), dataset=None):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.re_mode = (re_mode or 'const').lower()
        self.channels_last, self.chunk, self.fill = channels_last, int(chunk), tuple(int(v) for v in fill)
        # 64 x 448^2 padded pixels: 154 MB for the float32 crop buffer of a chunk
        self.chunk_pixels = int(chunk_pixels)
        self.dataset = dataset

    # -- decoding ------------------------------------------------------------------

    def _bad_count(self) -> int:
        bad = getattr(self.dataset, 'bad_count', None)
        return bad.value if bad is not None else 0

    def _count_cpu(self, n):
        base = getattr(self.dataset, 'base', None)
        if n and base is not None and hasattr(base, 'count_cpu_decoded'):
            base.count_cpu_decoded(n)

    def _unreadable(self, index: int, err: Exception, shape) -> torch.Tensor:
        ds = self.dataset
        path = ds._path(index) if ds is not None and index >= 0 else f'sample {index}'
        if ds is None or not ds.skip_bad:
            raise BadImageError(f'{path} is not a readable image ({type(err).__name__}: {str(err)[:120]}): '
                                f'remove or replace it, or pass --skip_bad_images true')
        with ds.bad_count.get_lock():
            ds.bad_count.value += 1
        print(f'WARNING: skipped unreadable image {path} ({type(err).__name__}); trained on the mean colour '
              f'instead', flush=True)
        h, w = shape
        return torch.tensor(self.fill, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()

    def _cpu_decode(self, payload: torch.Tensor, shape, index: int) -> torch.Tensor:
        import io
        try:
            with Image.open(io.BytesIO(payload.numpy().tobytes())) as im:
                rgb = np.asarray(im.convert('RGB'), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - any decoder failure makes the sample unreadable
            return self._unreadable(index, e, shape)
        if rgb.shape[:2] != tuple(shape):
            return self._unreadable(index, OSError(f'decoded {rgb.shape[:2]}, header said {tuple(shape)}'), shape)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)

    @classmethod
    def _decode_bisect(cls, payloads: List[torch.Tensor], device) -> List[Optional[torch.Tensor]]:
        """decode_jpegs, with None for the inputs it rejects: one bad file fails a batched call,
        so a failed call is split in halves (a single bad file in a chunk of 64 costs 12
        calls, not 64)."""
        try:
            return list(decode_jpegs(payloads, device))
        except RuntimeError:
            if len(payloads) == 1:
                return [None]
            mid = len(payloads) // 2
            return cls._decode_bisect(payloads[:mid], device) + cls._decode_bisect(payloads[mid:], device)

    def decode(self, batch: EncodedBatch, rows: Sequence[int], device) -> List[torch.Tensor]:
        """The (3, H, W) uint8 images of batch samples `rows`, on `device`."""
        geom = batch.geom
        out: List[Optional[torch.Tensor]] = [None] * len(rows)
        jpeg = [n for n, i in enumerate(rows) if geom[i, G_KIND] == KIND_JPEG]
        for n, i in enumerate(rows):
            if geom[i, G_KIND] == KIND_RGB:
                h, w = int(geom[i, G_H]), int(geom[i, G_W])
                out[n] = to_device(batch.payload(i).view(h, w, 3), device).permute(2, 0, 1)
        if jpeg:
            decoded = self._decode_bisect([batch.payload(rows[n]) for n in jpeg], device)
            retry = []
            for n, img in zip(jpeg, decoded):
                i = rows[n]
                shape = (int(geom[i, G_H]), int(geom[i, G_W]))
                if img is not None and tuple(img.shape[1:]) == shape:
                    out[n] = img
                else:
                    retry.append(n)
            bad_before = self._bad_count()
            for n in retry:  # the device decoder rejected it (or disagreed with the header): PIL
                i = rows[n]
                shape = (int(geom[i, G_H]), int(geom[i, G_W]))
                out[n] = to_device(self._cpu_decode(batch.payload(i), shape, int(geom[i, G_INDEX])), device)
            if device.type == 'cuda':  # those PIL could read (the others are counted as unreadable)
                self._count_cpu(len(retry) - (self._bad_count() - bad_before))
        return out

    # -- crop and resize -----------------------------------------------------------

    def crop_resize(self, images: List[torch.Tensor], geom: torch.Tensor, size: int) -> torch.Tensor:
        """Each image's box resampled to size x size (uint8, rounded as PIL), as two batched matmuls.

        geom: the images' rows of the (host) geometry table.
        """
        dev = images[0].device
        filt = [int(f) for f in geom[:, G_FILTER].tolist()]
        top, left, bh, bw = geom[:, G_TOP], geom[:, G_LEFT], geom[:, G_BH], geom[:, G_BW]
        hh, ww = geom[:, G_H], geom[:, G_W]
        # the window is the box itself (the pixels it covers): timm crops, then resizes the crop
        # (torchvision's resized_crop), so no filter tap reaches outside the box; resample_weights
        # drops the taps outside the window and renormalises, as PIL's resize does at an
        # image's edge.  (PIL's resize(box=...) would take them from the surrounding pixels.)
        y0 = torch.clamp(torch.floor(top), min=0)
        y1 = torch.minimum(torch.ceil(top + bh), hh)
        x0 = torch.clamp(torch.floor(left), min=0)
        x1 = torch.minimum(torch.ceil(left + bw), ww)
        wins = torch.stack([y0, y1, x0, x1], 1).long().tolist()
        eh = max(b - a for a, b, _, _ in wins)
        ew = max(d - c for _, _, c, d in wins)
        buf = torch.zeros(len(images), 3, eh, ew, dtype=torch.float32, device=dev)
        for n, (img, (a, b, c, d)) in enumerate(zip(images, wins)):
            buf[n, :, :b - a, :d - c] = img[:, a:b, c:d]
        wy = resample_weights(top - y0, bh, y1 - y0, size, eh, filt, dev)     # (n, size, eh)
        wx = resample_weights(left - x0, bw, x1 - x0, size, ew, filt, dev)    # (n, size, ew)
        # PIL resizes the cropped image: its pass order follows the crop's sides
        return resample_planes(buf, wy, wx, vertical_first(x1 - x0, y1 - y0, size)).to(torch.uint8)

    def chunks(self, geom: torch.Tensor) -> List[List[int]]:
        """Sample rows in chunks of similar crop boxes (the padded buffer wastes little), each at
        most `chunk` images and, past its first image, `chunk_pixels` padded box pixels: a chunk
        of large crops of large originals is cut short instead of spiking device memory."""
        area = (geom[:, G_BH].ceil() + 1) * (geom[:, G_BW].ceil() + 1)  # the pixels the box covers
        out, cur, biggest = [], [], 0.0
        for i in torch.argsort(area).tolist():
            a = float(area[i])
            if cur and (len(cur) >= self.chunk or (len(cur) + 1) * max(biggest, a) > self.chunk_pixels):
                out.append(cur)
                cur, biggest = [], 0.0
            cur.append(i)
            biggest = max(biggest, a)
        if cur:
            out.append(cur)
        return out

    def images(self, batch: EncodedBatch) -> torch.Tensor:
        """Decoded, cropped, resized (to the batch's work size) and flipped uint8 (N, 3, S, S), chunk by chunk."""
        device = batch.device
        n, size = len(batch), batch.work_size
        geom_cpu = batch.geom
        out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
        for rows in self.chunks(geom_cpu):
            imgs = self.decode(batch, rows, device)
            idx = to_device(torch.tensor(rows), device)
            out[idx] = self.crop_resize(imgs, geom_cpu[rows], size)
            del imgs
        flip = to_device(geom_cpu[:, G_FLIP] > 0, device).view(-1, 1, 1, 1)
        return torch.where(flip, out.flip(-1), out)

    # -- the rest ------------------------------------------------------------------

    def erase(self, x: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
        """Fill each sample's drawn boxes (timm's RandomErasing fills, in normalised units)."""
        if not batch.has_erase:
            return x
        boxes = batch.erase.to(x.device).long()
        n, c, h, w = x.shape
        # one generator per batch, seeded from its samples' own seeds: the noise is a
        # function of the batch's content, so a reloaded batch is erased identically
        key = hashlib.sha256(batch.seeds.numpy().tobytes()).digest()[:8]
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int.from_bytes(key, 'little') % (2 ** 63 - 1))
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        for k in range(boxes.shape[1]):  # later boxes overwrite earlier ones, as timm's writes do
            top, left, bh, bw = boxes[:, k].unbind(1)
            m = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1)) &
                 (xs >= left.view(-1, 1, 1)) & (xs < (left + bw).view(-1, 1, 1)) &
                 (top >= 0).view(-1, 1, 1)).unsqueeze(1)
            if self.re_mode == 'pixel':
                fill = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
            elif self.re_mode == 'rand':
                fill = torch.randn((n, c, 1, 1), dtype=x.dtype, device=x.device, generator=gen)
            else:
                fill = torch.zeros((), dtype=x.dtype, device=x.device)
            x = torch.where(m, fill, x)
        return x

    def forward(self, batch, epoch: Optional[int] = None, step: Optional[int] = None) -> torch.Tensor:
        """epoch, step: unused (every draw came per sample from the worker); kept for the loop's contract."""
        if isinstance(batch, PreparedBatch):  # already done by DevicePrefetcher
            return batch.tensor
        if not isinstance(batch, EncodedBatch):
            raise TypeError(f'GpuDataTransform expects an EncodedBatch from --data_pipeline gpu, got '
                            f'{type(batch).__name__}')
        if self.mean.device != resolved_device(batch.device):  # 'cuda' is the current CUDA device
            self.to(batch.device)
        x = self.images(batch)
        if batch.ra is not None:
            x = apply_rand_augment(x, batch.ra, self.fill)  # params on the host: planned there
        # the published EfficientTrain++ order: augmented at the base size, then low-passed to B
        x = lanczos_resize(x, batch.out_size)
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        x = self.erase(x, batch)
        # last: erasing's masked writes give a contiguous NCHW result
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def extra_repr(self):
        return f'channels_last={self.channels_last}, chunk={self.chunk}, erasing={self.re_mode}'


class PreparedBatch:
    """A batch the device transform has already finished (DevicePrefetcher); `.to()` and the transform pass it on."""

    __slots__ = ('tensor',)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __len__(self):
        return self.tensor.shape[0]

    @property
    def shape(self):
        return self.tensor.shape

    def to(self, device, non_blocking=False):
        return self


class DevicePrefetcher:
    """Iterates a loader of EncodedBatches with the next batch's device half already under way.

    The training thread takes batches from `loader` as usual (so a loader without workers
    still fetches, and seeds the global random streams per sample, in this thread only:
    those streams are also the training step's); one helper thread runs `transform` on
    them (on CUDA in a stream of its own), at most `ahead` batches beyond the one being
    trained: decoding (nvJPEG's host-side part included), resampling and RandAugment
    overlap the training step instead of preceding it.  The transform draws nothing from
    the global streams.  The consumer's stream waits on an event recorded after each
    batch (no host wait), and the tensors are marked as used on it.  Yields
    (PreparedBatch, targets) that the loop handles as usual (`.to(device)`, then
    `device_transform(...)`, which returns the tensor): the same values as without
    prefetching (tests/test_gpudata.py).  Leaving the loop early (a break, an exception,
    SIGTERM) waits for the helper before returning; its exceptions (an unreadable image)
    are raised in the loop.  The same code runs on the CPU (no streams), where it only
    tests the plumbing.
    """

    def __init__(self, loader, transform, device, ahead: int = 1):
        self.loader, self.transform, self.device, self.ahead = loader, transform, torch.device(device), ahead

    def __len__(self):
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    def __iter__(self):
        # the loader's iterator now, not at the first next(): its workers start loading while
        # the caller does other work first (engine.train_one_epoch's warm-up of new shapes)
        return self._batches(iter(self.loader))

    def _batches(self, batches):
        import collections
        import contextlib
        from concurrent.futures import ThreadPoolExecutor
        cuda = self.device.type == 'cuda'
        device, stream = self.device, None
        if cuda:
            # the CUDA current device is per thread (a new one starts at 0): name this
            # rank's device explicitly for everything the helper thread allocates
            device = torch.device('cuda', torch.cuda.current_device() if device.index is None else device.index)
            stream = torch.cuda.Stream(device)

        def prepare(x, y):
            if cuda:
                torch.cuda.set_device(device)
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                xd = self.transform(x.to(device, non_blocking=True))
                yd = y.to(device, non_blocking=True)
                done = None
                if cuda:
                    done = torch.cuda.Event()
                    done.record(stream)
            return xd, yd, done

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gpu-data-prefetch')
        pending = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) <= self.ahead:
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(pool.submit(prepare, x, y))
                if not pending:
                    return
                xd, yd, done = pending.popleft().result()
                if cuda:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(done)
                    xd.record_stream(current)
                    yd.record_stream(current)
                yield PreparedBatch(xd), yd
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)


def gpu_train_transform(size: int, base_size: int, lowfreq: str, timm_kwargs: dict, aa: Optional[str],
                        re_prob: float, re_count: int, augment_at: str = 'base'):
    """One stage's worker transform, with the draws of fastpath.fast_train_transform plus per-sample erasing.

    Below the base size with --lowfreq lanczos (EfficientTrain++), augment_at 'base' is the
    published order (datasets.train_transform's CPU pipeline): crop and resize to the base
    size with the recipe's filter, flip, RandAugment at the base size, then the device
    low-passes to B with Lanczos (GpuDataTransform).  'stage' crops straight to B (bicubic,
    as the fast path does) and augments at B: less work, not the published pixels.
    """
    if augment_at not in ('base', 'stage'):
        raise ValueError(f"augment_at must be 'base' or 'stage', got {augment_at!r}")
    out = base_size if lowfreq == 'fourier' else size
    interp = timm_kwargs.get('interpolation', 'bilinear')
    below_base = lowfreq == 'lanczos' and size < base_size
    work = base_size if below_base and augment_at == 'base' else out
    ra = None
    if aa:
        ra = RandAugmentParams(aa, work, rand_augment_hparams(work, timm_kwargs['mean'], interp))
    erasing = BatchRandomErasing(re_prob, mode='const', max_count=re_count) if re_prob > 0 else None
    filt = 'bicubic' if below_base and work == out else interp
    return GpuSampleTransform(out, filt, random_draw=interp == 'random', ra=ra, erasing=erasing, work_size=work,
                              scale=timm_kwargs.get('scale') or (0.08, 1.0))
