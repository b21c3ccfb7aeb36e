"""Low-frequency cropping of images (EfficientTrain / EfficientTrain++).

`fourier_crop` is the exact operation of EfficientTrain: keep the centred B x B block
of the (unshifted) 2-D DFT, i.e. frequencies -B/2 .. B/2-1 on each axis, rescale by
B^2/(H W) and take the real part of the B x B inverse DFT.  It runs on the normalised
batch, on whatever device the batch lives (`FourierCrop`).

`LanczosResize` is the cheaper CPU approximation of EfficientTrain++, placed after
RandAugment in the PIL pipeline.

`fourier_upsample` zero-pads a B x B image back to H x W in the Fourier domain.  It is
the exact right inverse of `fourier_crop`: fourier_crop(fourier_upsample(y, H), B) == y
for every real B x B image y, so a cropped image and the band-limited H x H image it
stands for map into each other without loss.

Nyquist convention.  On the B-point grid the frequencies +B/2 and -B/2 are the same
frequency.  `fourier_crop` keeps only the -B/2 copy and then takes the real part, which
Hermitian-symmetrises the block: a Nyquist line of the crop holds the average of the
input's +B/2 and -B/2 lines (the (-B/2, -B/2) corner: its real part).  To invert that,
`fourier_upsample` writes each Nyquist coefficient to both the +B/2 and -B/2 positions
of the larger grid; a plain "place at -B/2 and take the real part" would halve it and
the round trip would not be the identity.  On a general image the two Nyquist aliases
cannot be told apart after cropping (as with any sampling), so
fourier_upsample(fourier_crop(x)) equals the ideal low-pass of x strictly inside the
band and the alias average on the band edge.
"""
from typing import Sequence, Tuple, Union

import torch
from PIL import Image

__all__ = ["fourier_crop", "fourier_upsample", "LanczosResize", "FourierCrop"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        # Ringing makes the output leave the input's range, so an integer result would
        # need a clipping policy; callers convert to float (and clip) themselves.
        raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")
    # fp16/bf16 FFTs are either unsupported or too imprecise (CPU has none, cuFFT only
    # for power-of-two sizes), so compute in float32 and keep float64 when given.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_even_size(size: int, name: str = "size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 2:
        raise ValueError(f"{name} must be a positive even integer, got {size!r}")


def fourier_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Low-frequency crop of an image or batch to size x size (METHOD.md, exact form).

    x: (..., H, W), typically (N, C, H, W) or (C, H, W), floating point, H, W >= size.
    Returns (..., size, size) in x's dtype and on x's device.  The mean is preserved.
    When H == W == size the operation is the identity and x itself is returned.
    """
    _check_even_size(size)
    if x.dim() < 2:
        raise ValueError(f"expected an image tensor (..., H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if size > H or size > W:
        raise ValueError(f"cannot crop a {H}x{W} image to a larger band {size}x{size}")
    if H == size and W == size:
        return x
    half = size // 2
    xf = x.to(_compute_dtype(x))
    # The DFT is separable.  Transforming the width with a real FFT first and only the
    # B kept columns along the height gives the same coefficients as a full fft2 then
    # indexing the four corner blocks, at a fraction of the work.
    r = torch.fft.rfft(xf, dim=-1)  # width frequencies 0 .. W//2
    # Negative width frequencies -half .. -1 of a real signal are the conjugates of
    # +half .. +1 (row by row, since the height has not been transformed yet).
    cols = torch.cat([r[..., :half], r[..., 1:half + 1].flip(-1).conj_physical()], dim=-1)
    c = torch.fft.fft(cols, dim=-2)  # (..., H, size)
    # Height frequencies 0 .. half-1 then -half .. -1: the unshifted layout of a
    # size-point spectrum, so ifft2 can consume the block directly.
    block = torch.cat([c[..., :half, :], c[..., H - half:, :]], dim=-2)
    # ifft2 normalises by 1/size^2 instead of 1/(H W); rescale so the DC term, hence
    # the mean intensity, is unchanged.
    out = torch.fft.ifft2(block).real * (size * size / (H * W))
    return out.to(x.dtype)


def _upsample_index(small: int, large: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source (small grid) and destination (large grid) indices along one axis."""
    if large == small:
        idx = torch.arange(small, device=device)
        return idx, idx
    half = small // 2
    # Large-grid frequencies 0 .. +half and -half .. -1.  Both +half and -half read the
    # small grid's Nyquist bin (index half): see the module docstring.
    src = torch.cat([torch.arange(0, half + 1), torch.arange(half, small)])
    dst = torch.cat([torch.arange(0, half + 1), torch.arange(large - half, large)])
    return src.to(device), dst.to(device)


def fourier_upsample(x: torch.Tensor, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Zero-pad (..., b, b') images to (..., H, W) in the Fourier domain.

    size: H (square output) or (H, W), each >= the input's side.  The input's sides
    must be even (they are crop bandwidths).  Exact right inverse of `fourier_crop`.
    """
    if x.dim() < 2:
        raise ValueError(f"expected an image tensor (..., H, W), got shape {tuple(x.shape)}")
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    bh, bw = x.shape[-2:]
    _check_even_size(bh, "input height")
    _check_even_size(bw, "input width")
    if H < bh or W < bw:
        raise ValueError(f"cannot upsample a {bh}x{bw} image to a smaller {H}x{W}")
    if (H, W) == (bh, bw):
        return x
    y = torch.fft.fft2(x.to(_compute_dtype(x)))
    src_h, dst_h = _upsample_index(bh, H, y.device)
    src_w, dst_w = _upsample_index(bw, W, y.device)
    z = y.new_zeros(y.shape[:-2] + (H, W))
    z[..., dst_h[:, None], dst_w[None, :]] = y[..., src_h[:, None], src_w[None, :]]
    # The padded spectrum is Hermitian, so the inverse is real up to rounding; .real
    # drops the rounding residue.
    out = torch.fft.ifft2(z).real * (H * W / (bh * bw))
    return out.to(x.dtype)


class LanczosResize:
    """Resize a PIL image to size x size with a Lanczos filter (EfficientTrain++).

    A plain class rather than a lambda so DataLoader workers can pickle it.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        # PIL's LANCZOS is a 3-lobe windowed sinc whose support widens with the
        # downscale factor, i.e. it low-passes before resampling (no aliasing).
        return img.resize((self.size, self.size), Image.Resampling.LANCZOS)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(size={self.size})"


class FourierCrop(torch.nn.Module):
    """Apply `fourier_crop` to a normalised batch on its device (EfficientTrain).

    `size` may be changed between stages; at the batch's own size it is a no-op.
    """

    def __init__(self, size: int):
        super().__init__()
        _check_even_size(size)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return fourier_crop(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"
