"""Round-trip throughput, FLOPs and the distance to the CPU's peak.

For reed-mini:standard and an AutoencoderKL with Stable Diffusion's full configuration (random weights),
at each size and precision: the median time of one encode/decode round trip (inference mode, channels-last
weights, batch 1), megapixels per second, the FLOPs of one round trip counted by
``torch.utils.flop_counter.FlopCounterMode``, and the achieved FLOP/s as a fraction of two peaks:
- measured: the highest FLOP/s of a 2048x2048 matrix product and of 3x3 convolutions (256 channels on
  a 128x128 map, 512 channels on 64x64, as in Stable Diffusion's VAE), in the same precision (what PyTorch's kernels reach on this machine, a practical
  ceiling; the convolution counts because the BLAS behind the matrix product may be slow on some CPUs);
- theoretical: cores x clock x FLOPs per cycle, assuming two 512-bit FMA pipes per core (64 float32 FLOPs
  per cycle, 128 for bfloat16 dot products with AVX512_BF16). The clock is what /proc/cpuinfo reports,
  which under a hypervisor may be the base clock rather than the boost clock, so this peak can be low.
The counter counts convolutions, matrix products and attention, not normalisation or upsampling, so the
achieved FLOP/s are slight underestimates.

It also times the 512x512 round trip of reed-mini with 1 thread and with all cores.

    python benchmarks/throughput.py                  # about 10 minutes on 2 cores
    python benchmarks/throughput.py --sizes 64 --repeats 1 --sd-repeats 1 --out /tmp/t.json   # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cpu_facts, median_seconds, print_table, sd_vae, write_json  # noqa: E402
from reed import models  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOPS_PER_CYCLE = {"float32": 64, "bfloat16": 128}  # per core, two 512-bit FMA pipes (see module docstring)


def roundtrip_flops(vae, size: int) -> int:
    images = torch.zeros(1, 3, size, size, dtype=vae.dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        models.roundtrip(vae, images)
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Return the FLOP/s of a square matrix product in ``dtype``."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats, warmup=2)
    return 2 * size ** 3 / seconds


def convolution_peak(dtype: torch.dtype, channels: int = 256, size: int = 128, repeats: int = 5) -> float:
    """Return the FLOP/s of a large 3x3 convolution in ``dtype`` (oneDNN's best case), channels-last."""
    weight = torch.randn(channels, channels, 3, 3).to(dtype).to(memory_format=torch.channels_last)
    images = torch.randn(1, channels, size, size).to(dtype).to(memory_format=torch.channels_last)

    def once():
        with torch.inference_mode():
            torch.nn.functional.conv2d(images, weight, padding=1)
    seconds = median_seconds(once, repeats, warmup=2)
    return 2 * channels * channels * 9 * size * size / seconds


def time_roundtrip(vae, size: int, repeats: int) -> float:
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def once():
        with torch.inference_mode():
            models.roundtrip(vae, images)
    return median_seconds(once, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips per case for reed-mini")
    parser.add_argument("--sd-repeats", type=int, default=1, help="timed round trips per case for the SD VAE")
    parser.add_argument("--skip-sd", action="store_true", help="leave out the SD-sized VAE")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/throughput.json)")
    args = parser.parse_args()

    facts = cpu_facts()
    cores = torch.get_num_threads()
    peaks = {}
    for name in args.dtypes:
        theoretical = cores * facts.get("mhz", 0.0) * 1e6 * FLOPS_PER_CYCLE[name]
        matmul = matmul_peak(DTYPES[name])
        convolution = max(convolution_peak(DTYPES[name], 256, 128), convolution_peak(DTYPES[name], 512, 64))
        peaks[name] = {"matmul": matmul, "convolution": convolution, "measured": max(matmul, convolution),
                       "theoretical": theoretical}

    rows = []
    flop_counts: dict[tuple[str, int], int] = {}  # the count depends on the shapes, not the precision
    model_names = ["reed-mini:standard"] + ([] if args.skip_sd else ["sd-vae (random weights)"])
    for model_name in model_names:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            vae = models.load_vae(model_name, dtype=dtype) if model_name.startswith("reed") else sd_vae(dtype)
            repeats = args.repeats if model_name.startswith("reed") else args.sd_repeats
            for size in args.sizes:
                if (model_name, size) not in flop_counts:
                    flop_counts[(model_name, size)] = roundtrip_flops(vae, size)
                flops = flop_counts[(model_name, size)]
                seconds = time_roundtrip(vae, size, repeats)
                achieved = flops / seconds
                rows.append({
                    "model": model_name, "dtype": dtype_name, "size": size, "seconds": seconds,
                    "megapixels_per_second": size * size / 1e6 / seconds, "gflops": flops / 1e9,
                    "achieved_gflops_per_second": achieved / 1e9,
                    "fraction_of_measured_peak": achieved / peaks[dtype_name]["measured"],
                    "fraction_of_theoretical_peak": (achieved / peaks[dtype_name]["theoretical"]
                                                     if peaks[dtype_name]["theoretical"] else None),
                })
                print(f"{model_name} {dtype_name} {size}: {seconds:.3f} s", flush=True)

    threads = []
    standard = models.load_vae("reed-mini:standard")
    thread_size = min(max(args.sizes), 512)
    for count in sorted({1, cores}):
        torch.set_num_threads(count)
        threads.append({"threads": count, "size": thread_size,
                        "seconds": time_roundtrip(standard, thread_size, args.repeats)})
    torch.set_num_threads(cores)

    print()
    print_table(["precision", "matrix product (GFLOP/s)", "convolution (GFLOP/s)", "theoretical peak (GFLOP/s)"],
                [[name, peak["matmul"] / 1e9, peak["convolution"] / 1e9, peak["theoretical"] / 1e9]
                 for name, peak in peaks.items()])
    print_table(["model", "dtype", "size", "s / round trip", "MP/s", "GFLOP / round trip", "GFLOP/s",
                 "of measured peak", "of theoretical peak"],
                [[r["model"], r["dtype"], r["size"], r["seconds"], r["megapixels_per_second"], r["gflops"],
                  r["achieved_gflops_per_second"], f"{r['fraction_of_measured_peak']:.0%}",
                  f"{r['fraction_of_theoretical_peak']:.0%}" if r["fraction_of_theoretical_peak"] else "n/a"]
                 for r in rows])
    print_table(["threads", "size", "s / round trip (reed-mini)"],
                [[t["threads"], t["size"], t["seconds"]] for t in threads])
    write_json("throughput", {"machine": facts, "peaks": peaks, "results": rows, "threads": threads}, args.out)


if __name__ == "__main__":
    main()
