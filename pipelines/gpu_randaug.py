"""timm's RandAugment split in two: parameters drawn in the loader worker, ops applied batched on the device.

Used by ``--data_pipeline gpu`` (issue 13): the worker draws every random choice of
RandAugment with the per-sample seeded python ``random`` / ``np.random`` state, exactly
as timm's ``RandAugment.__call__`` + ``AugmentOp.__call__`` would on a PIL image, and
the training process applies the drawn ops to a whole batch of uint8 images on the
GPU (or the CPU: same code, which is how the tests check it).

API::

    ra = RandAugmentParams('rand-m9-mstd0.5-inc1', img_size=B,
                           hparams=rand_augment_hparams(B, mean, 'bicubic'))
    p = ra()                  # in the worker, after datasets.seed_sample: float64 [num_layers, WIDTH]
    ...                       # collate: params [N, num_layers, WIDTH] (keep it a CPU tensor)
    out = apply_rand_augment(images_uint8_NCHW, params, fill=ra.fill)   # images on any device

``python -m pipelines.gpu_randaug --device cuda --batch 256 --size 96`` times
``apply_rand_augment`` on a device and compares its result with the CPU's.

Columns of a layer's row (``COL_*``): the op's kernel id (index into ``KERNELS``), whether
it is applied (timm's per-op probability), its resolved level argument (rotation
degrees, shear factor, translation fraction (``*Rel``) or pixels, posterize bits,
solarize threshold, solarize-add value, enhance factor; 0 for ops without one), the PIL
resampling filter of a geometric op (-1 otherwise; a draw when the interpolation is
'random') and the magnitude after noise and clipping (for inspection).  The table is
float64 so angles and factors reach the device exactly as timm computes them.

``params`` must be a CPU tensor (as it comes from the loader): the grouping of samples by
op is planned on the host with numpy, so the device never has to report back (no sync,
no ``.item()``); the plan's indices and arguments go to the device in one pinned,
non-blocking copy.  Per layer there are at most four groups, each gathered
(``index_select``), transformed together and written back (``index_copy_``): the
pointwise ops (autocontrast, equalize, invert, posterize, solarize, solarize-add,
brightness, contrast) as one table lookup per sample and channel, Color, Sharpness, and
the geometric ops, one sampler per resampling filter.  So the number of kernel launches
does not grow with the batch, and the work is about one pass over the images per layer
for the colour ops and 16 gathers (bicubic) for the geometric ones.

Fidelity to PIL (what timm's ops call), checked per op by tests/test_gpu_randaug.py:

* Images are uint8 between ops, and every colour op computes what Pillow's C code does,
  bit for bit: ``Image.blend`` is ``in1 + alpha * (in2 - in1)`` in float32, truncated
  (clipped when extrapolating); ``convert('L')`` is the fixed-point ``(19595 R + 38470 G
  + 7471 B + 0x8000) >> 16``; ``ImageFilter.SMOOTH`` rounds the 3x3 sum / 13 and keeps
  the border pixels; autocontrast / equalize build their per-channel tables from the
  histogram as ImageOps does (equalize's step is ``(count - last bin) // 255``, and
  values above 255 clip as ``Image.point`` clips them); the contrast mean is ImageStat's.
* Geometric ops: ``Image.transform(AFFINE)`` maps the output pixel centre (x + .5, y + .5)
  through the matrix timm passes (rotate: the one ``Image.rotate`` builds about the
  centre), leaves ``fillcolor`` where that point is outside [0, W) x [0, H), and otherwise
  filters with pixel centres at integer + .5 and edge pixels replicated.  Pillow's BICUBIC
  there is cubic convolution with a = -1 (not the a = -0.5 of ``Image.resize``, nor the
  a = -0.75 of ``grid_sample``, which is why this module gathers its own taps), and the
  result is truncated, not rounded.  Coordinates are float64 as in Pillow; the weighted
  sums are float32 (see ``_TRUNC_EPS``), which leaves a difference of 1 level at a small
  fraction of pixels.  NEAREST reproduces Pillow's own affine paths (16.16 fixed point
  for rotate / shear, a float floor for translations), bit for bit.
* The posterize fix of datasets._posterize holds: 0 bits gives a black image.

Not supported (RandAugmentParams raises ValueError): timm's 3-Augment ops
(GaussianBlur, GaussianBlurRand, Desaturate), and resampling filters other than
nearest / bilinear / bicubic / 'random' (PIL's transform rejects them too).
"""
import random
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data import auto_augment as timm_aa
from timm.data.transforms import str_to_pil_interp

__all__ = ['KERNELS', 'WIDTH', 'COL_OP', 'COL_APPLIED', 'COL_ARG', 'COL_RESAMPLE', 'COL_MAGNITUDE',
           'RandAugmentParams', 'apply_rand_augment', 'rand_augment_hparams']

# Kernel ids: one per distinct image operation; timm's variants (Increasing, Original)
# differ only in their level function, which runs at draw time.
KERNELS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
           'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel',
           'TranslateYRel')
_KID = {k: i for i, k in enumerate(KERNELS)}
_NAME_TO_KERNEL = dict({k: k for k in KERNELS}, PosterizeIncreasing='Posterize', PosterizeOriginal='Posterize',
                       SolarizeIncreasing='Solarize', ColorIncreasing='Color', ContrastIncreasing='Contrast',
                       BrightnessIncreasing='Brightness', SharpnessIncreasing='Sharpness')
# pointwise: one table per sample and channel; the rest of the colour ops are Color and Sharpness
_LUT_KERNELS = frozenset(_KID[k] for k in ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize',
                                           'SolarizeAdd', 'Brightness', 'Contrast'))
_HIST_KERNELS = frozenset(_KID[k] for k in ('AutoContrast', 'Equalize'))
_GEOMETRIC = frozenset(_KID[k] for k in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel',
                                          'TranslateYRel'))
# PIL.Image.Resampling values; the only filters Image.transform accepts
NEAREST, BILINEAR, BICUBIC = 0, 2, 3

COL_OP, COL_APPLIED, COL_ARG, COL_RESAMPLE, COL_MAGNITUDE = range(5)
WIDTH = 5


def rand_augment_hparams(img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         interpolation: Optional[str] = 'bicubic') -> Dict:
    """The hparams timm's create_transform gives rand_augment_transform (timm/data/transforms_factory.py)."""
    hp = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean))
    if interpolation and interpolation != 'random':
        hp['interpolation'] = str_to_pil_interp(interpolation)
    return hp


class RandAugmentParams:
    """Draws what timm's RandAugment of ``policy`` would do to one image, without an image.

    Built with timm's own ``rand_augment_transform`` (same ops, probabilities, magnitude
    noise and level functions); ``__call__`` makes the same calls on python ``random`` and
    ``np.random``, in the same order, as ``RandAugment.__call__`` would, so both streams
    end in the same state, and returns float64 [num_layers, WIDTH] (module docstring).
    """

    def __init__(self, policy: str, img_size: int, hparams: Optional[Dict] = None):
        if not policy.startswith('rand'):
            raise ValueError(f'RandAugmentParams needs a RandAugment policy (rand-...), not {policy!r}')
        hparams = dict(hparams) if hparams is not None else rand_augment_hparams(img_size)
        # rand_augment_transform setdefault()s into the dict it gets: give it a copy
        self.transform = timm_aa.rand_augment_transform(policy, dict(hparams))
        self.policy, self.img_size, self.hparams = policy, int(img_size), hparams
        self.num_layers = int(self.transform.num_layers)
        self.width = WIDTH
        self.fill = tuple(int(v) for v in hparams.get('img_mean', timm_aa._FILL))
        self._ops = list(self.transform.ops)
        # RandAugment.__call__ draws np.random.choice(ops, ...); numpy's draw depends only on
        # the population's length and the weights, so choosing among the ops' positions
        # consumes the same numbers (and survives pickling to loader workers)
        self._positions = np.arange(len(self._ops))
        self._kernel = []
        for op in self._ops:
            if op.name not in _NAME_TO_KERNEL:
                raise ValueError(f'RandAugment op {op.name} has no batched implementation '
                                 f'(supported: {sorted(_NAME_TO_KERNEL)})')
            kid = _KID[_NAME_TO_KERNEL[op.name]]
            self._kernel.append(kid)
            if kid in _GEOMETRIC:
                rs = op.kwargs['resample']
                for r in (rs if isinstance(rs, (list, tuple)) else (rs,)):
                    if int(r) not in (NEAREST, BILINEAR, BICUBIC):
                        raise ValueError(f'RandAugment interpolation {r!r}: PIL transforms support only '
                                         f'nearest, bilinear and bicubic')

    def __call__(self) -> torch.Tensor:
        t = self.transform
        chosen = np.random.choice(self._positions, t.num_layers, replace=t.choice_weights is None,
                                  p=t.choice_weights)
        out = np.zeros((self.num_layers, WIDTH), dtype=np.float64)
        out[:, COL_RESAMPLE] = -1
        for layer, pos in enumerate(chosen):
            op, kid = self._ops[pos], self._kernel[pos]
            out[layer, COL_OP] = kid
            # --- AugmentOp.__call__, without the image ---
            if op.prob < 1.0 and random.random() > op.prob:
                continue
            magnitude = op.magnitude
            if op.magnitude_std > 0:
                if op.magnitude_std == float('inf'):
                    magnitude = random.uniform(0, magnitude)
                elif op.magnitude_std > 0:
                    magnitude = random.gauss(magnitude, op.magnitude_std)
            upper_bound = op.magnitude_max or timm_aa._LEVEL_DENOM
            magnitude = max(0., min(magnitude, upper_bound))
            # timm's own level function (its random negation included)
            level_args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else tuple()
            out[layer, COL_APPLIED] = 1
            out[layer, COL_MAGNITUDE] = magnitude
            if level_args:
                out[layer, COL_ARG] = level_args[0]
            if kid in _GEOMETRIC:
                # the geometric op functions begin with _check_args_tf, whose only draw is
                # timm's _interpolation: random.choice when the filter is 'random'
                rs = op.kwargs['resample']
                out[layer, COL_RESAMPLE] = int(random.choice(rs) if isinstance(rs, (list, tuple)) else rs)
        return torch.from_numpy(out)

    def __repr__(self):
        return f'{self.__class__.__name__}({self.policy!r}, img_size={self.img_size}, fill={self.fill})'


# ---------------------------------------------------------------------------
# host-side plan
# ---------------------------------------------------------------------------

def _affine_matrices(kid: np.ndarray, arg: np.ndarray, w: int, h: int) -> np.ndarray:
    """[n, 6] the inverse (output -> input) matrices timm hands to PIL's Image.transform."""
    n = len(kid)
    m = np.zeros((n, 6), dtype=np.float64)
    m[:, 0] = 1.
    m[:, 4] = 1.
    sel = kid == _KID['ShearX']
    m[sel, 1] = arg[sel]
    sel = kid == _KID['ShearY']
    m[sel, 3] = arg[sel]
    sel = kid == _KID['TranslateX']
    m[sel, 2] = arg[sel]
    sel = kid == _KID['TranslateY']
    m[sel, 5] = arg[sel]
    sel = kid == _KID['TranslateXRel']
    m[sel, 2] = arg[sel] * w  # translate_x_rel: pct * img.size[0]
    sel = kid == _KID['TranslateYRel']
    m[sel, 5] = arg[sel] * h
    sel = kid == _KID['Rotate']
    if sel.any():
        # Image.rotate(angle) about (w / 2, h / 2), no expand, as Pillow builds it
        angle = -np.radians(np.remainder(arg[sel], 360.0))
        c, s = np.round(np.cos(angle), 15), np.round(np.sin(angle), 15)
        cx, cy = w / 2.0, h / 2.0
        m[sel, 0], m[sel, 1], m[sel, 3], m[sel, 4] = c, s, -s, c
        m[sel, 2] = c * -cx + s * -cy + 0.0 + cx
        m[sel, 5] = -s * -cx + c * -cy + 0.0 + cy
    return m


def _lut_key(a: np.ndarray):
    """(kernels present, samples needing histograms, Contrast samples after them)."""
    k = a[:, 0].astype(np.int64)
    return (frozenset(int(v) for v in np.unique(k)), int(np.isin(k, list(_HIST_KERNELS)).sum()),
            int((k == _KID['Contrast']).sum()))


def _plan(p: np.ndarray, h: int, w: int, max_group: int):
    """Groups (layer, kind, key, n, offset, width) of at most max_group samples, and the
    chunks of one float64 buffer: per group, n sample indices then n x width arguments."""
    groups, chunks = [], []
    offset = 0

    def add(layer, kind, key, idx, args):
        nonlocal offset
        for s in range(0, len(idx), max_group):
            i, a = idx[s:s + max_group], args[s:s + max_group]
            k = key(a) if callable(key) else key
            chunks.extend([i.astype(np.float64), a.reshape(-1)])
            groups.append((layer, kind, k, len(i), offset, a.shape[1]))
            offset += len(i) * (1 + a.shape[1])

    for layer in range(p.shape[1]):
        kid = p[:, layer, COL_OP].astype(np.int64)
        arg = p[:, layer, COL_ARG]
        on = p[:, layer, COL_APPLIED] > 0
        lut = on & np.isin(kid, list(_LUT_KERNELS))
        geo = on & np.isin(kid, list(_GEOMETRIC))
        if lut.any():
            idx = np.flatnonzero(lut)
            # histogram ops first, then Contrast, so each statistic is computed over a
            # leading slice of the group only (the key carries the slice lengths)
            rank = np.where(np.isin(kid[idx], list(_HIST_KERNELS)), 0, np.where(kid[idx] == _KID['Contrast'], 1, 2))
            idx = idx[np.argsort(rank, kind='stable')]
            add(layer, 'lut', _lut_key, idx, np.stack([kid[idx], arg[idx]], 1).astype(np.float64))
        for k in np.unique(kid[on & ~geo & ~lut]):
            idx = np.flatnonzero(on & (kid == k))
            add(layer, 'op', int(k), idx, arg[idx].reshape(-1, 1))
        if geo.any():
            rs = p[:, layer, COL_RESAMPLE].astype(np.int64)
            for r in np.unique(rs[geo]):
                idx = np.flatnonzero(geo & (rs == r))
                add(layer, 'affine', int(r), idx, _affine_matrices(kid[idx], arg[idx], w, h))
    return groups, chunks, offset


# ---------------------------------------------------------------------------
# device-side kernels
# ---------------------------------------------------------------------------

def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Image.blend: float32 in1 + alpha * (in2 - in1), truncated to uint8, clipped when extrapolating
    alpha = factor.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
    return (degenerate + alpha * (x - degenerate)).clamp_(0, 255).trunc_()


def _gray(x: torch.Tensor) -> torch.Tensor:
    # convert('L'): L24 fixed point; every partial sum is an integer < 2^24, exact in float32
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _lut_ops(x: torch.Tensor, args: torch.Tensor, key) -> torch.Tensor:
    """The pointwise ops, each a 256-entry table per sample and channel, applied in one gather.

    x: uint8 [n, 3, H, W]; args: float64 [n, 2] (kernel id, level argument); key: from
    _lut_key, known on the host: the kernels present (absent ones cost nothing), and how
    many leading samples need histograms (autocontrast / equalize) and, after them, the
    grey mean (contrast).  Every table is computed with the arithmetic Pillow / timm use
    per value, so a lookup equals the per-pixel operation.  The tables are float32 (their
    values are integers, or Image.blend's float32 sums) and int64 (histograms, means),
    except AutoContrast's, whose boundaries Pillow decides in double precision: float64
    on the rows of the histogram ops only, n_hist x 3 x 256 values (12094 of the 8.4
    million (lo, hi, value) cases come out 1 lower in double than in exact arithmetic,
    21325 differ in float32).
    """
    present, n_hist, n_contrast = key
    n, c, h, w = x.shape
    dev = x.device
    kid = args[:, 0].long().view(n, 1, 1)
    arg = args[:, 1].float().view(n, 1, 1)  # integers or enhance factors: what Pillow uses as float32
    i = torch.arange(256, dtype=torch.float32, device=dev).view(1, 1, 256)
    lut = i.expand(n, c, 256).clone()

    def put(name, table, rows=slice(None)):
        lut[rows] = torch.where(kid[rows] == _KID[name], table, lut[rows])

    if _KID['Invert'] in present:
        put('Invert', 255 - i)
    if _KID['Posterize'] in present:
        # ImageOps.posterize keeps the top `bits` bits; datasets._posterize: 0 bits -> black
        q = torch.pow(2.0, (8 - arg).clamp(0, 8))
        put('Posterize', torch.floor(i / q) * q)
    if _KID['Solarize'] in present:
        put('Solarize', torch.where(i < arg, i, 255 - i))
    if _KID['SolarizeAdd'] in present:
        # timm's solarize_add table, threshold 128
        put('SolarizeAdd', torch.where(i < 128, (i + arg).clamp(max=255), i))
    if _KID['Brightness'] in present:
        put('Brightness', _blend(torch.zeros_like(i), i, arg))
    if n_contrast:
        # ImageEnhance.Contrast blends with the ImageStat mean of the L image, int(mean + 0.5):
        # with S the sum of the N grey values, floor((2 S + N) / 2N) in integers, exactly
        rows = slice(n_hist, n_hist + n_contrast)
        total = _gray(x[rows].float()).to(torch.int64).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        mean = torch.div(2 * total + h * w, 2 * h * w, rounding_mode='floor')
        put('Contrast', _blend(mean.float(), i, arg[rows]), rows)
    if n_hist:
        rows = slice(0, n_hist)
        m = n_hist * c
        flat = (x[rows].reshape(m, h * w).long() + torch.arange(m, device=dev).view(-1, 1) * 256).view(-1)
        # scatter_add rather than bincount: CUDA bincount reads the max back to the host
        hist = torch.zeros(m * 256, dtype=torch.long, device=dev)
        hist = hist.scatter_add_(0, flat, torch.ones((), dtype=torch.long, device=dev).expand_as(flat))
        hist = hist.view(n_hist, c, 256)
        nz = hist > 0
        bins = torch.arange(256, device=dev)
        lo = torch.where(nz, bins, 256).amin(2, keepdim=True)  # lowest / highest occupied bins
        hi = (nz * bins).amax(2, keepdim=True)
        if _KID['AutoContrast'] in present:
            # ImageOps.autocontrast: int(ix * scale + offset) in python floats, clipped; identity
            # when one value fills the channel.  (A python number / tensor is computed as
            # reciprocal * number in torch, one rounding too many: hence full_like / ...)
            lo_f, hi_f = lo.double(), hi.double()
            ok = hi_f > lo_f
            scale = torch.full_like(hi_f, 255.0) / torch.where(ok, hi_f - lo_f, torch.ones_like(hi_f))
            offset = -lo_f * scale
            i64 = i.double()
            put('AutoContrast', torch.where(ok, (i64 * scale + offset).trunc_().clamp_(0, 255), i64).float(), rows)
        if _KID['Equalize'] in present:
            # ImageOps.equalize: step = (count - count of the last occupied bin) // 255,
            # table[b] = (step // 2 + count below b) // step; identity when step is 0 or one
            # bin is occupied; values above 255 clip as Image.point clips them
            step = (h * w - hist.gather(2, hi)) // 255
            ok = (nz.sum(2, keepdim=True) > 1) & (step > 0)
            safe = torch.where(ok, step, torch.ones_like(step))
            table = (safe // 2 + hist.cumsum(2) - hist) // safe
            put('Equalize', torch.where(ok, table.clamp_(max=255), bins).float(), rows)
    table = lut.to(torch.uint8).reshape(n * c, 256)
    return table.gather(1, x.reshape(n * c, h * w).long()).view(n, c, h, w)


def _color(x, f):
    return _blend(_gray(x), x, f)


def _sharpness(x, f):
    # ImageFilter.SMOOTH: [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded, border pixels kept.
    # Shifted sums rather than conv2d: integer-exact (conv2d may run in TF32 on a GPU).
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + rows[:, :, :, 2:]
    inner = torch.floor((box + 4 * x[:, :, 1:-1, 1:-1]) / 13 + 0.5)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = inner
    return _blend(smooth, x, f)


_OPS = {_KID['Color']: _color, _KID['Sharpness']: _sharpness}


# The sampler's weighted sums run in float32 and are nudged by _TRUNC_EPS before PIL's
# truncation: a sum of weights that is 1 in exact arithmetic (flat regions, integer
# shifts) must not come out as 99.99999 and truncate to 99.  Pillow evaluates the same
# kernel in double precision in Horner form, and where the exact value is an integer
# either side may land on it or 1 below: per image, 0-2% of pixels differ by 1 level on
# the ImageNet samples (up to 10% for a ramp shifted by a round fraction), none by more.
# Horner form in float64 is bit-exact (tried) but moves 2-3x the bytes on the device.
_TRUNC_EPS = 1e-4


def _cubic_weights(d: torch.Tensor):
    """Pillow's BICUBIC (Geometry.c) is cubic convolution with a = -1: k(s) = |s|^3 - 2 s^2 + 1
    for |s| <= 1, -|s|^3 + 5 s^2 - 8 |s| + 4 for 1 < |s| < 2; taps at -1, 0, 1, 2 from floor."""
    e = 1 - d
    far0, far3 = d + 1, 2 - d
    return (((5 - far0) * far0 - 8) * far0 + 4, (d - 2) * d * d + 1, (e - 2) * e * e + 1,
            ((5 - far3) * far3 - 8) * far3 + 4)


def _affine(x: torch.Tensor, m: torch.Tensor, resample: int, fill: torch.Tensor) -> torch.Tensor:
    """PIL Image.transform(size, AFFINE, m, resample, fillcolor=fill) for each sample.

    x: uint8 [n, 3, H, W]; m: float64 [n, 6]; returns float32 [n, 3, H, W] (integers).
    Taps are gathered from the uint8 image (the index is shared by the channels).
    """
    n, c, h, w = x.shape
    dev = x.device
    xs = torch.arange(w, dtype=torch.float64, device=dev).view(1, 1, w) + 0.5
    ys = torch.arange(h, dtype=torch.float64, device=dev).view(1, h, 1) + 0.5
    a = [m[:, i].view(n, 1, 1) for i in range(6)]
    # output pixel centre through the matrix, in double and in the association of
    # Geometry.c's affine_transform (a0 * x + a1 * y + a2)
    xin = a[0] * xs + a[1] * ys + a[2]
    yin = a[3] * xs + a[4] * ys + a[5]
    flat = x.reshape(n, c, h * w)

    def tap(iy, ix):
        idx = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(n, 1, h * w)
        return flat.gather(2, idx.expand(n, c, h * w))

    if resample == NEAREST:
        # Pillow's affine NEAREST is not its generic engine: a pure scale/translation
        # floors the float coordinate; anything else (rotate, shear) steps through 16.16
        # fixed point from FIX(a2 + a0 / 2 + a1 / 2), FIX(v) = floor(v * 65536 + .5)
        # (Geometry.c affine_fixed), which this reproduces in int64.
        def fix(v):
            return torch.floor(v * 65536.0 + 0.5).long()
        xi = torch.arange(w, device=dev).view(1, 1, w)
        yi = torch.arange(h, device=dev).view(1, h, 1)
        fxx = (fix(a[2] + a[0] * 0.5 + a[1] * 0.5) + yi * fix(a[1]) + xi * fix(a[0])) >> 16
        fyy = (fix(a[5] + a[3] * 0.5 + a[4] * 0.5) + yi * fix(a[4]) + xi * fix(a[3])) >> 16
        scale_only = (a[1] == 0) & (a[3] == 0)
        ix = torch.where(scale_only, xin.floor().long(), fxx)
        iy = torch.where(scale_only, yin.floor().long(), fyy)
        outside = (ix < 0) | (ix >= w) | (iy < 0) | (iy >= h)
        v = tap(iy, ix).float()
    else:
        # the generic engine: fill where the point is outside [0, W) x [0, H), else the
        # filter with pixel centres at integer + .5 and edge pixels replicated
        outside = (xin < 0) | (xin >= w) | (yin < 0) | (yin >= h)
        u, t = xin - 0.5, yin - 0.5
        fx, fy = u.floor(), t.floor()
        dx = (u - fx).float().view(n, 1, h * w)
        dy = (t - fy).float().view(n, 1, h * w)
        fx, fy = fx.long(), fy.long()
        if resample == BICUBIC:
            offsets, wx, wy = (-1, 0, 1, 2), _cubic_weights(dx), _cubic_weights(dy)
        elif resample == BILINEAR:
            offsets, wx, wy = (0, 1), (1 - dx, dx), (1 - dy, dy)
        else:
            raise ValueError(f'resample {resample}: only nearest (0), bilinear (2) and bicubic (3)')
        cols = [(fx + o).clamp_(0, w - 1) for o in offsets]
        v = None
        for j, oy in enumerate(offsets):
            row_start = (fy + oy).clamp_(0, h - 1).mul_(w)
            row = None
            for i, col in enumerate(cols):
                idx = (row_start + col).view(n, 1, h * w).expand(n, c, h * w)
                t_ = flat.gather(2, idx)  # uint8; addcmul promotes it
                row = wx[i] * t_ if row is None else row.addcmul_(t_, wx[i])
            v = row.mul_(wy[j]) if v is None else v.addcmul_(row, wy[j])
        v = v.add_(_TRUNC_EPS).clamp_(0, 255).trunc_()
    v = torch.where(outside.view(n, 1, h * w), fill.view(1, c, 1), v)
    return v.view(n, c, h, w)


def apply_rand_augment(images: torch.Tensor, params: torch.Tensor, fill: Sequence[float],
                       max_group: int = 256) -> torch.Tensor:
    """The drawn RandAugment layers applied to each sample: [N, 3, H, W] uint8 -> uint8.

    params: [N, num_layers, WIDTH] from RandAugmentParams, a CPU tensor (planning reads it
    on the host; a device tensor is copied back first, which waits for the device).
    fill: timm's img_mean fill colour of the geometric ops (RandAugmentParams.fill).
    max_group: samples transformed per kernel call; bounds the temporaries (the bicubic
    sampler holds about 16 bytes per output pixel and channel besides its input).
    A floating input (values 0..255) is rounded to uint8 first and returned as float32.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f'apply_rand_augment expects [N, 3, H, W] images, got {tuple(images.shape)}')
    if params.dim() != 3 or params.shape[0] != images.shape[0] or params.shape[2] != WIDTH:
        raise ValueError(f'params must be [N, num_layers, {WIDTH}] for N = {images.shape[0]}, '
                         f'got {tuple(params.shape)}')
    floating = images.is_floating_point()
    out = images.round().clamp(0, 255).to(torch.uint8) if floating else images.clone()
    n, _, h, w = out.shape
    groups, chunks, end = _plan(params.detach().cpu().double().numpy(), h, w, max(1, int(max_group)))
    if not groups:
        return out.float() if floating else out
    dev = out.device
    # one host-to-device copy for the whole plan (and the fill colour), pinned so that it
    # does not wait for the device
    tbuf = torch.from_numpy(np.concatenate(chunks + [np.asarray(fill, dtype=np.float64).reshape(3)]))
    tbuf = tbuf.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else tbuf.to(dev)
    fill_t = tbuf[end:end + 3].float()
    for _layer, kind, key, count, off, width in groups:
        idx = tbuf[off:off + count].long()
        args = tbuf[off + count:off + count * (1 + width)].view(count, width)
        x = out.index_select(0, idx)
        if kind == 'affine':
            y = _affine(x, args, key, fill_t)
        elif kind == 'lut':
            y = _lut_ops(x, args, key)
        else:
            y = _OPS[key](x.float(), args[:, 0])
        out.index_copy_(0, idx, y.to(torch.uint8))
    return out.float() if floating else out


def _main(argv=None):
    """``python -m pipelines.gpu_randaug``: apply's time per batch on a device and, off the
    CPU, its agreement with the CPU result (colour ops should agree bit for bit; the
    geometric ops' float32 sums may differ by 1 level where a device fuses multiply-adds)."""
    import argparse
    import time
    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    ap.add_argument('--batch', type=int, default=256, help='images per batch')
    ap.add_argument('--size', type=int, default=96, help='image side B')
    ap.add_argument('--policy', default='rand-m9-mstd0.5-inc1', help='RandAugment policy')
    ap.add_argument('--interpolation', default='bicubic', help="timm interpolation name or 'random'")
    ap.add_argument('--iters', type=int, default=10, help='timed batches')
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    ra = RandAugmentParams(a.policy, a.size, rand_augment_hparams(a.size, interpolation=a.interpolation))
    gen = torch.Generator().manual_seed(0)
    # smooth random images (upsampled noise), so histograms and edges look like photographs'
    low = torch.rand(a.batch, 3, max(a.size // 8, 2), max(a.size // 8, 2), generator=gen)
    imgs = torch.nn.functional.interpolate(low, size=(a.size, a.size), mode='bilinear', align_corners=False)
    imgs = (imgs * 255).round().to(torch.uint8)
    params = []
    for it in range(a.iters + 1):
        rows = []
        for i in range(a.batch):
            random.seed(it * a.batch + i)
            np.random.seed(it * a.batch + i)
            rows.append(ra())
        params.append(torch.stack(rows))
    x = imgs.to(dev)

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    out = apply_rand_augment(x, params[0], ra.fill)  # warm-up
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    sync()
    t0 = time.perf_counter()
    for p in params[1:]:
        out = apply_rand_augment(x, p, ra.fill)
    sync()
    ms = (time.perf_counter() - t0) / a.iters * 1000
    line = (f'{dev}: {ms:.2f} ms per batch of {a.batch} at {a.size} px ({a.batch / ms * 1000:.0f} images/s), '
            f'{a.policy}, {a.interpolation}, torch threads {torch.get_num_threads()}')
    if dev.type == 'cuda':
        line += f', peak extra memory {(torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20:.0f} MiB'
    print(line)
    if dev.type != 'cpu':
        ref = apply_rand_augment(imgs, params[-1], ra.fill)
        diff = (out.cpu().int() - ref.int()).abs()
        print(f'agreement with the CPU: {(diff == 0).float().mean().item() * 100:.4f}% of values equal, '
              f'max difference {diff.max().item()}')


if __name__ == '__main__':
    _main()
