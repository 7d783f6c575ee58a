"""Run logging beside ``log.jsonl``: experiment trackers, memory figures and the per-interval line.

Trackers go through accelerate (``Accelerator(log_with=...)``), which writes from the main process only.
``log_with: auto`` picks TensorBoard when the ``tensorboard`` package is importable, and Weights & Biases
when ``wandb`` is importable and configured (``WANDB_API_KEY`` or ``WANDB_MODE`` set, or a login saved
in ``~/.netrc``). ``log.jsonl`` is written in every case, so a run never depends on a tracker.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from typing import Any

import numpy as np
import psutil
import torch

TRACKERS = ("tensorboard", "wandb")
INSTALL_HINTS = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb, then wandb login"}


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def wandb_configured() -> bool:
    """Return whether wandb has credentials or an explicit mode, so starting a run will not prompt."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_trackers(log_with: str) -> list[str]:
    """Turn the ``log_with`` setting into tracker names; raise ``ValueError`` when a named one is missing.

    ``auto`` returns the trackers that are installed (and, for wandb, configured), ``none`` returns none,
    and a comma-separated list such as ``tensorboard,wandb`` must name installed packages only.
    """
    setting = log_with.strip().lower()
    if setting == "none":
        return []
    if setting == "auto":
        found = ["tensorboard"] if _importable("tensorboard") else []
        if _importable("wandb") and wandb_configured():
            found.append("wandb")
        return found
    names = [name.strip() for name in setting.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"log_with must be 'auto', 'none' or a comma-separated list of {TRACKERS}, got '{log_with}'.")
    missing = [name for name in names if not _importable(name)]
    if missing:
        hints = "; ".join(INSTALL_HINTS[name] for name in missing)
        raise ValueError(f"log_with names {missing}, which is not installed. Install it ({hints}) "
                         "or set log_with: auto.")
    return names


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into ``section.key`` entries of bool, int, float or str, as trackers accept."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def memory_stats(device: torch.device) -> dict[str, float]:
    """Return memory use in GiB: the process's resident set size, and on CUDA the peak allocated."""
    stats = {"memory/rss_gib": psutil.Process().memory_info().rss / 2 ** 30}
    if device.type == "cuda":
        stats["memory/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return stats


def progress_line(record: dict[str, Any], stop: int) -> str:
    """Format one log record as a compact line: step, loss terms, learning rate, speed and memory."""
    terms = " ".join(f"{key.replace('train/', '').replace('disc/', 'disc_')} {value:.4g}"
                     for key, value in record.items()
                     if key.startswith(("train/", "disc/")) and key not in ("train/cycles", "train/warmup"))
    memory = " ".join(f"{key.split('/', 1)[1]} {value:.2f}" for key, value in record.items()
                      if key.startswith("memory/"))
    return (f"step {record['step']}/{stop} | {terms} | lr {record['lr']:.3g} | "
            f"{record['images_per_second']:.1f} img/s | {memory}")


def log_images(trackers: list, tag: str, image: np.ndarray, step: int) -> list[str]:
    """Send one (H, W, 3) uint8 image to every tracker that takes images; return the trackers' names."""
    sent = []
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
        else:
            continue
        sent.append(tracker.name)
    return sent
