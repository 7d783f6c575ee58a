"""Print how much one decode/encode cycle amplifies changes of the latent, per held-out photo.

For each model: the gain along a random direction, and along the most amplified direction found by 25
steps of power iteration (``reed.losses.contraction_gain``, change of 0.05 times the latent's norm), on
the four held-out photos at 128x128. A gain above 1 makes a chain's drift grow from step to step.

    python scripts/measure_contraction_gain.py reed-mini:standard reed-mini:reed reed-mini:control
"""

from __future__ import annotations

import sys

import torch

from reed.data import held_out_paths
from reed.images import load_image, resize_to_working_size, to_tensor
from reed.losses import contraction_gain
from reed.models import load_vae

SIZE = 128
ITERATIONS = 25
STEP = 0.05


def main(references: list[str]) -> None:
    names = list(held_out_paths())
    crops = [resize_to_working_size(load_image(path).pixels, SIZE)[:SIZE, :SIZE].copy()
             for path in held_out_paths().values()]
    images = torch.cat([to_tensor(crop) for crop in crops])
    print(f"{'model':<24} {'direction':<10} " + " ".join(f"{name:>13}" for name in names))
    for reference in references:
        vae = load_vae(reference)
        with torch.inference_mode():
            anchor = vae.encode(images).latent_dist.mode()
            start = torch.randn(anchor.shape, generator=torch.Generator().manual_seed(0))
            random_gain = contraction_gain(vae, anchor, start, iterations=0, step=STEP)
            worst_gain = contraction_gain(vae, anchor, start, iterations=ITERATIONS, step=STEP)
        for label, gains in (("random", random_gain), ("worst", worst_gain)):
            print(f"{reference:<24} {label:<10} " + " ".join(f"{gain:>13.3f}" for gain in gains.tolist()))


if __name__ == "__main__":
    main(sys.argv[1:] or ["reed-mini:standard", "reed-mini:reed", "reed-mini:control"])
