"""REED training step time and peak memory as a function of K cycles, with and without gradient checkpointing.

One step is what ``reed.train`` does per batch: the REED loss over K encode/decode cycles (decoder only,
no warm-up cycles), backward, and an AdamW update. The model is built by ``reed.train.build_vae`` from
``configs/reed-mini-reed.yaml`` with ``reed-mini:standard`` as the base, at that config's batch size and
crop size. Each case runs in its own process, and its peak memory is that process's resident-set high-water mark
during the timed steps.

    python benchmarks/training_step.py               # about 3 minutes on 2 cores
    python benchmarks/training_step.py --cycles 1 2 --repeats 1 --crop 32 --out /tmp/s.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (cpu_facts, current_memory_gib, peak_memory_gib, print_table,  # noqa: E402
                               reset_peak_memory, run_in_fresh_process, write_json)
from reed.config import TrainConfig  # noqa: E402
from reed.losses import ReedLoss  # noqa: E402
from reed.train import build_vae  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reed-mini-reed.yaml"


def time_steps(config: TrainConfig, cycles: int, checkpointing: bool, repeats: int) -> dict:
    config.gradient_checkpointing = checkpointing
    vae = build_vae(config)
    loss_fn = ReedLoss(config.loss)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=config.learning_rate)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(config.batch_size, 3, config.crop_size, config.crop_size, generator=generator) * 2 - 1

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(vae, images, cycles, 0, generator)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernel selection and optimizer state
    before = current_memory_gib()
    reset_peak_memory()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - started) / repeats
    return {"cycles": cycles, "gradient_checkpointing": checkpointing, "seconds_per_step": seconds,
            "images_per_second": config.batch_size / seconds, "rss_before_gib": before, "peak_rss_gib": peak_memory_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, help="crop size (default: the config's)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/training_step.json)")
    parser.add_argument("--case", nargs=2, type=int, metavar=("CYCLES", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)  # one case, run in a fresh process by the main run
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        overrides = {"base": "reed-mini:standard", "output_dir": scratch}
        if args.crop:
            overrides["crop_size"] = args.crop
        config = TrainConfig.from_yaml(str(CONFIG), overrides)
    if args.case:
        print(json.dumps(time_steps(config, args.case[0], bool(args.case[1]), args.repeats)))
        return

    common = ["--repeats", str(args.repeats)] + (["--crop", str(args.crop)] if args.crop else [])
    rows = [run_in_fresh_process(__file__, common + ["--case", str(cycles), str(int(checkpointing))])
            for cycles in args.cycles for checkpointing in (False, True)]

    print(f"\nreed-mini, decoder only, batch {config.batch_size} of {config.crop_size}x{config.crop_size} crops")
    print_table(["K cycles", "checkpointing", "s / step", "images/s", "peak RSS (GiB)"],
                [[r["cycles"], "on" if r["gradient_checkpointing"] else "off", r["seconds_per_step"],
                  r["images_per_second"], r["peak_rss_gib"]] for r in rows])
    write_json("training_step", {"machine": cpu_facts(), "batch_size": config.batch_size,
                                 "crop_size": config.crop_size, "results": rows}, args.out)


if __name__ == "__main__":
    main()
