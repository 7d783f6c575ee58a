"""Training photos and random crops.

The built-in models are trained on the photos that ship inside scikit-image, scikit-learn and
matplotlib, so everything runs offline. A fixed set of them is held out for evaluation and never cropped
for training: ``HELD_OUT``. A run can instead train on a folder of images or a streamed Hugging Face
dataset (``reed.hub_data``), and evaluate on a folder of its own (``eval_paths``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from reed.hub_data import StreamingCrops, hub_dataset_name, is_hub_dataset, open_hub_stream
from reed.images import augment_crop, load_image, random_crop

if TYPE_CHECKING:
    from reed.config import TrainConfig

PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class BundledPhoto:
    name: str
    package: str
    path: str


# Photographs only: the synthetic test patterns (chessboard, phantom, logos) teach a VAE little about photos.
TRAIN_PHOTOS = (
    BundledPhoto("coffee", "skimage", "data/coffee.png"),
    BundledPhoto("rocket", "skimage", "data/rocket.jpg"),
    BundledPhoto("motorcycle_left", "skimage", "data/motorcycle_left.png"),
    BundledPhoto("motorcycle_right", "skimage", "data/motorcycle_right.png"),
    BundledPhoto("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg"),
    BundledPhoto("ihc", "skimage", "data/ihc.png"),
    BundledPhoto("retina", "skimage", "data/retina.jpg"),
    BundledPhoto("color", "skimage", "data/color.png"),
    BundledPhoto("camera", "skimage", "data/camera.png"),
    BundledPhoto("brick", "skimage", "data/brick.png"),
    BundledPhoto("grass", "skimage", "data/grass.png"),
    BundledPhoto("gravel", "skimage", "data/gravel.png"),
    BundledPhoto("moon", "skimage", "data/moon.png"),
    BundledPhoto("coins", "skimage", "data/coins.png"),
    BundledPhoto("clock_motion", "skimage", "data/clock_motion.png"),
    BundledPhoto("flower", "sklearn", "datasets/images/flower.jpg"),
)
HELD_OUT = (
    BundledPhoto("astronaut", "skimage", "data/astronaut.png"),
    BundledPhoto("chelsea", "skimage", "data/chelsea.png"),
    BundledPhoto("china", "sklearn", "datasets/images/china.jpg"),
    BundledPhoto("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def bundled_path(photo: BundledPhoto) -> Path:
    """Locate a bundled photo inside its installed package."""
    try:
        module = importlib.import_module(photo.package)
    except ImportError as error:
        raise FileNotFoundError(f"Photo '{photo.name}' ships with {photo.package}, which is not installed: "
                                f"pip install {PIP_NAMES[photo.package]}") from error
    path = Path(module.__file__).resolve().parent / photo.path
    if not path.is_file():
        raise FileNotFoundError(f"Photo '{photo.name}' not found at {path}; this {photo.package} version lacks it.")
    return path


def held_out_paths() -> dict[str, Path]:
    """Return the held-out photos by name: the app's examples and the figures in the model card."""
    return {photo.name: bundled_path(photo) for photo in HELD_OUT}


def folder_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return paths


def training_paths(source: str) -> list[Path]:
    """Resolve a data source: ``bundled`` (the training photos above) or a folder of images."""
    if source == "bundled":
        return [bundled_path(photo) for photo in TRAIN_PHOTOS]
    return folder_images(source)


def eval_paths(source: str) -> list[Path]:
    """Resolve the held-out set: ``bundled`` (``HELD_OUT``) or a folder of images, in a fixed order."""
    if source == "bundled":
        return list(held_out_paths().values())
    return folder_images(source)


def make_crops(config: "TrainConfig", process_index: int = 0,
               num_processes: int = 1) -> "RandomCrops | StreamingCrops":
    """Build one process's crop stream for ``config.data``; each process gets its own seed and share."""
    seed = config.seed + process_index
    if is_hub_dataset(config.data):
        open_stream = functools.partial(open_hub_stream, hub_dataset_name(config.data), config.dataset_split,
                                        config.seed, process_index, num_processes)
        return StreamingCrops(lambda skip: open_stream(skip=skip), config.dataset_image_column,
                              config.crop_size, seed=seed, augments=config.augment)
    return RandomCrops(training_paths(config.data), config.crop_size, seed=seed, augments=config.augment)


class RandomCrops:
    """An endless stream of random square crops, flipped at random, from a list of photos.

    Each photo is kept at a few scales (full, 3/4, 1/2, 1/3), so a crop sees anything from fine texture
    to a whole object. ``augments`` names extra random changes of each crop (``reed.images.augment_crop``). The stream is driven by one numpy Generator whose state is part of every
    checkpoint, so a resumed run sees the same crops as an uninterrupted one.
    """

    SCALES = (1.0, 0.75, 0.5, 1 / 3)

    def __init__(self, paths: list[Path], crop_size: int, seed: int, augments: tuple[str, ...] = ()):
        self.crop_size = crop_size
        self.augments = tuple(augments)
        self.rng = np.random.default_rng(seed)
        self.levels: list[np.ndarray] = []
        for path in paths:
            pixels = load_image(path).pixels
            height, width = pixels.shape[:2]
            for scale in self.SCALES:
                size = (round(width * scale), round(height * scale))
                if min(size) < crop_size:
                    break
                resized = pixels if scale == 1.0 else np.asarray(
                    Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
                self.levels.append(resized)
        if not self.levels:
            raise ValueError(f"No training image has both sides of at least crop_size={crop_size} pixels.")

    def batch(self, batch_size: int) -> list[np.ndarray]:
        crops = []
        for _ in range(batch_size):
            pixels = self.levels[self.rng.integers(len(self.levels))]
            crop = random_crop(pixels, self.crop_size, self.rng)
            crops.append(augment_crop(crop, self.augments, self.rng) if self.augments else crop)
        return crops

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
