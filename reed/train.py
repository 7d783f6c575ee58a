"""The training loop: new VAEs, and REED fine-tuning of an existing VAE's decoder.

Run it with ``python -m reed train CONFIG.yaml`` (one process), or through accelerate for several
processes (docs/training.md has the commands for one GPU, many GPUs, many nodes and a CPU-only machine).
A run writes into ``output_dir``: ``checkpoints/step-NNNNNNNN/`` (resumable state, safetensors and JSON
only), ``log.jsonl`` (one line per log interval and evaluation), ``config.yaml``, ``eval/`` (ladder
grids), and at the end ``model/``, a diffusers folder with a model card that ``reed.models.load_vae``
loads. Only the main process writes; every process's random state goes into each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from reed import metrics
from reed.config import FINAL_WEIGHTS, TrainConfig
from reed.data import RandomCrops, make_crops
from reed.discriminator import NLayerDiscriminator, discriminator_loss
from reed.ema import NamedEMA, copy_named_tensors
from reed.evaluation import calibrate_latents, evaluate_ladder, ladder_grid, load_eval_images, run_ladder  # noqa: F401
from reed.hub_data import StreamingCrops, is_hub_dataset
from reed.images import save_png, to_tensor
from reed.losses import FrozenEncoder, ReedLoss
from reed.model_card import check_hub_writable, push_to_hub, write_model_card
from reed.models import load_vae
from reed.precision import upcast_sensitive_layers
from reed.tracking import flat_hparams, log_images, memory_stats, progress_line, resolve_trackers

# Offsets that give each process its own posterior-noise stream; process 0 keeps the single-process seed.
GENERATOR_SEED_OFFSET = 2_000_003
GENERATOR_PROCESS_STRIDE = 7_919


class TrainingError(RuntimeError):
    """Training cannot go on, for example because a loss became NaN."""


def build_vae(config: TrainConfig) -> AutoencoderKL:
    """Create the model to train: a copy of ``config.base``, or a new one from ``config.model``.

    ``random_init`` builds ``config.model`` with random weights even when a base is named (tests and
    cost measurements of a full-size architecture without the hub).
    """
    if config.base is not None and not config.random_init:
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
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
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

@dataclass
class TrainingState:
    """Everything a checkpoint saves and restores, apart from the config.

    ``crops``, ``generator`` and the global torch and Python RNGs differ per process; the rest is the
    same on every process.
    """

    vae: AutoencoderKL
    optimizer: torch.optim.Optimizer
    crops: RandomCrops | StreamingCrops
    cycle_rng: np.random.Generator
    generator: torch.Generator
    ema: NamedEMA | None = None
    discriminator: torch.nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None


def process_state(state: TrainingState) -> dict:
    """Return this process's own random state, to be gathered onto the main process for a checkpoint."""
    return {
        "crops": state.crops.state_dict(),
        "python_rng": _python_rng_state(),
        "torch_rng": torch.get_rng_state(),
        "generator": state.generator.get_state(),
    }


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


def save_checkpoint(folder: Path, step: int, state: TrainingState, config: TrainConfig,
                    process_states: list[dict]) -> Path:
    """Write a checkpoint atomically: into a temporary folder, renamed into place when complete.

    ``process_states`` contains ``process_state()`` of every process, in process order. A run killed
    mid-write leaves at most a stray ``*.tmp`` folder; ``latest`` still names the previous complete
    checkpoint.
    """
    final = folder / f"step-{step:08d}"
    partial = folder / f"step-{step:08d}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.vae.state_dict().items()}, partial / "model.safetensors")
    tensors, groups = _optimizer_tensors(state.optimizer)
    tensors["rng.torch"] = process_states[0]["torch_rng"]
    tensors["rng.generator"] = process_states[0]["generator"]
    save_file(tensors, partial / "optimizer.safetensors")
    per_process = {}
    for index, saved in enumerate(process_states):
        per_process[f"torch.{index}"] = saved["torch_rng"]
        per_process[f"generator.{index}"] = saved["generator"]
    save_file(per_process, partial / "processes.safetensors")
    meta = {
        "step": step,
        "optimizer": groups,
        "crops": process_states[0]["crops"],
        "cycle_rng": state.cycle_rng.bit_generator.state,
        "python_rng": process_states[0]["python_rng"],
        "num_processes": len(process_states),
        "processes": [{"crops": saved["crops"], "python_rng": saved["python_rng"]} for saved in process_states],
        "config": config.to_dict(),
    }
    if state.ema is not None:
        save_file(state.ema.tensors(), partial / "ema.safetensors")
        meta["ema"] = state.ema.counters()
    if state.discriminator is not None:
        disc_tensors, disc_groups = _optimizer_tensors(state.disc_optimizer)
        disc_tensors.update({f"model.{k}": v.contiguous() for k, v in state.discriminator.state_dict().items()})
        save_file(disc_tensors, partial / "discriminator.safetensors")
        meta["discriminator_optimizer"] = disc_groups
    (partial / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    _fsync_folder(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    _write_atomic(folder / "latest", final.name)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "state.json").is_file() and (folder / "model.safetensors").is_file()


def load_checkpoint_vae(folder: str | Path, weights: str = "trained") -> AutoencoderKL:
    """Build the model saved in a training checkpoint folder (``step-*``), for evaluation or export.

    ``weights`` is ``trained`` (the weights at that step) or ``ema`` (their moving average). The
    architecture and latent factors come from the run's base model, or from ``model`` for a run from
    scratch. A run from scratch calibrates its latent factors only when it finishes, so here they are
    calibrated again on a fresh stream of the run's crops: close to, not identical with, the factors of
    the run's own ``model`` folder. A run from scratch on an ``hf:`` dataset keeps the default factors.
    """
    folder = Path(folder)
    if weights not in FINAL_WEIGHTS:
        raise ValueError(f"weights must be one of {FINAL_WEIGHTS}, got '{weights}'.")
    if not is_checkpoint(folder):
        raise FileNotFoundError(f"{folder} is not a training checkpoint (state.json and model.safetensors).")
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    config = TrainConfig(**meta["config"])
    vae = build_vae(config)
    vae.load_state_dict(load_file(folder / "model.safetensors"))
    if weights == "ema":
        if not (folder / "ema.safetensors").is_file():
            raise FileNotFoundError(f"EMA weights not found in {folder}: the run had no ema_decay. "
                                    "Export the trained weights instead.")
        copy_named_tensors(vae, load_file(folder / "ema.safetensors"))
    if config.base is None and not is_hub_dataset(config.data):
        with torch.no_grad():
            scaling, shift = calibrate_latents(vae, make_crops(config))
        vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    vae.requires_grad_(False)
    return vae.eval()


def restore_checkpoint(found: Path, state: TrainingState, process_index: int, num_processes: int) -> tuple[int, str | None]:
    """Load a checkpoint into ``state`` for this process; return (step, a warning or None).

    Each process takes its own saved random state. A checkpoint written by fewer processes than now
    run leaves the extra processes on their fresh seeds. Whenever the process counts differ, the
    returned warning states that the run is no longer identical to an uninterrupted one.
    """
    meta = json.loads((found / "state.json").read_text(encoding="utf-8"))
    state.vae.load_state_dict(load_file(found / "model.safetensors"))
    tensors = load_file(found / "optimizer.safetensors")
    _restore_optimizer(state.optimizer, tensors, meta["optimizer"])
    state.cycle_rng.bit_generator.state = meta["cycle_rng"]

    warning = None
    saved = meta.get("processes")
    if saved is None:  # written before per-process states were saved: one state for every process
        own = {"crops": meta["crops"], "python_rng": meta["python_rng"]}
        torch_rng, generator_state = tensors["rng.torch"], tensors["rng.generator"]
    elif process_index < len(saved):
        own = saved[process_index]
        per_process = load_file(found / "processes.safetensors")
        torch_rng, generator_state = per_process[f"torch.{process_index}"], per_process[f"generator.{process_index}"]
    else:
        own = None
    if saved is not None and len(saved) != num_processes:
        warning = (f"{found.name} was written by {len(saved)} process(es) and is resumed by {num_processes}; "
                   "each process keeps its own data stream where one was saved, so the run is no longer "
                   "identical to an uninterrupted one.")
    if own is not None:
        torch.set_rng_state(torch_rng)
        state.generator.set_state(generator_state)
        state.crops.load_state_dict(own["crops"])
        version, internal, gauss = own["python_rng"]
        random.setstate((version, tuple(internal), gauss))

    if state.ema is not None:
        if (found / "ema.safetensors").is_file():
            state.ema.load(load_file(found / "ema.safetensors"), meta["ema"])
        else:  # EMA switched on for a run that had none: start the average from the restored weights
            state.ema = NamedEMA(state.vae, state.ema.ema.decay)
    if state.discriminator is not None and (found / "discriminator.safetensors").is_file():
        disc_tensors = load_file(found / "discriminator.safetensors")
        weights = {k[len("model."):]: v for k, v in disc_tensors.items() if k.startswith("model.")}
        state.discriminator.load_state_dict(weights)
        _restore_optimizer(state.disc_optimizer, disc_tensors, meta["discriminator_optimizer"])
    return int(meta["step"]), warning


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


# -- the loop ------------------------------------------------------------------------------------------

class Objective(torch.nn.Module):
    """The VAE and its loss as one module, so that DistributedDataParallel sees the whole computation.

    The loss calls ``vae.encode`` and ``vae.decode`` directly; going through this ``forward`` is what
    lets a multi-process wrapper synchronise the gradients. The discriminator is an argument, not a
    submodule: it has its own optimizer and its own synchronised step.
    """

    def __init__(self, vae: AutoencoderKL, loss_fn: ReedLoss):
        super().__init__()
        self.vae = vae
        self.loss_fn = loss_fn

    def forward(self, images: torch.Tensor, num_cycles: int, num_warmup: int, generator: torch.Generator,
                discriminator: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_fn(self.vae, images, num_cycles, num_warmup, generator, discriminator=discriminator)


def _make_accelerator(config: TrainConfig, output: Path, trackers: list[str]):
    from accelerate import Accelerator  # noqa: PLC0415 (imported here so the library loads without it)

    # NOTE: fp16 (one GradScaler shared by the VAE's and the discriminator's optimizers) and CUDA runs are
    # untested. The tests cover bf16 and several processes on the CPU.
    use_cpu = not torch.cuda.is_available()
    if use_cpu and config.mixed_precision == "fp16":
        raise ValueError("mixed_precision: fp16 needs a CUDA GPU (on a CPU accelerate runs it in float32); "
                         "use bf16 or no.")
    return Accelerator(cpu=use_cpu, mixed_precision=config.mixed_precision, log_with=trackers or None,
                       project_dir=str(output))


def _build_state(config: TrainConfig, process_index: int, num_processes: int) -> tuple[TrainingState, ReedLoss]:
    """Build the model, its frozen anchor, the data stream, the random streams, the optimizers and the EMA."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    if config.mixed_precision != "no":
        upcast_sensitive_layers(vae)
    # The anchor is copied before any checkpoint is loaded, so it is always the base model's encoder.
    anchor = FrozenEncoder.from_vae(vae) if config.loss.encoder_anchor > 0 else None
    crops = make_crops(config, process_index, num_processes)
    cycle_rng = np.random.default_rng(config.seed + 1_000_003)
    generator = torch.Generator().manual_seed(config.seed + GENERATOR_SEED_OFFSET
                                              + GENERATOR_PROCESS_STRIDE * process_index)
    lpips_model = metrics.load_lpips() if config.loss.lpips > 0 else None
    loss_fn = ReedLoss(config.loss, lpips_model, anchor)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    state = TrainingState(vae, optimizer, crops, cycle_rng, generator)
    if config.ema_decay is not None:
        state.ema = NamedEMA(vae, config.ema_decay)
    if config.loss.adversarial > 0:
        state.discriminator = NLayerDiscriminator(config.discriminator.layers, config.discriminator.channels)
        # beta1 = 0.5, a common choice for GAN discriminators: less momentum against a moving target.
        state.disc_optimizer = torch.optim.AdamW(state.discriminator.parameters(),
                                                 lr=config.discriminator.learning_rate or config.learning_rate,
                                                 betas=(0.5, 0.9), weight_decay=0.0)
    return state, loss_fn


def _summary(config: TrainConfig, accelerator, state: TrainingState, start: int, stop: int, found: Path | None,
             trackers: list[str]) -> str:
    total = sum(p.numel() for p in state.vae.parameters())
    trained = sum(p.numel() for p in state.vae.parameters() if p.requires_grad)
    loss = config.loss
    extras = [f"mixed precision {config.mixed_precision}"]
    if config.gradient_checkpointing:
        extras.append("gradient checkpointing")
    if state.ema is not None:
        extras.append(f"EMA {config.ema_decay:g}")
    if loss.adversarial > 0:
        extras.append(f"adversarial {loss.adversarial:g} from step {loss.adversarial_start_step}")
    if loss.encoder_anchor > 0:
        extras.append(f"encoder anchor {loss.encoder_anchor:g}")
    if loss.edit_probability > 0:
        extras.append(f"edits p={loss.edit_probability:g} ({', '.join(loss.edits)})")
    extras.append(f"trackers: {', '.join(trackers) or 'none'}")
    return (f"reed train: {total / 1e6:.2f}M parameters, {trained / 1e6:.2f}M trained "
            f"({'encoder and decoder' if config.train_encoder else 'decoder only'}), "
            f"base={config.base or 'new'}{' (random weights)' if config.random_init else ''}, "
            f"steps {start}->{stop} of {config.steps}, batch {config.batch_size}"
            f"x{accelerator.num_processes} of {config.crop_size}px, cycles<={loss.cycles} "
            f"({loss.cycle_schedule}), warm-up<={loss.warmup_cycles}, "
            f"{accelerator.num_processes} process(es)"
            f"{f' ({accelerator.distributed_type.value})' if accelerator.num_processes > 1 else ''}, "
            f"device {accelerator.device}, {torch.get_num_threads()} threads, {', '.join(extras)}, "
            f"output {Path(config.output_dir)}" + (f", resumed from {found.name}" if found else ""))


def _mean_over_processes(accelerator, logs: dict[str, float]) -> dict[str, float]:
    """Average the logged values over processes (a collective call: every process must make it)."""
    if accelerator.num_processes == 1:
        return logs
    names = list(logs)  # every process builds its logs in the same order, which the progress line keeps
    values = torch.tensor([logs[name] for name in names], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(names, values.tolist()))


def _write_line(progress, text: str) -> None:
    """Print a log line above the progress bar.

    The bar draws on stderr and the line goes to stdout. When both are redirected to one file, stdout's
    buffer would land in the middle of a bar line, so the line is flushed while the bar is cleared.
    """
    with progress.external_write_mode(file=sys.stdout):
        print(text, flush=True)


def _check_finite(accelerator, loss: torch.Tensor, logs: dict[str, float], step: int, checkpoints: Path) -> None:
    """Raise ``TrainingError`` on every process when any process's loss is not finite."""
    bad_here = not torch.isfinite(loss.detach()).item()
    bad_anywhere = bad_here
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(bad_here), device=accelerator.device)
        bad_anywhere = accelerator.reduce(flag, reduction="sum").item() > 0
    if not bad_anywhere:
        return
    bad = [name for name, value in logs.items() if not math.isfinite(value)] if bad_here else ["on another process"]
    raise TrainingError(f"Loss became non-finite at step {step + 1} (terms: {', '.join(bad)}). The last "
                        f"good checkpoint is {latest_checkpoint(checkpoints)}; lower learning_rate and resume.")


def train(config: TrainConfig, resume: bool = True, max_steps: int | None = None) -> Path:
    """Train as ``config`` says, resuming from the latest checkpoint in ``output_dir`` when there is one.

    ``max_steps`` stops early after that many steps in total (for tests and time-boxed runs); the
    schedule still follows ``config.steps``. Returns the final model folder, or the latest checkpoint
    when stopped early.
    """
    from accelerate.utils import gather_object  # noqa: PLC0415

    output = Path(config.output_dir)
    trackers = resolve_trackers(config.log_with)
    accelerator = _make_accelerator(config, output, trackers)
    if config.push_to_hub and accelerator.is_main_process:
        check_hub_writable(config.push_to_hub)  # fail now rather than after a long run
    if config.threads:
        torch.set_num_threads(config.threads)
    checkpoints = output / "checkpoints"
    log_file = output / "log.jsonl"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

    # Each process draws its own crops and posterior noise; the model starts identical everywhere.
    state, loss_fn = _build_state(config, accelerator.process_index, accelerator.num_processes)
    start, warning = 0, None
    found = latest_checkpoint(checkpoints) if resume else None
    if found is not None:
        start, warning = restore_checkpoint(found, state, accelerator.process_index, accelerator.num_processes)
        if accelerator.is_main_process:
            _truncate_log(log_file, start)  # steps after the checkpoint are trained and logged again

    objective, state.optimizer = accelerator.prepare(Objective(state.vae, loss_fn), state.optimizer)
    model = accelerator.unwrap_model(objective).vae
    discriminator = None
    if state.discriminator is not None:
        discriminator, state.disc_optimizer = accelerator.prepare(state.discriminator, state.disc_optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    eval_images = load_eval_images(config) if accelerator.is_main_process else None
    last_eval = _last_eval_record(log_file) if accelerator.is_main_process else None
    stop = min(config.steps, max_steps) if max_steps is not None else config.steps
    if trackers:
        accelerator.init_trackers(config.tracker_project, config=flat_hparams(config.to_dict()))

    if accelerator.is_main_process:
        print(_summary(config, accelerator, state, start, stop, found, trackers), flush=True)
        if warning:
            print(f"reed train: warning: {warning}", flush=True)

    progress = tqdm(range(start, stop), initial=start, total=stop, disable=not accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=2.0)
    window_start, window_images = time.perf_counter(), 0
    for step in progress:
        # 1. learning rate and batch
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        images = to_tensor(state.crops.batch(config.batch_size)).to(accelerator.device)
        num_cycles, num_warmup = cycle_counts(config, step, state.cycle_rng)
        adversarial_on = discriminator is not None and step >= config.loss.adversarial_start_step

        # 2. forward: every loss term of the VAE; the discriminator only judges, so it gets no gradients
        if discriminator is not None:
            state.discriminator.requires_grad_(False)
        loss, logs = objective(images, num_cycles, num_warmup, state.generator,
                               state.discriminator if adversarial_on else None)
        _check_finite(accelerator, loss, logs, step, checkpoints)

        # 3. backward, clip and step; then fold the new weights into the EMA
        state.optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip else None
        state.optimizer.step()
        if state.ema is not None:
            state.ema.step()

        # 4. the discriminator's step, on the last cycle's output against its target
        if adversarial_on:
            state.discriminator.requires_grad_(True)
            real, fake = loss_fn.last_output
            disc_loss, disc_logs = discriminator_loss(discriminator, real, fake)
            state.disc_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(disc_loss)
            state.disc_optimizer.step()
            logs.update({f"disc/{name}": value for name, value in disc_logs.items()})
        window_images += config.batch_size * accelerator.num_processes
        done = step + 1

        # 5. log, evaluate, checkpoint
        if done % config.log_every == 0 or done == stop:
            logs = _mean_over_processes(accelerator, logs)
        if accelerator.is_main_process and (done % config.log_every == 0 or done == stop):
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "lr": state.optimizer.param_groups[0]["lr"],
                      "images_per_second": window_images / max(elapsed, 1e-9),
                      **{(name if "/" in name else f"train/{name}"): value for name, value in logs.items()},
                      **memory_stats(accelerator.device)}
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", K=num_cycles, ips=f"{record['images_per_second']:.1f}")
            _write_line(progress, progress_line(record, stop))
            _append_log(log_file, record)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            window_start, window_images = time.perf_counter(), 0
        if accelerator.is_main_process and (done % config.eval_every == 0 or done == config.steps):
            last_eval = _evaluate(config, model, state.ema, eval_images, done, output, accelerator)
            figures = [f"{k} {v:.2f} dB" if k.startswith("psnr") else f"{k} {v:.4f}"
                       for k, v in last_eval.items() if k != "step"]
            _write_line(progress, f"step {done}: " + ", ".join(figures))
        if done % config.checkpoint_every == 0 or done == stop:
            accelerator.wait_for_everyone()
            process_states = gather_object([process_state(state)])
            if accelerator.is_main_process:
                save_checkpoint(checkpoints, done, state, config, process_states)
    progress.close()

    accelerator.wait_for_everyone()
    if stop < config.steps:
        accelerator.end_training()
        return latest_checkpoint(checkpoints)
    final = output / "model"
    if accelerator.is_main_process:
        _save_final_model(config, model, state, final, stop, accelerator.num_processes, last_eval)
    accelerator.end_training()
    return final


def _evaluate(config: TrainConfig, model: AutoencoderKL, ema: NamedEMA | None, eval_images: torch.Tensor,
              done: int, output: Path, accelerator) -> dict[str, float]:
    """Run the ladder on the held-out images with the weights that will be saved; log values and a grid."""
    use_ema = ema is not None and config.final_weights == "ema"
    with ema.applied() if use_ema else contextlib.nullcontext():
        result = run_ladder(model, eval_images, config.eval_cycles)
    values = {f"eval/{k}": v for k, v in result.metrics.items()}
    _append_log(output / "log.jsonl", {"step": done, **values})
    accelerator.log(values, step=done)
    grid = ladder_grid(eval_images, result)
    (output / "eval").mkdir(exist_ok=True)
    save_png(grid, output / "eval" / f"ladder-step-{done:08d}.png")
    log_images(accelerator.trackers, "eval/ladder", grid, done)
    return {"step": done, **result.metrics}


def _save_final_model(config: TrainConfig, model: AutoencoderKL, state: TrainingState, final: Path, steps_done: int,
                      num_processes: int, last_eval: dict | None) -> None:
    weights = "trained weights (last step)"
    if config.final_weights == "ema":
        state.ema.copy_to(model)
        weights = f"EMA of the trained weights (decay {config.ema_decay:g})"
    if config.base is None:
        scaling, shift = calibrate_latents(model, state.crops)
        model.register_to_config(scaling_factor=scaling, shift_factor=shift)
    model.eval()
    model.save_pretrained(final, safe_serialization=True)
    write_model_card(final, config, steps_done, num_processes, last_eval, weights)
    print(f"reed train: saved {final}", flush=True)
    if config.push_to_hub:
        url = push_to_hub(final, config.push_to_hub)
        print(f"reed train: uploaded {final} to {url}", flush=True)


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _read_log(path: Path) -> list[dict]:
    """Return the records of the log, leaving out a partial last line.

    A run killed while appending can leave the last line cut off, because Linux may stop a write that
    spans a page boundary of the file between the two pages when a SIGKILL arrives.
    """
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise
    return records


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written after the checkpoint a run resumes from) and a partial last line."""
    if path.is_file():
        remaining = [record for record in _read_log(path) if record["step"] <= step]
        _write_atomic(path, "".join(json.dumps(record) + "\n" for record in remaining))


def _last_eval_record(path: Path) -> dict | None:
    """Return the last evaluation in the log as ``{"step": ..., metric: value}``, or None."""
    for record in reversed(_read_log(path)):
        values = {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")}
        if values:
            return {"step": record["step"], **values}
    return None
