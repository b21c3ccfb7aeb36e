"""HOG targets for masked image modelling (MaskFeat's target, used by models/mae.py).

It lives beside the MAE model because it is that model's training target, computed on
the device from the batch inside the loss (timm has no HOG); it is not part of the
curriculum, which only decides what image (bandwidth B) the network sees.

The features, per colour channel:
1. 1-pixel reflect padding, then the Sobel kernels Kx = [[1,0,-1],[2,0,-2],[1,0,-1]] and
   Ky = Kx^T applied as cross-correlation (as torch's conv2d would), giving gx and gy;
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
Everything is batched element-wise tensor arithmetic (no convolution or matrix product),
on any device; the only Python loop runs over the 9 bins (a masked sum per bin keeps the
reduction deterministic on CUDA, which a scatter_add would not be).  The gradients and
angles are computed in float64, exactly for float32 pixels (see hog_features), so the bins
are the same on every device; the histograms are float32.
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


def _check_size(h: int, w: int) -> None:
    if h % HOG_CELL or w % HOG_CELL:
        raise ValueError(f'HOG needs image sides that are multiples of the {HOG_CELL}-pixel cell, got {h}x{w}')


def _no_autocast(device_type: str):
    # the features are computed in full precision whatever the caller's autocast; devices
    # without autocast (meta, used to count FLOPs) need no guard
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def hog_features(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, C, 9, H/8, W/8) cell histograms, L2-normalised per cell and channel.

    Float32 result (float64 for float64 input), computed outside autocast.
    """
    if images.dim() != 4:
        raise ValueError(f'expected (N, C, H, W) images, got shape {tuple(images.shape)}')
    n, c, h, w = images.shape
    _check_size(h, w)
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    with _no_autocast(images.device.type):
        # Gradients in float64: for float32 (or 8-bit) pixels every difference and weighted
        # sum below is exact, so a gradient that is 0 is exactly 0 and the orientation bins
        # do not depend on summation order or device (in float32, rounding noise of order
        # 1e-7 flips the sign of gx = 0 on every horizontal edge, moving its vote between
        # bins 0 and 8).  Kx = [1, 2, 1]^T (x) [1, 0, -1] and Ky = Kx^T, applied separably.
        p = F.pad(images.double(), (1, 1, 1, 1), mode='reflect')
        d = p[..., :, :-2] - p[..., :, 2:]             # (N, C, H + 2, W): left - right
        gx = d[..., :-2, :] + 2 * d[..., 1:-1, :] + d[..., 2:, :]
        del d
        e = p[..., :-2, :] - p[..., 2:, :]             # (N, C, H, W + 2): top - bottom
        del p
        gy = e[..., :-2] + 2 * e[..., 1:-1] + e[..., 2:]
        del e
        bins = (torch.floor(torch.atan2(gx, gy) * HOG_BINS / math.pi) % HOG_BINS).to(torch.uint8)
        window = gaussian_window(dtype=torch.float64, device=images.device)
        reps = (-(-h // HOG_WINDOW), -(-w // HOG_WINDOW))
        magnitude = (torch.sqrt(gx * gx + gy * gy) * window.repeat(*reps)[:h, :w]).to(dtype)
        del gx, gy
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
