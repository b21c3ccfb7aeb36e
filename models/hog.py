"""HOG targets for masked image modelling (MaskFeat's target, used by models/mae.py).

It lives beside the MAE model because it is that model's training target, computed on
the device from the batch inside the loss (timm has no HOG); it is not part of the
curriculum, which only decides what image (bandwidth B) the network sees.

The features, per colour channel:
1. 1-pixel reflect padding, then the Sobel kernels Kx = [[1,0,-1],[2,0,-2],[1,0,-1]] and
   Ky = Kx^T applied as cross-correlation (torch's conv2d), giving gx and gy;
2. magnitude sqrt(gx^2 + gy^2) and orientation bin floor(9 atan2(gx, gy) / pi) mod 9
   (9 unsigned bins: a sign flip of both gradients lands in the same bin);
3. magnitudes weighted by a 16 x 16 Gaussian window (sigma 8, centred between pixels 7
   and 8, normalised to sum 1) repeated over the image from its top-left corner (an image
   side that is not a multiple of 16 cuts the last repetition);
4. votes summed over 8 x 8-pixel cells, and each cell's 9-bin histogram L2-normalised per
   channel (eps 1e-12, as torch.nn.functional.normalize).

What images: whatever the network is given, i.e. the normalised batch ((x - mean) / std
per channel), as MaskFeat computes HOG on its model input.  The features do not depend on
that choice: the Sobel kernels sum to zero, so a per-channel offset has no gradient, and a
positive per-channel scale changes neither atan2's angle nor a per-channel L2-normalised
histogram.  [0, 1] images give the same features up to the eps of step 4
(tests/test_mae.py checks this).

Per-patch targets: a p x p patch (p a multiple of 8) holds (p/8)^2 cells, flattened in the
order (cell row, cell column, channel, bin): 2 x 2 x 3 x 9 = 108 values for p = 16.
Everything is batched tensor arithmetic, on any device; the only Python loop runs over the
9 bins (a masked sum per bin keeps the reduction deterministic on CUDA, which a
scatter_add would not be).
"""
import contextlib
import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['HOG_BINS', 'HOG_CELL', 'hog_features', 'hog_patch_targets', 'hog_target_dim',
           'patch_targets_to_cells', 'gaussian_window']

HOG_BINS = 9
HOG_CELL = 8
HOG_WINDOW = 16
HOG_SIGMA = 8.0
_SOBEL_X = ((1., 0., -1.), (2., 0., -2.), (1., 0., -1.))


def hog_target_dim(patch_size: int, channels: int = 3) -> int:
    """Values per patch: (patch/8)^2 cells x channels x 9 bins (108 for patch 16, 3 channels)."""
    return (patch_size // HOG_CELL) ** 2 * channels * HOG_BINS


def gaussian_window(size: int = HOG_WINDOW, sigma: float = HOG_SIGMA, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """(size, size) Gaussian centred on the window's middle, summing to 1."""
    pos = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (pos / sigma) ** 2)
    w = g[:, None] * g[None, :]
    return (w / w.sum()).to(dtype)


def _sobel_weight(channels: int, dtype, device) -> torch.Tensor:
    kx = torch.tensor(_SOBEL_X, dtype=dtype, device=device)
    # output channel 2c is gx of input channel c, 2c + 1 its gy (groups=channels)
    return torch.stack([kx, kx.t()]).repeat(channels, 1, 1).unsqueeze(1)


def _check_size(h: int, w: int) -> None:
    if h % HOG_CELL or w % HOG_CELL:
        raise ValueError(f'HOG needs image sides that are multiples of the {HOG_CELL}-pixel cell, got {h}x{w}')


def _no_autocast(device_type: str):
    # autocast would run the convolution in half precision; devices without autocast (meta,
    # used to count FLOPs) need no guard
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def hog_features(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, C, 9, H/8, W/8) cell histograms, L2-normalised per cell and channel.

    Computed in float32 (float64 input stays float64), outside autocast.
    """
    if images.dim() != 4:
        raise ValueError(f'expected (N, C, H, W) images, got shape {tuple(images.shape)}')
    n, c, h, w = images.shape
    _check_size(h, w)
    x = images if images.dtype == torch.float64 else images.float()
    with _no_autocast(x.device.type):
        grads = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='reflect'), _sobel_weight(c, x.dtype, x.device), groups=c)
        gx, gy = grads[:, 0::2], grads[:, 1::2]
        magnitude = torch.sqrt(gx * gx + gy * gy)
        bins = torch.floor(torch.atan2(gx, gy) * (HOG_BINS / math.pi)).long() % HOG_BINS
        window = gaussian_window(dtype=x.dtype, device=x.device)
        reps = (-(-h // HOG_WINDOW), -(-w // HOG_WINDOW))
        magnitude = magnitude * window.repeat(*reps)[:h, :w]
        hc, wc = h // HOG_CELL, w // HOG_CELL
        hist = torch.stack([
            torch.where(bins == k, magnitude, 0.).reshape(n, c, hc, HOG_CELL, wc, HOG_CELL).sum((3, 5))
            for k in range(HOG_BINS)], dim=2)
        return F.normalize(hist, p=2, dim=2)


def hog_patch_targets(images: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """(N, C, H, W) images -> (N, L, (p/8)^2 * C * 9) per-patch HOG targets, patches in row-major order."""
    if patch_size % HOG_CELL:
        raise ValueError(f'HOG targets need a patch size that is a multiple of {HOG_CELL}, got {patch_size}')
    n, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f'image {h}x{w} is not a whole number of {patch_size}-pixel patches')
    cells = hog_features(images)
    k = patch_size // HOG_CELL
    gh, gw = h // patch_size, w // patch_size
    t = cells.reshape(n, c, HOG_BINS, gh, k, gw, k).permute(0, 3, 5, 4, 6, 1, 2)
    return t.reshape(n, gh * gw, k * k * c * HOG_BINS)


def patch_targets_to_cells(targets: torch.Tensor, grid: Tuple[int, int], patch_size: int = 16,
                           channels: int = 3) -> torch.Tensor:
    """The inverse layout of hog_patch_targets: (N, L, D) -> (N, C, 9, H/8, W/8) (for display)."""
    n = targets.shape[0]
    gh, gw = grid
    k = patch_size // HOG_CELL
    t = targets.reshape(n, gh, gw, k, k, channels, HOG_BINS).permute(0, 5, 6, 1, 3, 2, 4)
    return t.reshape(n, channels, HOG_BINS, gh * k, gw * k)
