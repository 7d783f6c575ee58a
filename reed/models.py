"""Load VAEs by reference, and the one image<->latent convention.

A reference is one of:
- a built-in name, such as ``reed-mini:reed`` (see ``BUILTIN_MODELS``);
- a local folder in the diffusers layout (``config.json`` beside ``diffusion_pytorch_model.safetensors``),
  or a pipeline folder with the VAE in its ``vae/`` subfolder;
- a Hugging Face Hub id such as ``stabilityai/sd-vae-ft-mse``, or ``owner/name/subfolder`` for a VAE
  inside a pipeline repository (``stable-diffusion-v1-5/stable-diffusion-v1-5/vae``).

The latent convention follows diffusers pipelines, so a VAE loaded here can be passed to a pipeline
as ``vae=``. Images are in [-1, 1]. After encoding, latents are shifted by ``shift_factor`` (when the
config has one, as SD3 and FLUX VAEs do) and multiplied by ``scaling_factor``. Before decoding, the
inverse is applied. ``encode`` and ``decode`` below are the only places that apply it.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL

ASSETS = Path(__file__).resolve().parent / "assets"

BUILTIN_MODELS = {
    "reed-mini:standard": ASSETS / "reed-mini" / "standard",
    "reed-mini:reed": ASSETS / "reed-mini" / "reed",
    "reed-mini:control": ASSETS / "reed-mini" / "control",
}
DEFAULT_ARMS = ("reed-mini:standard", "reed-mini:reed")

# Seconds to wait for the hub's host to accept a connection before calling it unreachable.
HUB_CONNECT_TIMEOUT = 5.0
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ModelLoadError(RuntimeError):
    """A VAE reference could not be resolved or loaded."""


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def check_hub_reachable(repo_id: str) -> None:
    """Raise ``ModelLoadError`` at once when the hub cannot be reached, instead of retrying for minutes.

    ``HF_HUB_OFFLINE=1`` counts as unreachable. Otherwise the hub's host must resolve and accept a TCP
    connection within ``HUB_CONNECT_TIMEOUT`` seconds.
    """
    endpoint = _hub_endpoint()
    hint = ("Download it on a machine with network access (for example with `hf download`) "
            "and pass the local folder instead, or use a built-in model: " + ", ".join(BUILTIN_MODELS))
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"Cannot load '{repo_id}': HF_HUB_OFFLINE is set, so the Hugging Face Hub "
                             f"is unreachable and the model is not in the local cache. {hint}")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT):
            pass
    except OSError as error:
        raise ModelLoadError(f"Cannot load '{repo_id}': the Hugging Face Hub ({endpoint}) is unreachable "
                             f"from this machine ({error}). {hint}") from error


def _split_hub_id(reference: str) -> tuple[str, str | None]:
    parts = reference.strip("/").split("/")
    if len(parts) < 2 or any(not part for part in parts):
        raise ModelLoadError(f"'{reference}' is not a built-in model, an existing folder or a hub id of the "
                             f"form owner/name. Built-in models: {', '.join(BUILTIN_MODELS)}.")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _vae_folder(folder: Path) -> Path:
    """Return the folder with the VAE's config.json: the folder itself or its ``vae/`` subfolder."""
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"No config.json in {folder} or {folder / 'vae'}: not a diffusers VAE folder.")


def _check_safetensors(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise ModelLoadError(f"{folder} contains only pickle checkpoints ({', '.join(pickles)}). reed loads "
                             "weights from safetensors files only, because a pickle can run arbitrary code. "
                             "Load it once on a trusted machine and re-save it with `save_pretrained`, "
                             "which writes safetensors, or use a safetensors release.")
    raise ModelLoadError(f"{folder} has a config.json but no weights ({WEIGHTS_NAME} is missing).")


def resolve(reference: str) -> tuple[str, str | None]:
    """Return (path or hub id, subfolder) for a reference, without loading anything."""
    reference = reference.strip()
    if reference in BUILTIN_MODELS:
        folder = BUILTIN_MODELS[reference]
        if not (folder / WEIGHTS_NAME).is_file():
            raise ModelLoadError(f"Built-in model '{reference}' has no weights at {folder}; reinstall reed.")
        return str(folder), None
    if reference.startswith("reed-mini"):
        raise ModelLoadError(f"Unknown built-in model '{reference}'. Built-in models: {', '.join(BUILTIN_MODELS)}.")
    path = Path(reference).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the folder that contains config.json and the weights.")
        folder = _vae_folder(path)
        _check_safetensors(folder)
        return str(folder), None
    if reference.startswith((".", "/", "~")) or os.sep in reference and Path(reference).parent.exists():
        raise ModelLoadError(f"Model folder not found: {reference}")
    return _split_hub_id(reference)


def _load_uncached(reference: str, device: str, dtype: torch.dtype, channels_last: bool = False) -> AutoencoderKL:
    location, subfolder = resolve(reference)
    is_local = Path(location).is_dir()
    kwargs = {"use_safetensors": True, "torch_dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        if is_local:
            vae = AutoencoderKL.from_pretrained(location, local_files_only=True, **kwargs)
        else:
            try:  # A model already in the local cache loads without the network.
                vae = AutoencoderKL.from_pretrained(location, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                check_hub_reachable(reference)
                vae = AutoencoderKL.from_pretrained(location, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError(f"Could not load an AutoencoderKL from '{reference}': {error}") from error
    if channels_last:
        # NHWC weights let oneDNN pick faster convolution kernels on CPUs (measured in benchmarks/).
        vae = vae.to(memory_format=torch.channels_last)
    return vae.to(device).eval().requires_grad_(False)


_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load_cached(reference: str, device: str, dtype: torch.dtype, channels_last: bool) -> AutoencoderKL:
    return _load_uncached(reference, device, dtype, channels_last)


def load_vae(reference: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
             cached: bool = True, channels_last: bool = True) -> AutoencoderKL:
    """Load a VAE by built-in name, folder or hub id, in eval mode with gradients off.

    With ``cached=True`` (for inference) the same object is shared by every caller in the process, so
    it must not be modified. Training passes ``cached=False`` to get its own copy. ``channels_last``
    stores weights in NHWC order, which is faster on CPUs and gives the same images up to float
    rounding. Raises ``ModelLoadError`` with a message for the user.
    """
    if not isinstance(reference, str) or not reference.strip():
        raise ModelLoadError("A model reference must be a non-empty string.")
    if not cached:
        return _load_uncached(reference.strip(), device, dtype, channels_last)
    with _cache_lock:
        return _load_cached(reference.strip(), device, dtype, channels_last)


def latent_factors(vae: AutoencoderKL) -> tuple[float, float]:
    """Return (scaling_factor, shift_factor) from the VAE's config; a missing shift is 0."""
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scaling, float(shift) if shift is not None else 0.0


def downsampling_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae: AutoencoderKL) -> tuple[int, int]:
    """Return (latent channels, downsampling factor), which decide whether two VAEs are interchangeable."""
    return int(vae.config.latent_channels), downsampling_factor(vae)


def encode(vae: AutoencoderKL, images: torch.Tensor, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode images in [-1, 1] to scaled latents: ``(z - shift_factor) * scaling_factor``.

    ``sample=False`` takes the posterior mean, so a round trip is deterministic; ``sample=True`` draws
    from the posterior with ``generator``, as image-to-image pipelines do.
    """
    scaling, shift = latent_factors(vae)
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    latents = posterior.sample(generator) if sample else posterior.mode()
    return (latents - shift) * scaling


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents back to images in [-1, 1] (not clamped): the inverse of ``encode``."""
    scaling, shift = latent_factors(vae)
    return vae.decode(latents.to(vae.device, vae.dtype) / scaling + shift).sample


def roundtrip(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode and decode once: the pass every latent-diffusion edit makes."""
    return decode(vae, encode(vae, images))
