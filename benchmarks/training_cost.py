"""Estimate the GPU-hours of a training config from a FLOP count and a measured CPU step time.

The config's architecture is built with random weights (``random_init``, so no hub access is needed)
and one training step, forward and backward of the REED loss as configured, runs on the CPU at small
resolutions with ``torch.utils.flop_counter.FlopCounterMode``. Per image, convolutions and norms cost
FLOPs in proportion to the pixel count p and the mid-block attention in proportion to p², so two
resolutions fix the coefficients of a·p + b·p², which is then evaluated at ``crop_size``. Steps with
K cycles cost F(1) + (K - 1)·(F(2) - F(1)) plus each warm-up cycle's forward pass, and the schedule's
expected K and warm-up count give the expected cost per step. The GPU time divides the total by an
assumed sustained throughput (``--gpu-tflops``): an assumption, not a measurement.

LPIPS is left out of the count, because its network weights need a download, so its weight is set to
0 here. By a rough estimate its AlexNet adds well under 1% to a step of a Stable Diffusion-sized VAE.

    python benchmarks/training_cost.py configs/sd-vae-reed.yaml --resolutions 64 128 --gpu-tflops 100
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from reed.config import TrainConfig
from reed.discriminator import NLayerDiscriminator
from reed.losses import FrozenEncoder, ReedLoss
from reed.train import build_vae


def step_flops(loss_fn: ReedLoss, vae, discriminator, resolution: int, cycles: int,
               warmup: int) -> tuple[float, float]:
    """Run a batch-1 training step at ``resolution`` twice: return (FLOPs of the first, seconds of the second)."""
    images = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run() -> None:
        vae.zero_grad(set_to_none=True)
        loss, _ = loss_fn(vae, images, cycles, warmup, torch.Generator().manual_seed(1), discriminator=discriminator)
        loss.backward()

    with FlopCounterMode(display=False) as counter:
        run()
    started = time.perf_counter()
    run()
    return float(counter.get_total_flops()), time.perf_counter() - started


def fit_per_pixel(resolutions: list[int], values: list[float], target: int) -> float:
    """Evaluate a·p + b·p² at p = target², with a and b fitted through the measured points."""
    pixels = np.array([r * r for r in resolutions], dtype=np.float64)
    design = np.stack([pixels, pixels ** 2], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.array(values), rcond=None)
    p = float(target * target)
    return float(a * p + b * p * p)


def expected_cycles(config: TrainConfig) -> tuple[float, float]:
    """Return the expected (cycles with gradients, warm-up cycles) per step under the config's schedule."""
    loss = config.loss
    if loss.cycle_schedule == "fixed":
        cycles = float(loss.cycles)
    elif loss.cycle_schedule == "uniform":
        cycles = (1 + loss.cycles) / 2
    else:  # grow: the ceiling rises linearly over training, K uniform below it
        ceilings = [1 + int((loss.cycles - 1) * min(1.0, s / max(1, config.steps - 1))) for s in range(config.steps)]
        cycles = float(np.mean([(1 + c) / 2 for c in ceilings]))
    warmup = loss.warmup_probability * (1 + loss.warmup_cycles) / 2 if loss.warmup_cycles else 0.0
    return cycles, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("--resolutions", type=int, nargs=2, default=[64, 128],
                        help="two square sizes in pixels at which one step is counted and timed")
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="assumed sustained GPU throughput in TFLOP/s for this workload")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the timed steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig.from_yaml(args.config, {"random_init": True, "output_dir": scratch})
    config.loss.lpips = 0.0
    torch.manual_seed(0)
    vae = build_vae(config)
    anchor = FrozenEncoder.from_vae(vae) if config.loss.encoder_anchor > 0 else None
    loss_fn = ReedLoss(config.loss, anchor_encoder=anchor)
    discriminator = None
    if config.loss.adversarial > 0:
        discriminator = NLayerDiscriminator(config.discriminator.layers, config.discriminator.channels)
        discriminator.requires_grad_(False)  # as in training: the decoder's step does not train it

    rows = {}
    for resolution in args.resolutions:
        k1_flops, k1_seconds = step_flops(loss_fn, vae, discriminator, resolution, 1, 0)
        k2_flops, k2_seconds = step_flops(loss_fn, vae, discriminator, resolution, 2, 0)
        with_warmup, _ = step_flops(loss_fn, vae, discriminator, resolution, 1, 1)
        rows[resolution] = {"k1_flops": k1_flops, "k2_flops": k2_flops, "warmup_cycle_flops": with_warmup - k1_flops,
                            "k1_seconds": k1_seconds, "k2_seconds": k2_seconds}
        print(f"{resolution}x{resolution}, batch 1: K=1 {k1_flops / 1e9:.1f} GFLOP in {k1_seconds:.2f} s, "
              f"K=2 {k2_flops / 1e9:.1f} GFLOP in {k2_seconds:.2f} s, "
              f"one warm-up cycle {(with_warmup - k1_flops) / 1e9:.1f} GFLOP", flush=True)

    size = config.crop_size
    resolutions = list(rows)
    first = fit_per_pixel(resolutions, [rows[r]["k1_flops"] for r in resolutions], size)
    per_cycle = fit_per_pixel(resolutions, [rows[r]["k2_flops"] - rows[r]["k1_flops"] for r in resolutions], size)
    warmup_cycle = fit_per_pixel(resolutions, [rows[r]["warmup_cycle_flops"] for r in resolutions], size)
    cycles, warmups = expected_cycles(config)
    per_image = first + (cycles - 1) * per_cycle + warmups * warmup_cycle
    per_step = per_image * config.batch_size
    total = per_step * config.steps
    gpu_hours = total / (args.gpu_tflops * 1e12) / 3600

    largest = max(resolutions)
    cpu_flops_per_second = rows[largest]["k2_flops"] / rows[largest]["k2_seconds"]
    cpu_days = total / cpu_flops_per_second / 86400
    summary = {
        "config": args.config,
        "crop_size": size, "batch_size": config.batch_size, "steps": config.steps,
        "expected_cycles": cycles, "expected_warmup_cycles": warmups,
        "gradient_checkpointing": config.gradient_checkpointing,
        "tflop_per_image_step": per_image / 1e12, "tflop_per_step": per_step / 1e12,
        "total_pflop": total / 1e15,
        "assumed_gpu_tflops": args.gpu_tflops, "estimated_gpu_hours": gpu_hours,
        "measured_cpu_gflops": cpu_flops_per_second / 1e9, "cpu_threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "estimated_cpu_days": cpu_days,
        "measurements": rows,
    }
    print(json.dumps(summary, indent=2))
    print(f"Estimate: {per_image / 1e12:.1f} TFLOP per image-step at {size}x{size} (E[K] = {cycles:g}, "
          f"E[warm-up] = {warmups:g}), {total / 1e18:.2f} EFLOP for {config.steps} steps of batch "
          f"{config.batch_size}: about {gpu_hours:.0f} GPU-hours at an assumed {args.gpu_tflops:g} TFLOP/s "
          f"sustained. The CPU measured {cpu_flops_per_second / 1e9:.1f} GFLOP/s with {args.threads} thread(s), "
          f"which would need about {cpu_days:.0f} days.")


if __name__ == "__main__":
    main()
