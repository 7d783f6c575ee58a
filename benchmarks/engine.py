"""The chain engine end to end: its overhead, a naive baseline, bfloat16, batching, tiling and the app's job.

Measures, in one run, with both built-in arms (reed-mini:standard and reed-mini:reed) on held-out photos:
- overhead: the 25-round-trip ladder and the app's "Mixed session" chain through ``reed.chain.run_chain``
  (metrics included), against the bare encode/decode time of the same number of round trips. The ratio
  is the engine's own cost;
- naive: the same ladder as the usual round-trip script writes it (PIL image to tensor and back every
  step, ``encode``/``decode`` with autograd on, contiguous weights), and our speed as a ratio to it;
- bfloat16: the ladder's x1-PSNR at step 25 and source PSNR at step 1 in bfloat16 against float32, on
  the four held-out photos at 256x256, and the time of both;
- batching: the ladder for four photos, one at a time against one batch;
- tiling: a 1024x1024 round trip whole and in 256-pixel tiles, each in a fresh process, with its peak
  resident memory;
- the app: ``demo.handlers.run_comparison`` with the default chain at 512x512, split into phases, so the
  slowest phase is named with its share of the time.

    python benchmarks/engine.py                    # about 5 minutes on 2 cores
    python benchmarks/engine.py --size 64 --cycles 3 --out /tmp/e.json      # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (cpu_facts, current_memory_gib, median_seconds, peak_memory_gib,  # noqa: E402
                               print_table, reset_peak_memory, run_in_fresh_process, write_json)
from reed import models, tiling  # noqa: E402
from reed.chain import parse_chain, run_chain, run_chains  # noqa: E402
from reed.data import held_out_paths  # noqa: E402
from reed.images import load_image, resize_to_working_size, to_tensor  # noqa: E402

ARMS = ("reed-mini:standard", "reed-mini:reed")


def held_out_photos(size: int) -> dict[str, np.ndarray]:
    return {name: resize_to_working_size(load_image(path).pixels, size) for name, path in held_out_paths().items()}


def bare_roundtrip_seconds(vae, pixels: np.ndarray, repeats: int = 3) -> float:
    images = to_tensor(pixels)

    def once():
        with torch.inference_mode():
            models.roundtrip(vae, images)
    return median_seconds(once, repeats)


def naive_ladder(vae, photo: Image.Image, cycles: int) -> Image.Image:
    """Round-trip as a typical script does: PIL in and out each step, autograd on, no inference mode."""
    image = photo
    for _ in range(cycles):
        array = np.array(image).astype(np.float32) / 127.5 - 1.0
        tensor = torch.tensor(array).permute(2, 0, 1).unsqueeze(0)
        latents = vae.encode(tensor).latent_dist.mode()
        decoded = vae.decode(latents).sample
        output = ((decoded[0].permute(1, 2, 0).detach().numpy() + 1.0) * 127.5).clip(0, 255).round()
        image = Image.fromarray(output.astype(np.uint8))
    return image


def measure_overhead(vaes: dict, photo: np.ndarray, cycles: int) -> list[dict]:
    bare = sum(bare_roundtrip_seconds(vae, photo) for vae in vaes.values())
    from demo.handlers import PRESETS

    chains = {"ladder": f"roundtrip*{cycles}", "mixed session": PRESETS["Mixed session"]}
    rows = []
    for name, text in chains.items():
        steps = parse_chain(text)
        run_chain(photo, steps[:2], vaes, with_lpips=False)  # warm-up
        started = time.perf_counter()
        result = run_chain(photo, steps, vaes, with_lpips=False)
        total = time.perf_counter() - started
        trips = sum(step.op == "roundtrip" for step in steps)
        op_seconds = sum(row["seconds"] for row in result.rows)
        rows.append({"chain": name, "steps": len(steps), "round_trips": trips, "seconds": total,
                     "bare_roundtrip_seconds": bare * trips, "operation_seconds": op_seconds,
                     "overhead_ratio": total / (bare * trips)})
    return rows


def measure_naive(vaes: dict, photo: np.ndarray, cycles: int) -> dict:
    plain = {name: models.load_vae(name) for name in vaes}
    for vae in plain.values():
        vae.to(memory_format=torch.contiguous_format).requires_grad_(True)  # as a model fresh from the hub
    pil_photo = Image.fromarray(photo)
    naive_ladder(next(iter(plain.values())), pil_photo, 1)  # warm-up
    started = time.perf_counter()
    for vae in plain.values():
        naive_ladder(vae, pil_photo, cycles)
    naive = time.perf_counter() - started
    steps = parse_chain(f"roundtrip*{cycles}")
    started = time.perf_counter()
    run_chain(photo, steps, vaes, with_lpips=False)
    ours = time.perf_counter() - started
    return {"cycles": cycles, "naive_seconds": naive, "engine_seconds_with_metrics": ours, "speedup": naive / ours}


def measure_bfloat16(photos: dict[str, np.ndarray], cycles: int) -> list[dict]:
    steps = parse_chain(f"roundtrip*{cycles}")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        vaes = {name: models.load_vae(name, dtype=dtype) for name in ARMS}
        started = time.perf_counter()
        results = run_chains(list(photos.items()), steps, vaes, with_lpips=False)
        seconds = time.perf_counter() - started
        for arm in ARMS:
            last = [row for result in results for row in result.rows if row["model"] == arm and row["step"] == cycles]
            first = [row for result in results for row in result.rows if row["model"] == arm and row["step"] == 1]
            rows.append({"dtype": str(dtype).removeprefix("torch."), "model": arm, "seconds_all_arms": seconds,
                         "psnr_src_step1": float(np.mean([row["psnr_src"] for row in first])),
                         "psnr_x1_last": float(np.mean([row["psnr_x1"] for row in last]))})
    return rows


def measure_batching(photos: dict[str, np.ndarray], cycles: int) -> dict:
    vae = models.load_vae(ARMS[0])
    steps = parse_chain(f"roundtrip*{cycles}")
    sources = list(photos.items())
    run_chains(sources[:1], steps[:1], {ARMS[0]: vae}, with_lpips=False)  # warm-up
    started = time.perf_counter()
    for source in sources:
        run_chains([source], steps, {ARMS[0]: vae}, with_lpips=False)
    one_by_one = time.perf_counter() - started
    started = time.perf_counter()
    run_chains(sources, steps, {ARMS[0]: vae}, with_lpips=False)
    batched = time.perf_counter() - started
    return {"images": len(sources), "cycles": cycles, "one_by_one_seconds": one_by_one,
            "batched_seconds": batched, "speedup": one_by_one / batched}


def tiling_case(size: int, tile: int | None) -> dict:
    """Time one round trip of a square image, whole (``tile`` None) or tiled, and record its peak memory."""
    vae = models.load_vae(ARMS[0])
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        before = current_memory_gib()
        reset_peak_memory()
        started = time.perf_counter()
        if tile is None:
            models.roundtrip(vae, images)
        else:
            tiling.tiled_roundtrip(vae, images, tile)
        seconds = time.perf_counter() - started
    # The first call includes oneDNN's kernel selection, which a second call in this process would skip
    # but whose memory it would hide, so time and memory both come from this one call.
    return {"case": "whole" if tile is None else f"tiles of {tile}", "size": size, "seconds": seconds,
            "rss_before_gib": before, "peak_rss_gib": peak_memory_gib()}


def measure_tiling(size: int, tile: int) -> list[dict]:
    cases = [["--tiling-case", str(size), "0"], ["--tiling-case", str(size), str(tile)]]
    return [run_in_fresh_process(__file__, case) for case in cases]


def measure_app(photo_path: Path, size: int, cycles: int) -> dict:
    """Time ``run_comparison`` as the app calls it, with every phase wrapped in a timer."""
    from demo import handlers

    phases: dict[str, float] = {}

    def timed(owner, attribute, phase):
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started
        setattr(owner, attribute, wrapper)
        return original

    chain_text = f"roundtrip*{cycles}"
    handlers.run_comparison(str(photo_path), "roundtrip*1", ARMS[0], ARMS[1], str(size))  # warm-up and model load
    wrapped = [(handlers, "prepare_image", "load and resize the photo"),
               (handlers.chain, "run_chain", "chain (round trips and metrics)"),
               (handlers.report, "plot_curves", "plot the curves"),
               (handlers, "_write_files", "write PNGs, metrics and grid"),
               (handlers, "zip_folder", "zip the results"),
               (handlers, "show_step", "build the step view")]
    originals = [(owner, attribute, timed(owner, attribute, phase)) for owner, attribute, phase in wrapped]
    rows = []
    original_run_chain = handlers.chain.run_chain

    def keep_rows(*args, **kwargs):
        result = original_run_chain(*args, **kwargs)
        rows.extend(result.rows)
        return result
    handlers.chain.run_chain = keep_rows
    try:
        started = time.perf_counter()
        handlers.run_comparison(str(photo_path), chain_text, ARMS[0], ARMS[1], str(size))
        total = time.perf_counter() - started
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    round_trips = sum(row["seconds"] for row in rows)
    chain_phase = phases.pop("chain (round trips and metrics)")
    phases["VAE round trips"] = round_trips
    phases["metrics (PSNR, SSIM)"] = chain_phase - round_trips
    phases["other"] = total - sum(phases.values())
    slowest = max(phases, key=phases.get)
    return {"size": size, "cycles": cycles, "arms": len(ARMS), "seconds": total, "phases": phases,
            "slowest_phase": slowest, "slowest_share": phases[slowest] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="working size of the overhead, naive and app runs")
    parser.add_argument("--quality-size", type=int, default=256, help="working size of the bfloat16 check")
    parser.add_argument("--cycles", type=int, default=25)
    parser.add_argument("--tile-size", type=int, default=1024, help="image size of the tiling case")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/engine.json)")
    parser.add_argument("--tiling-case", nargs=2, type=int, metavar=("SIZE", "TILE"),
                        help=argparse.SUPPRESS)  # one tiling case (TILE 0: whole), run in a fresh process
    args = parser.parse_args()
    if args.tiling_case:
        size, tile = args.tiling_case
        print(json.dumps(tiling_case(size, tile or None)))
        return

    vaes = {name: models.load_vae(name) for name in ARMS}
    photo_path = held_out_paths()["astronaut"]
    photo = resize_to_working_size(load_image(photo_path).pixels, args.size)
    quality_photos = held_out_photos(args.quality_size)

    overhead = measure_overhead(vaes, photo, args.cycles)
    naive = measure_naive(vaes, photo, args.cycles)
    bfloat16 = measure_bfloat16(quality_photos, args.cycles)
    batching = measure_batching(quality_photos, args.cycles)
    tiles = measure_tiling(args.tile_size, args.tile)
    app = measure_app(photo_path, args.size, args.cycles)

    print()
    print_table(["chain", "steps", "round trips", "end to end (s)", "bare round trips (s)", "ratio"],
                [[r["chain"], r["steps"], r["round_trips"], r["seconds"], r["bare_roundtrip_seconds"],
                  r["overhead_ratio"]] for r in overhead])
    print_table(["ladder", "naive loop (s)", "engine with metrics (s)", "speed-up"],
                [[f"{naive['cycles']} trips, 2 arms, {args.size}²", naive["naive_seconds"],
                  naive["engine_seconds_with_metrics"], naive["speedup"]]])
    print_table(["dtype", "model", f"PSNR src @1 (dB)", f"PSNR x1 @{args.cycles} (dB)", "time, both arms (s)"],
                [[r["dtype"], r["model"], r["psnr_src_step1"], r["psnr_x1_last"], r["seconds_all_arms"]]
                 for r in bfloat16])
    print_table(["images", "one by one (s)", "one batch (s)", "speed-up"],
                [[batching["images"], batching["one_by_one_seconds"], batching["batched_seconds"],
                  batching["speedup"]]])
    print_table(["case", "size", "seconds (first call)", "peak RSS (GiB)", "peak above start (GiB)"],
                [[r["case"], r["size"], r["seconds"], r["peak_rss_gib"], r["peak_rss_gib"] - r["rss_before_gib"]]
                 for r in tiles])
    print_table(["app phase", "seconds", "share"],
                [[phase, seconds, f"{seconds / app['seconds']:.0%}"] for phase, seconds in
                 sorted(app["phases"].items(), key=lambda item: -item[1])] + [["total", app["seconds"], "100%"]])
    print(f"slowest phase of the app's job: {app['slowest_phase']} ({app['slowest_share']:.0%})")
    write_json("engine", {"machine": cpu_facts(), "overhead": overhead, "naive": naive, "bfloat16": bfloat16,
                          "batching": batching, "tiling": tiles, "app": app}, args.out)


if __name__ == "__main__":
    main()
