"""Training crops streamed from a Hugging Face dataset (``data: hf:OWNER/NAME`` in a training config).

The dataset is opened with ``datasets.load_dataset(..., streaming=True)``, so nothing is downloaded in
advance. Its examples are shuffled in a buffer with the run's seed and split between processes with
``datasets.distributed.split_dataset_by_node``. Each image is made upright RGB, resized so its shorter
side is ``crop_size``, and cropped at random to a ``crop_size`` square, flipped at random.

Resume is exact: a checkpoint stores how many examples this process has taken and its crop RNG, and a
resumed stream skips that many examples of the same seeded shuffle. Skipping re-reads the skipped
examples, so resuming late in a long run takes a while before the first step.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from reed.images import ImageLoadError, augment_crop, load_image, random_crop, resize_to_working_size

HUB_PREFIX = "hf:"
# Examples held in the streaming shuffle buffer; more mixes better but costs memory and start-up time.
SHUFFLE_BUFFER = 1000


class DatasetLoadError(RuntimeError):
    """A Hugging Face dataset could not be opened."""


def is_hub_dataset(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


def hub_dataset_name(source: str) -> str:
    name = source[len(HUB_PREFIX):].strip()
    if not name:
        raise ValueError(f"data: '{source}' names no dataset. Use hf:OWNER/NAME.")
    return name


def open_hub_stream(name: str, split: str, seed: int, process_index: int, num_processes: int,
                    skip: int) -> Iterator[dict]:
    """Open this process's share of a streamed dataset, shuffled with ``seed``, after ``skip`` examples.

    Raises ``DatasetLoadError`` when the ``datasets`` package is missing, when ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` is set, or when the dataset cannot be opened.
    """
    # NOTE: the streaming calls below are untested, because the tests run offline without the datasets
    # package. They cover the error paths, and StreamingCrops with a stand-in stream.
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
        from datasets.distributed import split_dataset_by_node  # noqa: PLC0415
    except ImportError as error:
        raise DatasetLoadError(f"data: hf:{name} needs the datasets package, which is not installed "
                               f"({error}). pip install datasets, or train from a folder of images.") from error
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            raise DatasetLoadError(f"data: hf:{name} streams from the Hugging Face Hub, but {variable} is set. "
                                   "Unset it, or download the images and set data to their folder.")
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as error:
        raise DatasetLoadError(f"Could not open the dataset '{name}' (split '{split}') from the Hugging Face "
                               f"Hub: {type(error).__name__}: {error}. Check the name and the network, or "
                               "set data to a folder of images.") from error
    stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
    if skip:
        stream = stream.skip(skip)
    return iter(stream)


def example_pixels(value: Any) -> np.ndarray:
    """Decode one dataset image value (a PIL image, an array, or a ``{"bytes", "path"}`` dict) to RGB uint8."""
    if isinstance(value, dict):
        if value.get("bytes"):
            value = bytes(value["bytes"])
        elif value.get("path"):
            value = value["path"]
        else:
            raise ImageLoadError(f"Dataset image entry has neither bytes nor a path: keys {sorted(value)}.")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    return load_image(value).pixels


class StreamingCrops:
    """Random square crops from a stream of dataset examples, one crop per example.

    ``open_stream(skip)`` must return an iterator over the examples after the first ``skip``, the same
    sequence every time it is called. The stream is reopened when it runs out (the next epoch).
    """

    def __init__(self, open_stream: Callable[[int], Iterable[dict]], image_column: str, crop_size: int, seed: int,
                 augments: tuple[str, ...] = ()):
        self.open_stream = open_stream
        self.augments = tuple(augments)
        self.image_column = image_column
        self.crop_size = crop_size
        self.rng = np.random.default_rng(seed)
        self.consumed = 0
        self.epoch_start = 0  # examples consumed before the current pass over the stream began
        self.iterator: Iterator[dict] | None = None

    def _next_example(self) -> dict:
        if self.iterator is None:
            self.iterator = iter(self.open_stream(self.consumed - self.epoch_start))
        try:
            example = next(self.iterator)
        except StopIteration:
            if self.consumed == self.epoch_start:
                raise ValueError("The training dataset stream yielded no examples.") from None
            self.epoch_start = self.consumed
            self.iterator = iter(self.open_stream(0))
            example = next(self.iterator)
        self.consumed += 1
        return example

    def _crop(self, pixels: np.ndarray) -> np.ndarray:
        crop = random_crop(resize_to_working_size(pixels, self.crop_size), self.crop_size, self.rng)
        return augment_crop(crop, self.augments, self.rng) if self.augments else crop

    def batch(self, batch_size: int) -> list[np.ndarray]:
        crops = []
        for _ in range(batch_size):
            example = self._next_example()
            if self.image_column not in example:
                raise ValueError(f"Dataset examples have no column '{self.image_column}' (columns: "
                                 f"{sorted(example)}); set dataset_image_column.")
            crops.append(self._crop(example_pixels(example[self.image_column])))
        return crops

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "epoch_start": self.epoch_start, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
        self.epoch_start = int(state["epoch_start"])
        self.rng.bit_generator.state = state["rng"]
        self.iterator = None
