"""Image-quality metrics on float images in [0, 1].

``to_unit`` is the one conversion into that range. MSE, PSNR and SSIM are computed here; LPIPS needs
pretrained network weights, so it is loaded lazily and reported as ``None`` (unavailable) whenever
they cannot be loaded, never as zero.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

# PSNR of identical images is infinite, which JSON cannot store, so it is capped here (the README states the cap).
PSNR_CAP = 100.0


def to_unit(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert a uint8 (H, W, 3) array or a (N, 3, H, W) tensor in [-1, 1] to (N, 3, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise TypeError(f"Expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}.")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    return ((image.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a, b).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1], capped at ``PSNR_CAP``."""
    error = mse(a, b)
    return PSNR_CAP if error <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, -10.0 * math.log10(error))


@functools.lru_cache(maxsize=4)
def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return (kernel / kernel.sum()).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al., 2004) over channels, for images in [0, 1].

    Uses an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, and only positions where the
    window fits inside the image; the same as ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``. The Gaussian is
    applied as two 1-D passes in float32: the variances it subtracts are far above float32 rounding
    next to the constant K2^2 = 9e-4, and the result agrees with scikit-image to 1e-5 in the tests.
    """
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    channels = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    window -= 1 - window % 2  # an odd window, smaller for tiny images
    kernel = _gaussian_kernel(window, sigma).to(a.device)
    rows = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    a, b = a.float(), b.float()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).mean().item()


class _LpipsState:
    model = None
    reason: str | None = None
    tried = False
    lock = threading.Lock()


def load_lpips(net: str = "alex"):
    """Load the LPIPS network once per process; return it, or ``None`` when its weights cannot be loaded.

    LPIPS comes from the ``lpips`` package, whose backbone weights torchvision downloads on first use,
    so it is unavailable offline or without torchvision. ``lpips_unavailable_reason()`` says why.
    """
    with _LpipsState.lock:
        if not _LpipsState.tried:
            _LpipsState.tried = True
            try:
                import lpips  # noqa: PLC0415 (optional dependency)

                _LpipsState.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
            except ImportError as error:
                _LpipsState.reason = f"the lpips package is not installed ({error}); pip install lpips torchvision"
            except Exception as error:  # noqa: BLE001 (a failed download surfaces as many exception types)
                _LpipsState.reason = f"its network weights could not be loaded ({type(error).__name__}: {error})"
        return _LpipsState.model


def lpips_unavailable_reason() -> str | None:
    load_lpips()
    return _LpipsState.reason


def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """LPIPS (AlexNet) distance for images in [0, 1], or ``None`` when LPIPS is unavailable."""
    model = load_lpips()
    if model is None:
        return None
    with torch.inference_mode():
        return model(a * 2 - 1, b * 2 - 1).mean().item()


def identical(like: dict[str, float | None]) -> dict[str, float | None]:
    """Return what ``compare`` gives for an image against itself, with LPIPS null where ``like``'s is."""
    return {"mse": 0.0, "psnr": PSNR_CAP, "ssim": 1.0, "lpips": None if like["lpips"] is None else 0.0}


def compare(image: torch.Tensor, reference: torch.Tensor, with_lpips: bool = True) -> dict[str, float | None]:
    """MSE, PSNR, SSIM and LPIPS of ``image`` against ``reference``, both in [0, 1]."""
    return {
        "mse": mse(image, reference),
        "psnr": psnr(image, reference),
        "ssim": ssim(image, reference),
        "lpips": lpips_distance(image, reference) if with_lpips else None,
    }
