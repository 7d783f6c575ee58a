"""Shared fixtures: tiny VAEs with random weights, saved in the diffusers folder layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def make_tiny_vae(seed: int = 0, latent_channels: int = 4, levels: int = 2) -> AutoencoderKL:
    """Build an AutoencoderKL of a few thousand parameters with random weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 16)[:levels], layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8, sample_size=32,
    ).eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A folder holding a tiny random VAE (downsampling factor 2, 4 latent channels)."""
    folder = tmp_path_factory.mktemp("tiny-vae")
    make_tiny_vae(seed=0).save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def other_tiny_vae_dir(tmp_path_factory) -> str:
    """A second tiny VAE with different weights and 8 latent channels."""
    folder = tmp_path_factory.mktemp("tiny-vae-8ch")
    make_tiny_vae(seed=1, latent_channels=8).save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    """A folder of three 48x40 noisy gradients: training data small enough for a few-second run."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(3):
        gradient = np.linspace(0, 255, 48)[None, :, None] * np.ones((40, 1, 3))
        pixels = np.clip(gradient + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index}.png")
    return str(folder)


@pytest.fixture(scope="session")
def case_path(tmp_path_factory):
    """Return a function that writes one of ``bad_inputs.CASES`` once per session and returns its path."""
    from bad_inputs import write_case

    folder = tmp_path_factory.mktemp("cases")
    written = {}

    def path_of(name: str):
        if name not in written:
            written[name] = write_case(name, folder)
        return written[name]

    return path_of


@pytest.fixture
def photo() -> np.ndarray:
    """A 40x56 crop of a bundled photo: real image statistics at a size tests can afford."""
    from reed.data import held_out_paths
    from reed.images import load_image

    pixels = load_image(held_out_paths()["chelsea"]).pixels
    return np.ascontiguousarray(pixels[100:140, 150:206])
