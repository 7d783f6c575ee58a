"""Diffusers editing pipelines: loading each once per process, and running it with an arm's VAE.

A pipeline is named by a Hugging Face Hub id or a local folder in the diffusers layout (the folder that
``save_pretrained`` writes, with ``model_index.json``). Weights load from safetensors files only. The
``MAX_CACHED_PIPELINES`` most recently used (kind, model, device) stay loaded for later calls.

The pipeline only denoises. ``reed.edits.diffusion`` encodes the image with the arm's VAE through
``reed.models.encode`` and passes the latents to the pipeline, which returns latents
(``output_type="latent"``) that ``reed.models.decode`` turns back into pixels. So the VAE always runs in
float32, even where the UNet runs in float16, and two arms differ only in their VAE.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from reed import models

# Overrides the device that pipelines run on: cuda, mps or cpu (optionally with an index, cuda:1).
DEVICE_VARIABLE = "REED_DIFFUSION_DEVICE"
# Latent channels of the pipelines supported here. The diffusers pipelines recognise latents passed as
# ``image`` by this channel count, so a pipeline with other latents cannot take them.
SUPPORTED_LATENT_CHANNELS = 4
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Loaded pipelines kept in memory. A Stable Diffusion 1.x pipeline has about a billion parameters,
# so roughly 2 GB in float16.
MAX_CACHED_PIPELINES = 4
# Arm pipelines kept for reuse: each shares every module with its base pipeline except the VAE.
MAX_ARM_PIPELINES = 8


@dataclass(frozen=True)
class PipelineKind:
    """One supported pipeline: the op name, a readable label, the diffusers class name and the default model."""

    name: str
    label: str
    class_name: str
    default_model: str


KINDS: dict[str, PipelineKind] = {
    "ip2p": PipelineKind("ip2p", "InstructPix2Pix", "StableDiffusionInstructPix2PixPipeline",
                         "timbrooks/instruct-pix2pix"),
    "inpaint": PipelineKind("inpaint", "Stable Diffusion inpainting", "StableDiffusionInpaintPipeline",
                            "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    "pbe": PipelineKind("pbe", "Paint-by-Example", "PaintByExamplePipeline", "Fantasy-Studio/Paint-by-Example"),
}


@functools.cache
def _paint_by_example_class() -> type[DiffusionPipeline]:
    """Return Paint-by-Example with its masked-image encoding routed through ``reed.models.encode``.

    The pipeline has no argument for precomputed masked-image latents, so its encoder hook is replaced:
    the VAE runs in its own dtype (float32) and takes the posterior mode, and the latents are cast to
    the pipeline's dtype afterwards. Built on first use, because importing the pipeline imports
    transformers, which takes seconds.
    """

    class PaintByExampleWithReedVAE(diffusers.PaintByExamplePipeline):
        def _encode_vae_image(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            return models.encode(self.vae, image).to(image.dtype)

    return PaintByExampleWithReedVAE


def pipeline_class(kind: str) -> type[DiffusionPipeline]:
    if kind == "pbe":
        return _paint_by_example_class()
    return getattr(diffusers, KINDS[kind].class_name)


# Device and precision


def best_device() -> str:
    """Return the device pipelines run on: ``$REED_DIFFUSION_DEVICE`` if set, else CUDA, then MPS, then CPU."""
    requested = os.environ.get(DEVICE_VARIABLE, "").strip()
    if requested:
        try:
            torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"Invalid {DEVICE_VARIABLE}={requested!r}: use cuda, mps or cpu.") from error
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pipeline_dtype(device: str) -> torch.dtype:
    """Return float16 on CUDA, where it halves memory and time, and float32 elsewhere.

    The VAE is not affected: it always runs in float32 (see the module docstring).
    NOTE: the tests run on the CPU only, so the float16 CUDA path has not been run yet.
    """
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# Loading


def _download_hint(model: str) -> str:
    folder = model.split("/")[-1]
    return (f"Download it on a machine with network access (for example `hf download {model} --local-dir "
            f"{folder}`), copy that folder to this machine, and give its path as the model (model=PATH_TO/{folder} "
            f"in a chain step, --model PATH_TO/{folder} for table1).")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_cached(repo_id: str) -> bool:
    """Return whether the local Hugging Face cache has the pipeline's index, without a network request."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 (keeps the import off the start-up path)

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)


def _local_folder(model: str) -> Path | None:
    """Return the folder that ``model`` names, None for a hub id, or raise for a missing folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise models.ModelLoadError(f"{path} has no model_index.json, so it is not a diffusers pipeline "
                                        "folder. Pass the folder that `save_pretrained` wrote.")
        return path
    if path.exists():
        raise models.ModelLoadError(f"{path} is a file; pass the pipeline's folder (with model_index.json).")
    if HUB_ID.match(model):
        return None
    raise models.ModelLoadError(f"Pipeline folder not found: {model}. Pass an existing folder or a hub id "
                                "of the form owner/name.")


def unavailable_reason(kind: str, model: str | None = None) -> str | None:
    """Return why ``model`` (the kind's default when None) cannot be loaded here, or None when it can.

    Cheap and offline: a folder must have ``model_index.json``, and a hub id must be in the local cache
    unless ``HF_HUB_OFFLINE`` allows a download. A hub that is down is found only when loading.
    """
    spec = KINDS[kind]
    model = model or spec.default_model
    try:
        folder = _local_folder(model)
    except models.ModelLoadError as error:
        return str(error)
    if folder is not None or _is_cached(model):
        return None
    if _hub_offline():
        return (f"The {spec.label} model {model} is not in the local Hugging Face cache, and HF_HUB_OFFLINE "
                f"is set. {_download_hint(model)}")
    return None


def _load_scheduler(location: str, **kwargs: Any) -> SchedulerMixin:
    # Any scheduler class reads scheduler_config.json; the class named inside it is built afterwards.
    config = diffusers.DDIMScheduler.load_config(location, subfolder="scheduler", **kwargs)
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(f"Unknown scheduler class {config.get('_class_name')!r} in {location}/scheduler.")
    return scheduler_class.from_config(config)


def _load_paint_by_example(location: str, dtype: torch.dtype, local_files_only: bool) -> DiffusionPipeline:
    """Build Paint-by-Example from its components.

    diffusers 0.42 moved the pipeline to ``diffusers.pipelines.deprecated`` and can no longer resolve
    its image encoder from ``model_index.json``, so ``from_pretrained`` on the whole pipeline fails.
    """
    try:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder  # noqa: PLC0415
    except ImportError:  # diffusers releases before the move
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder  # noqa: PLC0415
    from transformers import CLIPImageProcessor  # noqa: PLC0415

    weights = {"use_safetensors": True, "local_files_only": local_files_only}
    return _paint_by_example_class()(
        vae=AutoencoderKL.from_pretrained(location, subfolder="vae", dtype=dtype, **weights),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(location, subfolder="image_encoder",
                                                                 dtype=dtype, **weights),
        unet=UNet2DConditionModel.from_pretrained(location, subfolder="unet", dtype=dtype, **weights),
        scheduler=_load_scheduler(location, local_files_only=local_files_only),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(location, subfolder="feature_extractor",
                                                             local_files_only=local_files_only),
        requires_safety_checker=False,
    )


def _from_pretrained(spec: PipelineKind, location: str, dtype: torch.dtype, local_files_only: bool) -> DiffusionPipeline:
    if spec.name == "pbe":
        return _load_paint_by_example(location, dtype, local_files_only)
    # The safety checker is left out: it runs only on decoded images, which the pipeline never makes here.
    return pipeline_class(spec.name).from_pretrained(location, dtype=dtype, use_safetensors=True,
                                               local_files_only=local_files_only, safety_checker=None,
                                               requires_safety_checker=False)


def _load_uncached(kind: str, model: str, device: str) -> DiffusionPipeline:
    spec = KINDS[kind]
    dtype = pipeline_dtype(device)
    folder = _local_folder(model)
    failure = f"Could not load the {spec.label} pipeline '{model}'"
    try:
        if folder is not None:
            pipeline = _from_pretrained(spec, str(folder), dtype, local_files_only=True)
        else:
            try:  # A pipeline already in the local cache loads without the network.
                pipeline = _from_pretrained(spec, model, dtype, local_files_only=True)
            except (OSError, ValueError):
                if _hub_offline():
                    raise models.ModelLoadError(f"{failure}: it is not in the local Hugging Face cache and "
                                                f"HF_HUB_OFFLINE is set. {_download_hint(model)}") from None
                try:
                    models.check_hub_reachable(model)
                except models.ModelLoadError as error:
                    reason = error.__cause__ or "the hub is unreachable"
                    raise models.ModelLoadError(f"{failure}: it is not in the local Hugging Face cache and the "
                                                f"hub cannot be reached ({reason}). {_download_hint(model)}") from error
                pipeline = _from_pretrained(spec, model, dtype, local_files_only=False)
    except models.ModelLoadError:
        raise
    except (OSError, ValueError, TypeError) as error:
        raise models.ModelLoadError(f"{failure}: {error} reed loads weights from safetensors files only; a "
                                    "pipeline saved with `save_pretrained(safe_serialization=True)` has them.") from error
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


_load_lock = threading.Lock()


@functools.lru_cache(maxsize=MAX_CACHED_PIPELINES)
def _load_cached(kind: str, model: str, device: str) -> DiffusionPipeline:
    return _load_uncached(kind, model, device)


def load_pipeline(kind: str, model: str, device: str | None = None) -> DiffusionPipeline:
    """Load a pipeline of ``kind`` (``ip2p``, ``inpaint`` or ``pbe``), or return it from the cache.

    Raises ``reed.models.ModelLoadError`` naming the model and saying how to make it available. The
    returned object is shared, so callers must not change it; ``pipeline_for_vae`` makes a per-arm view.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown pipeline kind '{kind}'. Valid kinds: {', '.join(KINDS)}.")
    if not isinstance(model, str) or not model.strip():
        raise models.ModelLoadError(f"Give the {KINDS[kind].label} model as a hub id or a local folder.")
    with _load_lock:
        return _load_cached(kind, model.strip(), device or best_device())


# Running with an arm's VAE


_device_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_arm_pipelines: collections.OrderedDict = collections.OrderedDict()
_arm_lock = threading.Lock()
# One pipeline call at a time in this process, because an arm pipeline's scheduler is replaced per call.
run_lock = threading.Lock()


def vae_on_device(vae: AutoencoderKL, device: torch.device | str) -> AutoencoderKL:
    """Return ``vae`` itself when it is already a float32 model on ``device``, else a float32 copy there.

    VAEs from ``reed.models.load_vae`` are shared by the whole process and must not be moved, so a copy
    is made once per (VAE, device) and kept while the VAE exists.
    """
    target = torch.device(device)
    current = vae.device
    same_device = current.type == target.type and (target.index is None or current.index == target.index)
    if same_device and vae.dtype == torch.float32:
        return vae
    copies = _device_copies.setdefault(vae, {})
    if str(target) not in copies:
        copies[str(target)] = copy.deepcopy(vae).to(device=target, dtype=torch.float32).eval().requires_grad_(False)
    return copies[str(target)]


def pipeline_for_vae(pipeline: DiffusionPipeline, vae: AutoencoderKL) -> DiffusionPipeline:
    """Return a pipeline that shares every module of ``pipeline`` but has ``vae`` as its VAE.

    Built with the pipeline's own constructor, so sizes derived from the VAE (``vae_scale_factor`` and
    the image processors) follow the arm's VAE. The scheduler is a fresh copy on every call, because a
    scheduler keeps state between the steps of one run.
    """
    key = (id(pipeline), id(vae))
    with _arm_lock:
        entry = _arm_pipelines.get(key)
        if entry is None or entry[0] is not pipeline or entry[1] is not vae:
            components = {**pipeline.components, "vae": vae}
            arm = type(pipeline)(**components, requires_safety_checker=False)
            arm.set_progress_bar_config(disable=True)
            entry = (pipeline, vae, arm)
            _arm_pipelines[key] = entry
            while len(_arm_pipelines) > MAX_ARM_PIPELINES:
                _arm_pipelines.popitem(last=False)
        _arm_pipelines.move_to_end(key)
    arm = entry[2]
    arm.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    return arm


# Pre-flight checks


def check_vaes(kind: str, model: str, pipeline: DiffusionPipeline, vaes: dict[str, AutoencoderKL]) -> list[str]:
    """Check that every arm's VAE fits the pipeline; return warnings, raise ``ValueError`` on a mismatch.

    The latent channels and downsampling factor must equal those of the pipeline's own VAE, because the
    UNet was trained on such latents. A different ``scaling_factor`` or ``shift_factor`` still runs
    (each VAE scales its own latents), so it is only a warning.
    """
    spec = KINDS[kind]
    if not vaes:
        raise ValueError(f"The {kind} operation needs a VAE in every arm, but none was given.")
    channels, factor = models.latent_shape(pipeline.vae)
    if channels != SUPPORTED_LATENT_CHANNELS:
        raise ValueError(f"The {spec.label} pipeline '{model}' has {channels}-channel latents; reed runs only "
                         f"pipelines with {SUPPORTED_LATENT_CHANNELS}-channel latents (Stable Diffusion 1.x and 2.x).")
    mismatched = [f"{name} has {shape[0]} channels at factor {shape[1]}"
                  for name, shape in ((name, models.latent_shape(vae)) for name, vae in vaes.items())
                  if shape != (channels, factor)]
    if mismatched:
        raise ValueError(f"The {spec.label} pipeline '{model}' works on latents with {channels} channels at "
                         f"downsampling factor {factor}, but {'; '.join(mismatched)}. Use VAEs of the pipeline's "
                         "family, such as stabilityai/sd-vae-ft-mse for Stable Diffusion 1.x.")

    own_scaling, own_shift = models.latent_factors(pipeline.vae)
    notes = []
    for name, vae in vaes.items():
        scaling, shift = models.latent_factors(vae)
        if (scaling, shift) != (own_scaling, own_shift):
            notes.append(f"{name} has scaling_factor {scaling:g} and shift_factor {shift:g}, but the VAE of the "
                         f"{spec.label} pipeline '{model}' has {own_scaling:g} and {own_shift:g}. Each VAE scales "
                         "its own latents, so the UNet sees latents of a different spread than it was trained on.")
    return notes
