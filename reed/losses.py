"""The REED loss: reconstruction error summed over several re-encode/decode cycles.

One cycle encodes the previous cycle's output and decodes it again, as a chain of latent-diffusion edits
does. Gradients flow back through every cycle, frozen encoder included, so the decoder learns to
produce images that the encoder maps back to latents it decodes well: images that survive round trips.
With ``cycles=1`` this is the ordinary single-pass VAE loss.

The loss works on raw latents from ``vae.encode``: the scaling and shift of the latent convention
(``reed.models``) cancel within a round trip, so they are left out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from reed.config import LossConfig


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels of an 8-bit file, passing gradients straight through.

    Between two edits a user holds an 8-bit image, so each cycle re-encodes what a file would hold.
    The backward pass treats rounding and clamping as the identity (a straight-through estimator).
    """
    levels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0
    return images + (levels - images).detach()


class ReedLoss(torch.nn.Module):
    """Weighted L1, L2, LPIPS, KL and latent-consistency terms over ``num_cycles`` cycles.

    ``forward`` returns ``(loss, logs)``. The latent term is the squared distance between each cycle's
    re-encoded output and the original image's latent, divided by that latent's variance: it asks the
    decoder for images the encoder maps back to where they came from, the fixed-point property that
    keeps a chain from drifting.
    """

    def __init__(self, config: LossConfig, lpips_model: torch.nn.Module | None = None):
        super().__init__()
        if config.lpips > 0 and lpips_model is None:
            raise ValueError("loss.lpips > 0 needs an LPIPS model, but none could be loaded "
                             "(see reed.metrics.lpips_unavailable_reason()). Set loss.lpips: 0.")
        self.config = config
        self.lpips_model = lpips_model

    def forward(self, vae: AutoencoderKL, images: torch.Tensor, num_cycles: int, num_warmup: int = 0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        current = images

        # Warm-up cycles without gradients move the starting point deep into the chain.
        if num_warmup:
            with torch.no_grad():
                for _ in range(num_warmup):
                    posterior = vae.encode(current).latent_dist
                    current = quantize_8bit(vae.decode(posterior.mode()).sample)

        # The latent of the original image: the point every cycle's re-encoding should come back to.
        with torch.no_grad():
            reference_latent = vae.encode(images).latent_dist.mode() if config.latent > 0 else None

        l1_terms, l2_terms, lpips_terms, latent_terms = [], [], [], []
        kl_loss = images.new_zeros(())
        posterior = vae.encode(current).latent_dist
        for cycle in range(num_cycles):
            if cycle == 0:
                # The KL term only moves the encoder; with a frozen encoder it is a constant.
                kl_loss = posterior.kl().mean() / posterior.mean[0].numel()
            decoded = vae.decode(posterior.sample(generator)).sample

            # Every cycle is compared with the original image, not with the previous cycle.
            l1_terms.append(F.l1_loss(decoded, images))
            l2_terms.append(F.mse_loss(decoded, images))
            if config.lpips > 0:
                lpips_terms.append(self.lpips_model(decoded.clamp(-1, 1), images).mean())
            current = quantize_8bit(decoded) if config.quantize else decoded

            # Re-encode the output: the next cycle's input, and the latent-consistency term's subject.
            if cycle + 1 < num_cycles or reference_latent is not None:
                posterior = vae.encode(current).latent_dist
            if reference_latent is not None:
                drift = F.mse_loss(posterior.mode(), reference_latent)
                latent_terms.append(drift / reference_latent.var().clamp_min(1e-8))

        l1_loss = torch.stack(l1_terms).mean()
        l2_loss = torch.stack(l2_terms).mean()
        lpips_loss = torch.stack(lpips_terms).mean() if lpips_terms else images.new_zeros(())
        latent_loss = torch.stack(latent_terms).mean() if latent_terms else images.new_zeros(())
        loss = (config.l1 * l1_loss + config.l2 * l2_loss + config.lpips * lpips_loss + config.kl * kl_loss
                + config.latent * latent_loss)

        logs = {
            "loss": loss.item(),
            "l1": l1_loss.item(),
            "l2": l2_loss.item(),
            "lpips": lpips_loss.item(),
            "kl": kl_loss.item(),
            "latent": latent_loss.item(),
            "l2_last_cycle": l2_terms[-1].item(),
            "cycles": float(num_cycles),
            "warmup": float(num_warmup),
        }
        return loss, logs
