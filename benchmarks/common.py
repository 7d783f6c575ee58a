"""Helpers shared by the benchmark scripts: timing, peak memory, machine facts, the SD-sized VAE, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

RESULTS = Path(__file__).parent / "results"

# Stable Diffusion 1.x/2.x VAE (as in stabilityai/sd-vae-ft-mse's config.json), built with random weights
# because the real ones need the hub. Speed depends on the architecture only.
SD_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)


def sd_vae(dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Build the SD-sized VAE with seeded random weights, channels-last like ``reed.models.load_vae``."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_CONFIG).eval().requires_grad_(False)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting a fresh model with .to(dtype) logs a warning meant for loaded ones
    try:
        return vae.to(dtype=dtype, memory_format=torch.channels_last)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Return the median wall time of ``repeats`` calls after ``warmup`` untimed ones.

    The first call of a shape pays for oneDNN's kernel selection, so it is never timed.
    """
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reset_peak_memory() -> None:
    """Reset the kernel's resident-set high-water mark of this process (Linux only; no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20  # the kernel reports kB
    except OSError:
        return None
    return None


def peak_memory_gib() -> float | None:
    """Return the resident-set high-water mark (VmHWM) since the last reset, in GiB, or None off Linux."""
    return _status_gib("VmHWM")


def current_memory_gib() -> float | None:
    """Return the resident set size (VmRSS) now, in GiB, or None off Linux."""
    return _status_gib("VmRSS")


def cpu_facts() -> dict:
    """Return the CPU's model, core count, clock and SIMD features as the OS reports them."""
    facts = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
             "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            facts["model_name"] = value
        elif key == "cpu MHz":
            facts["mhz"] = float(value)
        elif key == "flags":
            flags = set(value.split())
            facts["avx512f"] = "avx512f" in flags
            facts["avx512_bf16"] = "avx512_bf16" in flags
            facts["amx_bf16"] = "amx_bf16" in flags
            break
    return facts


def run_in_fresh_process(script: str | Path, arguments: list[str]) -> dict:
    """Run ``script`` with ``arguments`` in a new Python process and return the JSON line it prints last.

    Peak memory is only comparable between cases measured in separate processes: the allocator keeps
    memory that a process freed, so a later case in the same process looks cheaper than it is.
    """
    completed = subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(arguments)} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    """Print rows as a Markdown table, so the output can be pasted into benchmarks/README.md."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(cell(value) for value in row) + " |")
    print()
