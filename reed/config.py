"""Typed training configuration, validated when built, read from YAML and saved with every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CYCLE_SCHEDULES = ("fixed", "uniform", "grow")
EDIT_NAMES = ("crop", "resize", "color", "jpeg", "blur")  # the keys of reed.augment.EDITS
CROP_AUGMENTS = ("rotate", "recolor")  # the names reed.images.augment_crop understands
MIXED_PRECISION = ("no", "fp16", "bf16")
FINAL_WEIGHTS = ("trained", "ema")


@dataclass
class ModelConfig:
    """Shape of a new ``AutoencoderKL``, used when training starts from scratch (``base: null``) or with
    ``random_init: true``."""

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

    ``latent`` weighs the distance of each cycle's re-encoding from the original image's latent.
    ``consistency`` weighs the distance of each later cycle's output from x1, the first decode of the
    clean image. It acts only on batches of two or more cycles, warm-up cycles included. It cannot be
    combined with edits between cycles, because they change what x1 should be.
    ``contraction`` weighs how much one decode/encode cycle amplifies a small change of the latent along
    its most amplified direction, found by ``contraction_iterations`` steps of power iteration; a gain
    above 1 makes a chain diverge, so gains above ``contraction_target`` are penalised. The change has
    ``contraction_step`` times the latent's norm.
    ``encoder_anchor`` is a different term, for ``train_encoder: true``: the distance of the trained
    encoder's latent from a frozen copy of the base encoder's, so diffusion models trained on the base's
    latents still understand the new ones. ``adversarial`` weighs a PatchGAN hinge term that starts at
    ``adversarial_start_step``, optionally scaled by the adaptive weight (``adversarial_adaptive``).
    With probability ``edit_probability`` at each boundary between cycles, one of ``edits`` (ordinary
    pixel edits) is applied to the cycle's output and its target (``reed.augment``).
    """

    l1: float = 1.0
    l2: float = 1.0
    lpips: float = 0.0
    kl: float = 1e-6
    latent: float = 0.0
    consistency: float = 0.0
    contraction: float = 0.0
    contraction_iterations: int = 4
    contraction_step: float = 0.05
    contraction_target: float = 0.8
    cycles: int = 1
    cycle_schedule: str = "uniform"
    warmup_cycles: int = 0
    warmup_probability: float = 0.5
    quantize: bool = True
    encoder_anchor: float = 0.0
    adversarial: float = 0.0
    adversarial_start_step: int = 0
    adversarial_adaptive: bool = False
    edit_probability: float = 0.0
    edits: tuple[str, ...] = EDIT_NAMES

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "lpips", "kl", "latent", "consistency", "contraction",
                     "contraction_iterations", "contraction_target", "encoder_anchor", "adversarial"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}.")
        if self.l1 + self.l2 + self.lpips <= 0:
            raise ValueError("At least one reconstruction weight (loss.l1, loss.l2, loss.lpips) must be > 0.")
        _positive(self, "cycles")
        if not self.contraction_step > 0:
            raise ValueError(f"loss.contraction_step must be > 0, got {self.contraction_step}.")
        if self.cycle_schedule not in CYCLE_SCHEDULES:
            raise ValueError(f"loss.cycle_schedule must be one of {CYCLE_SCHEDULES}, got '{self.cycle_schedule}'.")
        if self.warmup_cycles < 0:
            raise ValueError(f"loss.warmup_cycles must be >= 0, got {self.warmup_cycles}.")
        if not 0.0 <= self.warmup_probability <= 1.0:
            raise ValueError(f"loss.warmup_probability must be in [0, 1], got {self.warmup_probability}.")
        if self.adversarial_start_step < 0:
            raise ValueError(f"loss.adversarial_start_step must be >= 0, got {self.adversarial_start_step}.")
        if not 0.0 <= self.edit_probability <= 1.0:
            raise ValueError(f"loss.edit_probability must be in [0, 1], got {self.edit_probability}.")
        if self.consistency > 0 and self.cycles == 1 and self.warmup_cycles == 0:
            raise ValueError("loss.consistency compares later cycles with the first one, but with loss.cycles: 1 "
                             "and loss.warmup_cycles: 0 every batch runs one cycle. Raise either, or set "
                             "loss.consistency: 0.")
        if self.consistency > 0 and self.edit_probability > 0:
            raise ValueError("loss.consistency compares later cycles with the first decode of the clean image, "
                             "which edits between cycles change; set loss.edit_probability: 0 or "
                             "loss.consistency: 0.")
        self.edits = _names("loss.edits", self.edits, EDIT_NAMES)
        if not self.edits:
            raise ValueError(f"loss.edits must be a non-empty list from {EDIT_NAMES}, got [].")


@dataclass
class DiscriminatorConfig:
    """Shape and learning rate of the PatchGAN discriminator, used when ``loss.adversarial`` > 0.

    ``learning_rate: null`` uses the run's ``learning_rate``, held constant (no warm-up or decay).
    """

    layers: int = 3
    channels: int = 64
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "layers", "channels")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"discriminator.learning_rate must be > 0 or null, got {self.learning_rate}.")


@dataclass
class TrainConfig:
    """Everything one training run needs. ``output_dir`` receives checkpoints, logs and the final model.

    ``train_encoder: null`` (the default) resolves to false when there is a ``base`` (decoder-only REED,
    the latent space stays the base's) and to true when training from scratch. docs/training.md
    describes every key.
    """

    output_dir: str
    steps: int
    base: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    train_encoder: bool | None = None
    random_init: bool = False
    data: str = "bundled"
    dataset_split: str = "train"
    dataset_image_column: str = "image"
    crop_size: int = 128
    augment: tuple[str, ...] = ()
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
    eval_data: str = "bundled"
    threads: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = None
    final_weights: str = "trained"
    log_with: str = "auto"
    tracker_project: str = "reed"
    push_to_hub: str | None = None

    def __post_init__(self) -> None:
        self.model = _section("model", self.model, ModelConfig)
        self.loss = _section("loss", self.loss, LossConfig)
        self.discriminator = _section("discriminator", self.discriminator, DiscriminatorConfig)
        if self.train_encoder is None:
            self.train_encoder = self.base is None
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
        if self.base is None and not self.train_encoder and not self.random_init:
            raise ValueError("train_encoder: false needs a base model to take the frozen encoder from.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}.")
        self.augment = _names("augment", self.augment, CROP_AUGMENTS)
        self._check_training_options()

    def _check_training_options(self) -> None:
        if self.loss.encoder_anchor > 0 and not self.train_encoder:
            raise ValueError("loss.encoder_anchor > 0 needs train_encoder: true. With a frozen encoder the "
                             "term is always 0, so set loss.encoder_anchor: 0.")
        if self.loss.encoder_anchor > 0 and self.base is None and not self.random_init:
            raise ValueError("loss.encoder_anchor > 0 needs a base model, because the term keeps the trained "
                             "encoder near the base's. Set base, or set loss.encoder_anchor: 0.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}.")
        if self.final_weights not in FINAL_WEIGHTS:
            raise ValueError(f"final_weights must be one of {FINAL_WEIGHTS}, got '{self.final_weights}'.")
        if self.final_weights == "ema" and self.ema_decay is None:
            raise ValueError("final_weights: ema needs ema_decay (for example 0.999).")
        if self.random_init and self.base is None:
            raise ValueError("random_init: true needs base, the model whose architecture `model` describes "
                             "(it is named in the model card). Set base, or drop random_init and use base: null.")
        if self.data.startswith("hf:") and not self.data[3:].strip():
            raise ValueError(f"data: '{self.data}' names no dataset. Use hf:OWNER/NAME.")
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise ValueError(f"push_to_hub must be a repository id OWNER/NAME or null, got '{self.push_to_hub}'.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"]["block_out_channels"] = list(self.model.block_out_channels)
        data["loss"]["edits"] = list(self.loss.edits)
        data["augment"] = list(self.augment)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        _reject_unknown_keys("config", data, cls)
        try:
            return cls(**data)
        except TypeError as error:  # a required key is missing
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


def _section(key: str, value: Any, section_class: type) -> Any:
    """Build one nested section (``model``, ``loss``, ``discriminator``) from its mapping."""
    if isinstance(value, section_class):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of {key}.* keys, got {value!r}.")
    _reject_unknown_keys(key, value, section_class)
    return section_class(**value)


def _reject_unknown_keys(key: str, data: dict[str, Any], config_class: type) -> None:
    """Raise ``ValueError`` listing the valid keys when ``data`` has a key that ``config_class`` lacks."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {key} keys {unknown}. Valid {key} keys: {sorted(known)}.")


def _names(key: str, value: Any, valid: tuple[str, ...]) -> tuple[str, ...]:
    """Check that ``value`` is a list of names from ``valid`` and return it as a tuple."""
    if isinstance(value, str):
        raise ValueError(f"{key} must be a list of names, got the string '{value}'. Write [{value}].")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} must be a list of names from {list(valid)}, got {value!r}.")
    names = tuple(value)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"{key}: unknown names {unknown}. Valid names are {list(valid)}.")
    return names


def _positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")
