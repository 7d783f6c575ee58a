"""Typed training configuration, validated when built, read from YAML and saved with every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CYCLE_SCHEDULES = ("fixed", "uniform", "grow")


@dataclass
class ModelConfig:
    """Shape of a new ``AutoencoderKL``, used when training starts from scratch (``base: null``)."""

    block_out_channels: tuple[int, ...] = (24, 48, 96, 128)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 8
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) < 2:
            raise ValueError("model.block_out_channels needs at least two levels.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"model.block_out_channels {bad} must be divisible by "
                             f"model.norm_num_groups={self.norm_num_groups} (GroupNorm).")
        _positive(self, "layers_per_block", "latent_channels", "norm_num_groups")

    def diffusers_kwargs(self) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


@dataclass
class LossConfig:
    """Weights of the loss terms and the re-encode/decode cycle schedule.

    ``cycles`` is the largest number K of encode->decode passes with gradients in one batch. With
    ``cycle_schedule`` ``fixed`` every batch uses K, ``uniform`` draws K from 1..cycles, and ``grow``
    draws from 1..k where k rises linearly from 1 to ``cycles`` over training. With probability
    ``warmup_probability`` a batch first runs 1..``warmup_cycles`` passes without gradients, so the
    loss also sees images from deep in a chain at little cost. ``cycles: 1`` and ``warmup_cycles: 0``
    is ordinary single-pass VAE training.
    """

    l1: float = 1.0
    l2: float = 1.0
    lpips: float = 0.0
    kl: float = 1e-6
    latent: float = 0.0
    cycles: int = 1
    cycle_schedule: str = "uniform"
    warmup_cycles: int = 0
    warmup_probability: float = 0.5
    quantize: bool = True

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "lpips", "kl", "latent"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}.")
        if self.l1 + self.l2 + self.lpips <= 0:
            raise ValueError("At least one reconstruction weight (loss.l1, loss.l2, loss.lpips) must be > 0.")
        _positive(self, "cycles")
        if self.cycle_schedule not in CYCLE_SCHEDULES:
            raise ValueError(f"loss.cycle_schedule must be one of {CYCLE_SCHEDULES}, got '{self.cycle_schedule}'.")
        if self.warmup_cycles < 0:
            raise ValueError(f"loss.warmup_cycles must be >= 0, got {self.warmup_cycles}.")
        if not 0.0 <= self.warmup_probability <= 1.0:
            raise ValueError(f"loss.warmup_probability must be in [0, 1], got {self.warmup_probability}.")


@dataclass
class TrainConfig:
    """Everything one training run needs. ``output_dir`` receives checkpoints, logs and the final model."""

    output_dir: str
    steps: int
    base: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_encoder: bool = True
    data: str = "bundled"
    crop_size: int = 128
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 200
    eval_cycles: int = 10
    eval_size: int = 128
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        _positive(self, "steps", "crop_size", "batch_size", "log_every", "checkpoint_every",
                  "keep_checkpoints", "eval_every", "eval_cycles", "eval_size")
        if self.crop_size % 8 or self.eval_size % 8:
            raise ValueError(f"crop_size ({self.crop_size}) and eval_size ({self.eval_size}) must be multiples of 8.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps and grad_clip must be >= 0.")
        if self.base is None and not self.train_encoder:
            raise ValueError("train_encoder: false needs a base model to take the frozen encoder from.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"]["block_out_channels"] = list(self.model.block_out_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}. Valid keys: {sorted(known)}.")
        try:
            return cls(**data)
        except TypeError as error:  # unknown nested keys or missing required ones
            raise ValueError(f"Invalid config: {error}") from error

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of config keys.")
        for key, value in (overrides or {}).items():
            data[key] = value
        return cls.from_dict(data)


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")
