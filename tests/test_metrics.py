"""Metrics on images in [0, 1], checked against scikit-image and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from reed import metrics


def random_pair(seed: int = 0, shape=(3, 24, 20)):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
    return a, b


def test_ssim_matches_scikit_image():
    a, b = random_pair()
    expected = structural_similarity(a.transpose(1, 2, 0), b.transpose(1, 2, 0), channel_axis=2, data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    got = metrics.ssim(torch.from_numpy(a)[None].float(), torch.from_numpy(b)[None].float())
    assert got == pytest.approx(expected, abs=1e-5)


def test_ssim_identical_is_one():
    a, _ = random_pair()
    tensor = torch.from_numpy(a)[None].float()
    assert metrics.ssim(tensor, tensor) == pytest.approx(1.0)


def test_ssim_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="one shape"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_psnr_known_value_and_cap():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert metrics.mse(a, b) == pytest.approx(0.01)
    assert metrics.psnr(a, b) == pytest.approx(20.0)
    assert metrics.psnr(a, a) == metrics.PSNR_CAP


def test_to_unit_conventions():
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
    torch.testing.assert_close(metrics.to_unit(pixels).flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    torch.testing.assert_close(metrics.to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0])), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(TypeError, match="uint8"):
        metrics.to_unit(pixels.astype(np.float32))


def test_lpips_unavailable_is_none(monkeypatch):
    monkeypatch.setattr(metrics, "load_lpips", lambda net="alex": None)
    values = metrics.compare(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8))
    assert values["lpips"] is None
    assert values["psnr"] == pytest.approx(0.0)


def test_lpips_reason_when_missing():
    if metrics.load_lpips() is not None:
        pytest.skip("LPIPS weights are available on this machine")
    assert metrics.lpips_unavailable_reason()


def test_ssim_matches_scikit_image_on_photo():
    from reed.data import held_out_paths
    from reed.images import load_image

    photo = load_image(held_out_paths()["chelsea"]).pixels.astype(np.float64) / 255
    rng = np.random.default_rng(1)
    noisy = np.clip(photo + rng.normal(0, 0.02, photo.shape), 0, 1)
    expected = structural_similarity(photo, noisy, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
    got = metrics.ssim(torch.from_numpy(photo).permute(2, 0, 1)[None], torch.from_numpy(noisy).permute(2, 0, 1)[None])
    assert got == pytest.approx(expected, abs=1e-5)


def test_identical_matches_compare_on_itself():
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    measured = metrics.compare(image, image, with_lpips=False)
    known = metrics.identical(measured)
    assert known["mse"] == measured["mse"] == 0.0
    assert known["psnr"] == measured["psnr"] == metrics.PSNR_CAP
    assert known["ssim"] == pytest.approx(measured["ssim"], abs=1e-6)
    assert known["lpips"] is None
    assert metrics.identical({"lpips": 0.3})["lpips"] == 0.0
