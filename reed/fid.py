"""Fréchet Inception Distance (FID) between two sets of 8-bit images.

FID compares the mean and covariance of Inception-v3 pool features of two image sets (Heusel et al.,
2017). The features come from the ``pytorch-fid`` package (``pip install pytorch-fid``), which builds
the Inception network of the original TensorFlow FID code and downloads its weights on first use. So
FID is unavailable offline or without the package, and is then reported as ``None`` with the reason
from ``fid_unavailable_reason()``, never as 0.

FID of a few dozen images is strongly biased upwards, so it is only comparable between runs on the
same images. Published benchmarks use hundreds or thousands.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import scipy.linalg
import torch

# Images that pass through Inception at once.
BATCH_SIZE = 16
# Added to the covariance diagonals when their product has no finite square root (nearly singular sets).
COVARIANCE_OFFSET = 1e-6

FeatureExtractor = Callable[[Sequence[np.ndarray]], np.ndarray]


class _InceptionState:
    model = None
    reason: str | None = None
    tried = False
    lock = threading.Lock()


def load_inception():
    """Load the FID Inception network once per process; return it, or None when it cannot be loaded."""
    with _InceptionState.lock:
        if not _InceptionState.tried:
            _InceptionState.tried = True
            try:
                from pytorch_fid.inception import InceptionV3  # noqa: PLC0415 (optional dependency)

                block = InceptionV3.BLOCK_INDEX_BY_DIM[2048]
                _InceptionState.model = InceptionV3([block]).eval()
            except ImportError as error:
                _InceptionState.reason = f"the pytorch-fid package is not installed ({error}); pip install pytorch-fid"
            except Exception as error:  # noqa: BLE001 (a failed download surfaces as many exception types)
                _InceptionState.reason = (f"the Inception weights could not be loaded ({type(error).__name__}: "
                                          f"{error})")
        return _InceptionState.model


def fid_unavailable_reason() -> str | None:
    load_inception()
    return _InceptionState.reason


@torch.inference_mode()
def inception_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """Return the (N, 2048) pool features of uint8 (H, W, 3) images; raise RuntimeError when unavailable."""
    model = load_inception()
    if model is None:
        raise RuntimeError(f"FID is unavailable: {fid_unavailable_reason()}")
    batches = []
    for start in range(0, len(images), BATCH_SIZE):
        chunk = np.stack(images[start:start + BATCH_SIZE])
        # pytorch-fid takes [0, 1] images of any size and resizes them to 299x299 itself.
        tensor = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 255.0
        batches.append(model(tensor)[0].flatten(1).double().numpy())
    return np.concatenate(batches)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Return the Fréchet distance between Gaussians fitted to two (N, D) feature sets.

    That is |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with sample covariances S.
    """
    if features_a.ndim != 2 or features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"Expected two (N, D) feature arrays of one D, got {features_a.shape} and {features_b.shape}.")
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("A covariance needs at least 2 images in each set.")
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))

    with warnings.catch_warnings():
        # Sets of fewer images than feature dimensions have singular covariances. scipy warns about
        # them, and the offset below handles the case where no finite root comes back.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(cov_a.shape[0]) * COVARIANCE_OFFSET
            root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Rounding can leave a tiny imaginary part on a real result.
    root = np.real(root)

    difference = mean_a - mean_b
    distance = difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root)
    return float(max(distance, 0.0))


def fid(images_a: Sequence[np.ndarray], images_b: Sequence[np.ndarray],
        features: FeatureExtractor | None = None) -> float | None:
    """FID between two sets of uint8 images, or None when the Inception features are unavailable.

    ``features`` replaces the Inception network (tests pass a cheap one). Raises ``ValueError`` for a
    set of fewer than 2 images.
    """
    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError(f"FID needs at least 2 images in each set, got {len(images_a)} and {len(images_b)}.")
    if features is None:
        if load_inception() is None:
            return None
        features = inception_features
    return frechet_distance(features(images_a), features(images_b))
