"""Time the app's default job: a 25-step round-trip ladder with two arms, through the chain engine.

Measures, in one run on this machine:
(a) reed-mini:standard and reed-mini:reed, 25 round trips each, on a held-out photo at 256x256 and 512x512;
(b) an AutoencoderKL with Stable Diffusion's full configuration (random weights, since the real ones
    need the hub): its time per round trip at the same sizes, measured over ``--sd-trips`` round trips
    and scaled to the same 25-step, two-arm ladder (reported as an estimate).
Prints a table and writes JSON (default: benchmarks/results/ladder_speed.json).

    python benchmarks/ladder_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import sd_vae  # noqa: E402
from reed.chain import parse_chain, run_chain  # noqa: E402
from reed.data import held_out_paths  # noqa: E402
from reed.edits.vae_ops import vae_roundtrip  # noqa: E402
from reed.images import load_image, resize_to_working_size  # noqa: E402
from reed.models import load_vae  # noqa: E402



def time_ladder(source, arms: dict, cycles: int) -> float:
    steps = parse_chain(f"roundtrip*{cycles}")
    started = time.perf_counter()
    run_chain(source, steps, arms, with_lpips=False)
    return time.perf_counter() - started


def time_roundtrips(vae, source, trips: int) -> float:
    vae_roundtrip(vae, source)  # warm-up: the first call pays for oneDNN kernel selection
    started = time.perf_counter()
    for _ in range(trips):
        vae_roundtrip(vae, source)
    return (time.perf_counter() - started) / trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--cycles", type=int, default=25)
    parser.add_argument("--sd-trips", type=int, default=2, help="round trips timed for the SD-sized VAE")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ladder_speed.json"))
    args = parser.parse_args()

    photo = load_image(held_out_paths()["astronaut"]).pixels
    builtins = {name: load_vae(name) for name in ("reed-mini:standard", "reed-mini:reed")}
    sd_model = sd_vae()

    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        source = resize_to_working_size(photo, size)
        time_ladder(source, builtins, 1)  # warm-up
        mini_total = time_ladder(source, builtins, args.cycles)
        mini_trip = time_roundtrips(builtins["reed-mini:standard"], source, 3)
        sd_trip = time_roundtrips(sd_model, source, args.sd_trips)
        sd_total = sd_trip * args.cycles * len(builtins)
        results.append({
            "size": size, "cycles": args.cycles, "arms": len(builtins),
            "reed_mini_ladder_seconds": mini_total, "reed_mini_roundtrip_seconds": mini_trip,
            "sd_roundtrip_seconds": sd_trip, "sd_ladder_seconds_estimated": sd_total,
            "sd_over_reed_mini": sd_trip / mini_trip,
        })

    print(f"{'size':>6} {'reed-mini ladder (s)':>21} {'reed-mini trip (s)':>19} {'SD trip (s)':>12} "
          f"{'SD ladder, est. (s)':>20} {'SD / mini':>10}")
    for row in results:
        print(f"{row['size']:>6} {row['reed_mini_ladder_seconds']:>21.1f} {row['reed_mini_roundtrip_seconds']:>19.3f} "
              f"{row['sd_roundtrip_seconds']:>12.2f} {row['sd_ladder_seconds_estimated']:>20.0f} "
              f"{row['sd_over_reed_mini']:>10.1f}")
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "processor": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
