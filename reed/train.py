"""The training loop: new VAEs, and REED fine-tuning of an existing VAE's decoder.

Run it with ``python -m reed train CONFIG.yaml`` (one process) or
``accelerate launch -m reed train CONFIG.yaml`` (several). A run writes into ``output_dir``:
``checkpoints/step-NNNNNNNN/`` (resumable state, safetensors and JSON only), ``log.jsonl`` (one line per
log interval and evaluation), ``config.yaml``, and at the end ``model/``, a diffusers folder that
``reed.models.load_vae`` loads.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from reed import metrics
from reed.config import TrainConfig
from reed.data import RandomCrops, held_out_paths, training_paths
from reed.images import load_image, resize_to_working_size, to_tensor
from reed.losses import ReedLoss, quantize_8bit
from reed.models import load_vae


class TrainingError(RuntimeError):
    """Training cannot go on, for example because a loss became NaN."""


def build_vae(config: TrainConfig) -> AutoencoderKL:
    """Create the model to train: a copy of ``config.base``, or a new one from ``config.model``."""
    if config.base is not None:
        vae = load_vae(config.base, cached=False, channels_last=False)
    else:
        torch.manual_seed(config.seed)
        vae = AutoencoderKL(**config.model.diffusers_kwargs(), sample_size=config.crop_size)
    vae.train()
    vae.requires_grad_(True)
    if not config.train_encoder:
        # Decoder-only REED: a frozen encoder keeps the latent space that diffusion models were trained on.
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae


def cycle_counts(config: TrainConfig, step: int, rng: np.random.Generator) -> tuple[int, int]:
    """Draw (cycles with gradients, warm-up cycles without) for one batch."""
    loss = config.loss
    if loss.cycle_schedule == "fixed":
        cycles = loss.cycles
    else:
        ceiling = loss.cycles
        if loss.cycle_schedule == "grow":
            ceiling = 1 + int((loss.cycles - 1) * min(1.0, step / max(1, config.steps - 1)))
        cycles = int(rng.integers(1, ceiling + 1))
    warmup = 0
    if loss.warmup_cycles and rng.random() < loss.warmup_probability:
        warmup = int(rng.integers(1, loss.warmup_cycles + 1))
    return cycles, warmup


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_lr_ratio`` of it."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


# -- checkpoints ---------------------------------------------------------------------------------------

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_checkpoint(folder: Path, step: int, vae: AutoencoderKL, optimizer: torch.optim.Optimizer,
                    crops: RandomCrops, cycle_rng: np.random.Generator, generator: torch.Generator,
                    config: TrainConfig) -> Path:
    """Write a checkpoint atomically: into a temporary folder, renamed into place when complete.

    A run killed mid-write leaves at most a stray ``*.tmp`` folder; ``latest`` still names the previous
    complete checkpoint.
    """
    final = folder / f"step-{step:08d}"
    partial = folder / f"step-{step:08d}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, partial / "model.safetensors")
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    save_file(tensors, partial / "optimizer.safetensors")
    state = {
        "step": step,
        "optimizer": groups,
        "crops": crops.state_dict(),
        "cycle_rng": cycle_rng.bit_generator.state,
        "python_rng": _python_rng_state(),
        "config": config.to_dict(),
    }
    (partial / "state.json").write_text(json.dumps(state), encoding="utf-8")
    _fsync_folder(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    _write_atomic(folder / "latest", final.name)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").is_file() else None


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


# -- evaluation ----------------------------------------------------------------------------------------

def load_eval_images(config: TrainConfig) -> torch.Tensor:
    pixels = [resize_to_working_size(load_image(path).pixels, config.eval_size) for path in held_out_paths().values()]
    side = config.eval_size
    crops = []
    for image in pixels:  # centre crops, so every held-out photo gives a square of one size
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        crops.append(image[top:top + side, left:left + side])
    return to_tensor(crops)


@torch.inference_mode()
def evaluate_ladder(vae: AutoencoderKL, images: torch.Tensor, cycles: int) -> dict[str, float]:
    """Run ``cycles`` round trips and report PSNR against the source at step 1 and against x1 at the end."""
    was_training = vae.training
    vae.eval()
    current, first = images, None
    for _ in range(cycles):
        current = quantize_8bit(vae.decode(vae.encode(current).latent_dist.mode()).sample)
        if first is None:
            first = current
    vae.train(was_training)
    source, first, last = metrics.to_unit(images), metrics.to_unit(first), metrics.to_unit(current)
    return {
        "psnr_src_step1": metrics.psnr(first, source),
        f"psnr_x1_step{cycles}": metrics.psnr(last, first),
        f"psnr_src_step{cycles}": metrics.psnr(last, source),
    }


@torch.no_grad()
def calibrate_latents(vae: AutoencoderKL, crops: RandomCrops, batches: int = 8) -> tuple[float, float]:
    """Return (scaling_factor, shift_factor) that give latents zero mean and unit variance.

    This is how Stable Diffusion 3 and FLUX chose their factors; a diffusion model trained on our
    latents would then see values of unit scale.
    """
    vae.eval()
    latents = torch.cat([vae.encode(to_tensor(crops.batch(8))).latent_dist.mode() for _ in range(batches)])
    vae.train()
    return 1.0 / latents.std().item(), latents.mean().item()


# -- the loop ------------------------------------------------------------------------------------------

class Objective(torch.nn.Module):
    """The VAE and its loss as one module, so that DistributedDataParallel sees the whole computation.

    The loss calls ``vae.encode`` and ``vae.decode`` directly; going through this ``forward`` is what
    lets a multi-process wrapper synchronise the gradients.
    """

    def __init__(self, vae: AutoencoderKL, loss_fn: ReedLoss):
        super().__init__()
        self.vae = vae
        self.loss_fn = loss_fn

    def forward(self, images: torch.Tensor, num_cycles: int, num_warmup: int,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.vae, images, num_cycles, num_warmup, generator)


def train(config: TrainConfig, resume: bool = True, max_steps: int | None = None) -> Path:
    """Train as ``config`` says, resuming from the latest checkpoint in ``output_dir`` when there is one.

    ``max_steps`` stops early after that many steps in total (for tests and time-boxed runs); the
    schedule still follows ``config.steps``. Returns the final model folder, or the latest checkpoint
    when stopped early.
    """
    from accelerate import Accelerator  # noqa: PLC0415 (imported here so the library loads without it)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

    # Each process draws its own crops; the model starts identical everywhere.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    crops = RandomCrops(training_paths(config.data), config.crop_size, seed=config.seed + accelerator.process_index)
    cycle_rng = np.random.default_rng(config.seed + 1_000_003)
    generator = torch.Generator().manual_seed(config.seed + 2_000_003)
    lpips_model = metrics.load_lpips() if config.loss.lpips > 0 else None
    loss_fn = ReedLoss(config.loss, lpips_model)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)

    start = 0
    found = latest_checkpoint(checkpoints) if resume else None
    if found is not None:
        state = json.loads((found / "state.json").read_text(encoding="utf-8"))
        vae.load_state_dict(load_file(found / "model.safetensors"))
        tensors = load_file(found / "optimizer.safetensors")
        _restore_optimizer(optimizer, tensors, state["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        generator.set_state(tensors["rng.generator"])
        crops.load_state_dict(state["crops"])
        cycle_rng.bit_generator.state = state["cycle_rng"]
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        start = state["step"]

    objective, optimizer = accelerator.prepare(Objective(vae, loss_fn), optimizer)
    model = accelerator.unwrap_model(objective).vae
    eval_images = load_eval_images(config) if accelerator.is_main_process else None
    stop = min(config.steps, max_steps) if max_steps is not None else config.steps
    log_file = output / "log.jsonl"

    if accelerator.is_main_process:
        total = sum(p.numel() for p in model.parameters())
        print(f"reed train: {total / 1e6:.2f}M parameters, {sum(p.numel() for p in trainable) / 1e6:.2f}M trained "
              f"({'encoder and decoder' if config.train_encoder else 'decoder only'}), "
              f"base={config.base or 'new'}, steps {start}->{stop} of {config.steps}, batch {config.batch_size}"
              f"x{accelerator.num_processes} of {config.crop_size}px, cycles<={config.loss.cycles} "
              f"({config.loss.cycle_schedule}), warm-up<={config.loss.warmup_cycles}, "
              f"device {accelerator.device}, {torch.get_num_threads()} threads, output {output}"
              + (f", resumed from {found.name}" if found else ""), flush=True)

    progress = tqdm(range(start, stop), initial=start, total=stop, disable=not accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=2.0)
    window_start, window_images = time.perf_counter(), 0
    for step in progress:
        # 1. learning rate and batch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        images = to_tensor(crops.batch(config.batch_size)).to(accelerator.device)
        num_cycles, num_warmup = cycle_counts(config, step, cycle_rng)

        # 2. forward and backward
        loss, logs = objective(images, num_cycles, num_warmup, generator)
        if not torch.isfinite(loss):
            bad = [name for name, value in logs.items() if not math.isfinite(value)]
            raise TrainingError(f"Loss became non-finite at step {step + 1} (terms: {', '.join(bad)}). The last "
                                f"good checkpoint is {latest_checkpoint(checkpoints)}; lower learning_rate "
                                "and resume.")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)

        # 3. clip and step
        grad_norm = accelerator.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip else None
        optimizer.step()
        window_images += config.batch_size * accelerator.num_processes
        done = step + 1

        # 4. log, evaluate, checkpoint
        if accelerator.is_main_process and (done % config.log_every == 0 or done == stop):
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "lr": optimizer.param_groups[0]["lr"],
                      "images_per_second": window_images / max(elapsed, 1e-9),
                      **{f"train/{name}": value for name, value in logs.items()}}
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", l1=f"{logs['l1']:.4f}", l2=f"{logs['l2']:.5f}",
                                 K=num_cycles, ips=f"{record['images_per_second']:.1f}")
            _append_log(log_file, record)
            window_start, window_images = time.perf_counter(), 0
        if accelerator.is_main_process and (done % config.eval_every == 0 or done == config.steps):
            ladder = evaluate_ladder(model, eval_images, config.eval_cycles)
            _append_log(log_file, {"step": done, **{f"eval/{k}": v for k, v in ladder.items()}})
            progress.write(f"step {done}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in ladder.items()))
        if done % config.checkpoint_every == 0 or done == stop:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoints, done, model, optimizer, crops, cycle_rng, generator, config)
    progress.close()

    accelerator.wait_for_everyone()
    if stop < config.steps:
        return latest_checkpoint(checkpoints)
    final = output / "model"
    if accelerator.is_main_process:
        if config.base is None:
            scaling, shift = calibrate_latents(model, crops)
            model.register_to_config(scaling_factor=scaling, shift_factor=shift)
        model.eval()
        model.save_pretrained(final, safe_serialization=True)
        print(f"reed train: saved {final}", flush=True)
    return final


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
