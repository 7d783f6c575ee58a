"""The README.md model card written into a trained model's folder, and the optional upload to the Hub."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from reed.config import TrainConfig

LOSS_TERMS = ("l1", "l2", "lpips", "kl", "latent", "consistency", "contraction", "encoder_anchor", "adversarial")


class HubPushError(RuntimeError):
    """The trained model could not be uploaded to the Hugging Face Hub."""


def _data_description(config: TrainConfig) -> str:
    if config.data == "bundled":
        return "the training photos bundled with scikit-image and scikit-learn (`reed.data.TRAIN_PHOTOS`)"
    if config.data.startswith("hf:"):
        return (f"the Hugging Face dataset `{config.data[3:]}` (split `{config.dataset_split}`, "
                f"column `{config.dataset_image_column}`), streamed")
    return f"the images under `{config.data}`"


def _evaluation_table(evaluation: dict[str, float] | None, config: TrainConfig) -> str:
    if not evaluation:
        return "No evaluation was run before the model was saved."
    held_out = "the bundled held-out photos" if config.eval_data == "bundled" else f"the images under `{config.eval_data}`"
    lines = [f"Measured on {held_out}, centre-cropped to {config.eval_size}x{config.eval_size}, after "
             f"{evaluation.get('step', '?')} training steps. `src` compares with the source image, and `x1` with "
             "the model's own first round trip. `stepN` is the number of encode/decode round trips, each "
             "saved as 8-bit.", "", "| metric | value |", "|---|---|"]
    for key, value in evaluation.items():
        if key == "step":
            continue
        unit = " dB" if key.startswith("psnr") else ""
        lines.append(f"| {key} | {value:.4f}{unit} |")
    return "\n".join(lines)


def model_card(config: TrainConfig, steps_done: int, num_processes: int, evaluation: dict[str, float] | None,
               weights: str) -> str:
    """Return the model card's Markdown: what was trained, from what, on what, with which loss, and how well."""
    base = config.base or "none (trained from scratch)"
    trained = "encoder and decoder" if config.train_encoder else "decoder only (encoder and `quant_conv` frozen)"
    loss = config.loss
    weight_rows = "\n".join(f"| {name} | {getattr(loss, name):g} |" for name in LOSS_TERMS)
    front_matter = ["---", "library_name: diffusers", "tags:", "- vae", "- autoencoderkl", "- reed"]
    if config.base and not Path(config.base).exists():
        front_matter.append(f"base_model: {config.base}")
    front_matter.append("---")
    edits = (f"with probability {loss.edit_probability:g} per cycle boundary, one of: {', '.join(loss.edits)}"
             if loss.edit_probability > 0 else "none")
    adversarial = (f"PatchGAN discriminator ({config.discriminator.layers} layers, {config.discriminator.channels} "
                   f"channels, hinge loss) from step {loss.adversarial_start_step}"
                   + (", adaptive weight" if loss.adversarial_adaptive else "")
                   if loss.adversarial > 0 else "none")
    return "\n".join(front_matter) + f"""

# REED fine-tuned AutoencoderKL

An `AutoencoderKL` trained with the REED loss (Almog, Shamir and Fried, *REED-VAE: RE-Encode Decode
Training for Iterative Image Editing with Diffusion Models*, Eurographics 2025, arXiv:2504.18989): the
reconstruction error is summed over several encode/decode cycles, so images survive repeated round
trips through the VAE, as in a chain of latent-diffusion edits. Written by `python -m reed train`.

```python
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("<this folder or repository>")
```

## Training

| setting | value |
|---|---|
| base model | {base} |
| trained parts | {trained} |
| weights saved | {weights} |
| data | {_data_description(config)} |
| crop size | {config.crop_size}x{config.crop_size} |
| crop augmentation | {", ".join(config.augment) if config.augment else "none"} |
| batch | {config.batch_size} per process x {num_processes} process(es) |
| steps | {steps_done} of {config.steps} |
| learning rate | {config.learning_rate:g}, {config.warmup_steps} warm-up steps, cosine decay to {config.min_lr_ratio:g}x |
| cycles K | up to {loss.cycles} ({loss.cycle_schedule}), plus up to {loss.warmup_cycles} cycles without gradients |
| 8-bit rounding between cycles | {loss.quantize} |
| edits between cycles | {edits} |
| adversarial term | {adversarial} |
| mixed precision | {config.mixed_precision} |
| seed | {config.seed} |

Loss weights:

| term | weight |
|---|---|
{weight_rows}

The full configuration is `config.yaml` in the run's output folder.

## Evaluation

{_evaluation_table(evaluation, config)}
"""


def write_model_card(folder: Path, config: TrainConfig, steps_done: int, num_processes: int,
                     evaluation: dict[str, Any] | None, weights: str) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(config, steps_done, num_processes, evaluation, weights), encoding="utf-8")
    return path


def check_hub_writable(repo_id: str, timeout: float = 5.0) -> None:
    """Raise ``HubPushError`` at once when the Hub cannot be reached, so a run fails before training.

    ``HF_HUB_OFFLINE=1`` counts as unreachable. Otherwise the endpoint's host must accept a TCP
    connection within ``timeout`` seconds. Credentials are checked only by the upload itself.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(f"push_to_hub: {repo_id} cannot be uploaded because HF_HUB_OFFLINE is set. Unset it, "
                           "or set push_to_hub: null and upload the model folder later with `hf upload`.")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            pass
    except OSError as error:
        raise HubPushError(f"push_to_hub: the Hugging Face Hub ({endpoint}) is unreachable from this machine "
                           f"({error}), so {repo_id} cannot be uploaded. Set push_to_hub: null and upload the "
                           "model folder later with `hf upload`.") from error


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the model repository ``repo_id``, creating it (private) if needed; return its URL.

    Raises ``HubPushError`` when the Hub is unreachable (checked first, within seconds) or the upload fails.
    """
    from huggingface_hub import HfApi  # noqa: PLC0415 (only needed for uploads)
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415

    check_hub_writable(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="Upload REED fine-tuned VAE")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubPushError(f"push_to_hub: uploading {folder} to {repo_id} failed ({error}). Check that you are "
                           "logged in (`hf auth login`) with write access, then upload it with "
                           f"`hf upload {repo_id} {folder}`.") from error
    return str(getattr(commit, "commit_url", f"https://huggingface.co/{repo_id}"))
