import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from curriculum.lowfreq import FourierCrop, LanczosResize, fourier_crop, fourier_upsample

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "shared", "data", "imagenet-samples")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _freqs(n):
    return torch.fft.fftfreq(n, 1.0 / n)  # integer frequencies 0..n/2-1, -n/2..-1


def _band_mask(H, W, size, closed_low=True, closed_high=False):
    """Mask of frequencies k with lo <= k <= hi on both axes (lo = -size/2, hi = size/2)."""
    h = size // 2

    def axis(n):
        k = _freqs(n)
        lo = (k >= -h) if closed_low else (k > -h)
        hi = (k <= h) if closed_high else (k < h)
        return lo & hi

    return axis(H)[:, None] & axis(W)[None, :]


def _lowpass(x, size, **band):
    """Ideal H x W low-pass computed independently: mask the full FFT, real part."""
    H, W = x.shape[-2:]
    return torch.fft.ifft2(torch.fft.fft2(x.double()) * _band_mask(H, W, size, **band)).real


@pytest.mark.parametrize("shape,size", [((2, 3, 96, 96), 32), ((2, 3, 64, 96), 32), ((3, 48, 40), 16)])
def test_band_limited_image_is_reproduced_exactly(shape, size):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape[:-2] + (size, size), generator=g)
    x = fourier_upsample(y, shape[-2:])
    assert x.shape == shape and x.dtype == y.dtype
    # x really is band-limited: no energy outside [-size/2, size/2] on either axis.
    spec = torch.fft.fft2(x.double())
    outside = ~_band_mask(*shape[-2:], size, closed_high=True)
    assert spec[..., outside].abs().max() < 1e-9 * spec.abs().max() + 1e-4
    torch.testing.assert_close(fourier_crop(x, size), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("H,W,size", [(64, 64, 32), (96, 96, 32), (96, 96, 48), (64, 96, 32)])
def test_crop_samples_the_ideal_lowpass(H, W, size):
    # The crop is the ideal low-pass (frequencies -B/2..B/2-1, real part) sampled on
    # the B-point grid; with integer ratios that is plain strided subsampling.  This
    # checks the Nyquist handling (real part) of METHOD.md step 4 as well.
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    expected = _lowpass(x, size)[..., :: H // size, :: W // size]
    torch.testing.assert_close(fourier_crop(x, size).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("H,W,size", [(96, 96, 32), (64, 96, 32), (224, 224, 96)])
def test_crop_and_zero_pad_give_the_ideal_lowpass(H, W, size):
    x0 = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    # An image with no content on the band edge (|k| = B/2): zero-padding its crop
    # back to H x W reproduces exactly its ideal low-pass, i.e. itself.
    x = _lowpass(x0, size, closed_low=False).float()
    torch.testing.assert_close(fourier_upsample(fourier_crop(x, size), (H, W)), x, atol=1e-5, rtol=0)
    # A general image: identical to the ideal low-pass strictly inside the band and
    # nothing outside it; only the band edge, where +B/2 and -B/2 alias, may differ.
    back = torch.fft.fft2(fourier_upsample(fourier_crop(x0, size), (H, W)).double())
    spec = torch.fft.fft2(x0.double())
    inside = _band_mask(H, W, size, closed_low=False)
    outside = ~_band_mask(H, W, size, closed_high=True)
    scale = spec.abs().max()
    assert (back[..., inside] - spec[..., inside]).abs().max() < 1e-5 * scale
    assert back[..., outside].abs().max() < 1e-5 * scale


def test_mean_is_preserved():
    x = torch.rand(4, 3, 224, 160, generator=torch.Generator().manual_seed(3)) * 5 - 1
    for size in (32, 96, 160):
        torch.testing.assert_close(fourier_crop(x, size).mean(dim=(-2, -1)), x.mean(dim=(-2, -1)),
                                   atol=1e-5, rtol=0)


def test_batched_matches_per_image():
    x = torch.randn(5, 3, 80, 72, generator=torch.Generator().manual_seed(4))
    batched = fourier_crop(x, 48)
    single = torch.stack([fourier_crop(img, 48) for img in x])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2.0 ** -8), (torch.bfloat16, 2.0 ** -5)])
def test_low_precision_input(dtype, tol):
    # Normalised images span roughly [-2.1, 2.6].  The computation runs in float32, so
    # against the float32 crop of the same (rounded) input only the output's rounding
    # differs: at most half an ulp at magnitudes below 4 (tol = one ulp there).
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).clamp(-2.1, 2.6)
    out = fourier_crop(x.to(dtype), 32)
    assert out.dtype == dtype and out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out.float(), fourier_crop(x.to(dtype).float(), 32), atol=tol, rtol=0)
    up = fourier_upsample(out, 64)
    assert up.dtype == dtype and up.shape == (2, 3, 64, 64)


def test_full_size_is_identity_and_module():
    x = torch.randn(2, 3, 64, 64)
    assert fourier_crop(x, 64) is x
    module = FourierCrop(64)
    assert module(x) is x
    module.size = 32
    torch.testing.assert_close(module(x), fourier_crop(x, 32))
    # Only the width is cropped when the height already equals the band.
    y = torch.randn(3, 32, 64)
    torch.testing.assert_close(fourier_crop(y, 32).double(), _lowpass(y, 32)[..., :, ::2], atol=1e-5, rtol=0)


def test_invalid_arguments():
    x = torch.randn(1, 3, 64, 64)
    for bad in (0, 31, 66, -2):
        with pytest.raises(ValueError):
            fourier_crop(x, bad)
    with pytest.raises(TypeError):
        fourier_crop(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 32)
    with pytest.raises(ValueError):
        fourier_upsample(torch.randn(1, 3, 32, 32), 16)
    with pytest.raises(ValueError):
        FourierCrop(33)


def test_lanczos_resize_is_picklable_pil_transform():
    t = pickle.loads(pickle.dumps(LanczosResize(96)))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 200, 3), dtype=np.uint8))
    out = t(img)
    assert isinstance(out, Image.Image) and out.size == (96, 96)
    assert "96" in repr(t)
    with pytest.raises(ValueError):
        LanczosResize(0)


def _shift(x, d):
    """Sub-pixel (periodic) shift: out(n) = x(n + d) on both axes."""
    H, W = x.shape[-2:]
    k = torch.fft.fftfreq(H, dtype=torch.float64)[:, None] + torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    return torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(2j * math.pi * k * d)).real


def _psnr(a, b):
    return 10 * math.log10(255.0 ** 2 / ((a - b) ** 2).mean().item())


def test_lanczos_is_close_to_fourier_crop_on_photos():
    if not os.path.isdir(SAMPLES):
        pytest.skip(f"{SAMPLES} (ImageNet sample photos) is absent")
    from torchvision.transforms import CenterCrop

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(SAMPLES) for f in fs
                   if f.lower().endswith((".jpeg", ".jpg", ".png")))
    if len(files) < 40:
        pytest.skip(f"{SAMPLES} holds {len(files)} images, fewer than the 40 this test uses")
    files = files[:: len(files) // 40][:40]  # a fixed spread over the classes
    crop = CenterCrop(224)
    images = [crop(Image.open(path).convert("RGB")) for path in files]
    for size in (96, 160):
        plain, aligned, aliased = [], [], []
        for img in images:
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1).double()
            lanczos = torch.from_numpy(np.array(LanczosResize(size)(img))).permute(2, 0, 1).double()
            fourier = fourier_crop(x, size).clamp(0, 255).round()
            plain.append(_psnr(lanczos, fourier))
            # The DFT crop samples the low-passed image at n = m * H/B while PIL samples
            # pixel centres, n = (m + 1/2) * H/B - 1/2: an offset of (H/B - 1)/2 input
            # pixels (0.67 px at B=96).  Undoing it isolates the filters' difference.
            fourier_c = fourier_crop(_shift(x, (224 / size - 1) / 2), size).clamp(0, 255).round()
            aligned.append(_psnr(lanczos, fourier_c))
            # Reference point: plain bilinear subsampling without antialiasing aliases.
            naive = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear",
                                                    align_corners=False, antialias=False)[0].round()
            aliased.append(_psnr(naive, fourier_c))
        # Measured on these 40 photos (mean / min PSNR, dB):
        #   B=96:  plain 27.9 / 22.7, aligned 38.7 / 32.2, aliasing bilinear 30.7 / 20.0
        #   B=160: plain 33.7 / 24.4, aligned 40.0 / 27.9, aliasing bilinear 35.4 / 23.7
        # Both are band-limiting resamplers; what remains after alignment is the Lanczos
        # kernel's gradual transition band against the brick-wall cut-off, the Gibbs
        # ringing of the latter (strongest at the image border, which the DFT treats as
        # periodic) and 8-bit rounding.  Bounds sit 3-5 dB under the measurements: they
        # catch a wrong bandwidth, scaling or axis order (which cost far more than 5 dB)
        # without depending on photo-to-photo variation.
        assert np.mean(plain) > 25.0 and min(plain) > 19.0, (size, np.mean(plain), min(plain))
        assert np.mean(aligned) > 35.0 and min(aligned) > 24.0, (size, np.mean(aligned), min(aligned))
        # Lanczos approximates the ideal crop clearly better than an aliasing resize.
        assert np.mean(aligned) > np.mean(aliased) + 3.0, (size, np.mean(aligned), np.mean(aliased))
