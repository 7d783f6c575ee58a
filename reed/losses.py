"""The REED loss: reconstruction error summed over several re-encode/decode cycles.

One cycle encodes the previous cycle's output and decodes it again, as a chain of latent-diffusion edits
does. Gradients flow back through every cycle, frozen encoder included, so the decoder learns to
produce images that the encoder maps back to latents it decodes well: images that survive round trips.
With ``cycles=1`` this is the ordinary single-pass VAE loss.

Optional parts, each off by default: ordinary pixel edits between cycles (``reed.augment``), a
contraction term that keeps one cycle from amplifying changes of the latent (``contraction_gain``), a latent
anchor that keeps a trained encoder near a frozen copy of the original (``FrozenEncoder``), and a
PatchGAN adversarial term (``reed.discriminator``).

The loss works on raw latents from ``vae.encode``: the scaling and shift of the latent convention
(``reed.models``) cancel within a round trip, so they are left out here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from reed.augment import random_edit
from reed.config import LossConfig
from reed.discriminator import adaptive_weight, hinge_generator_loss


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels of an 8-bit file, passing gradients straight through.

    Between two edits a user holds an 8-bit image, so each cycle re-encodes what a file would hold.
    The backward pass treats rounding and clamping as the identity (a straight-through estimator).
    """
    levels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 127.5 - 1.0
    return images + (levels - images).detach()


class FrozenEncoder(torch.nn.Module):
    """A frozen copy of a VAE's encoder and ``quant_conv``: the anchor for ``loss.encoder_anchor``.

    Built from the base model before training changes it, so the trained encoder can be kept near the
    latents that existing diffusion models were trained on.
    """

    def __init__(self, encoder: torch.nn.Module, quant_conv: torch.nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> "FrozenEncoder":
        return cls(copy.deepcopy(vae.encoder), copy.deepcopy(vae.quant_conv))

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # stays in eval mode inside a module that is put in training mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the posterior mean (raw latents, like ``vae.encode(images).latent_dist.mode()``)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.chunk(2, dim=1)[0]


def cycle_map(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode raw latents and encode the result again (posterior mean): one step of a chain, in latent space."""
    return vae.encode(vae.decode(latents).sample).latent_dist.mode()


def contraction_gain(vae: AutoencoderKL, anchor: torch.Tensor, start: torch.Tensor, iterations: int,
                     step: float) -> torch.Tensor:
    """Return, per sample, how much one cycle amplifies a small change of ``anchor`` along its worst direction.

    The direction comes from ``iterations`` steps of power iteration without gradients, started at
    ``start``; the change has ``step`` times the anchor's norm. The returned gain is differentiable in the
    decoder. A chain's drift grows from step to step where this gain exceeds 1. For reed-mini:standard
    on four held-out photos at 128x128, one cycle shrinks random changes (gain 0.46 to 0.50) but
    amplifies the worst direction by 1.15 to 1.42 (``scripts/measure_contraction_gain.py``).
    The 8-bit rounding between cycles is left out, so this is the linear part of the chain.
    """
    dims = tuple(range(1, anchor.ndim))

    def per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(dims))

    size = step * per_sample_norm(anchor)
    direction = start / per_sample_norm(start)
    with torch.no_grad():
        base = cycle_map(vae, anchor)
        for _ in range(iterations):
            moved = cycle_map(vae, anchor + size * direction) - base
            direction = moved / per_sample_norm(moved)
    moved = cycle_map(vae, anchor + size * direction) - cycle_map(vae, anchor)
    return per_sample_norm(moved).flatten() / size.flatten()


class ReedLoss(torch.nn.Module):
    """Weighted L1, L2, LPIPS, KL, latent, consistency, encoder-anchor and adversarial terms over ``num_cycles`` cycles.

    ``forward`` returns ``(loss, logs)``. The latent term is the squared distance between each cycle's
    re-encoded output and the original image's latent, divided by that latent's variance: it asks the
    decoder for images the encoder maps back to where they came from, the fixed-point property that
    keeps a chain from drifting. The consistency term is the L1 plus squared distance between each
    later cycle's output and x1, the first decode of the clean image (detached). The L1 and L2 terms
    pull every cycle towards the original, which a small decoder cannot reach. This term only pulls a
    later cycle towards the first one, which it can reach. The encoder-anchor term is the squared distance between the trained
    encoder's latent of the batch and ``anchor_encoder``'s, divided by the anchor latent's variance.

    When ``forward`` gets a ``discriminator``, the adversarial term is the hinge generator loss on each
    cycle's output, and ``last_output`` keeps the last cycle's (target, output) pair, detached, for the
    discriminator's own step. The caller must turn off the discriminator's gradients for this pass.
    """

    def __init__(self, config: LossConfig, lpips_model: torch.nn.Module | None = None,
                 anchor_encoder: FrozenEncoder | None = None):
        super().__init__()
        if config.lpips > 0 and lpips_model is None:
            raise ValueError("loss.lpips > 0 needs an LPIPS model, but none could be loaded "
                             "(see reed.metrics.lpips_unavailable_reason()). Set loss.lpips: 0.")
        if config.encoder_anchor > 0 and anchor_encoder is None:
            raise ValueError("loss.encoder_anchor > 0 needs anchor_encoder, a FrozenEncoder of the base model.")
        self.config = config
        self.lpips_model = lpips_model
        self.anchor_encoder = anchor_encoder
        self.last_output: tuple[torch.Tensor, torch.Tensor] | None = None

    def _maybe_edit(self, current: torch.Tensor, target: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """With probability ``edit_probability``, apply one random pixel edit to the input and its target."""
        config = self.config
        if config.edit_probability <= 0:
            return current, target, False  # draws nothing, so runs without edits keep their random streams
        generator = generator if generator is not None else torch.default_generator
        if torch.rand((), generator=generator).item() >= config.edit_probability:
            return current, target, False
        current, target, _ = random_edit(current, target, config.edits, generator)
        if config.quantize:
            current = quantize_8bit(current)
        return current, target, True

    def forward(self, vae: AutoencoderKL, images: torch.Tensor, num_cycles: int, num_warmup: int = 0,
                generator: torch.Generator | None = None,
                discriminator: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        current, target = images, images
        edits = 0
        self.last_output = None
        # x1, the first decode of the clean image: the reference of the consistency term (and of the
        # evaluation ladder). Without warm-up it is the first cycle's own output, detached below.
        first_output = None

        # Warm-up cycles without gradients move the starting point deep into the chain.
        if num_warmup:
            with torch.no_grad():
                for _ in range(num_warmup):
                    posterior = vae.encode(current).latent_dist
                    current = quantize_8bit(vae.decode(posterior.mode()).sample)
                    if first_output is None:
                        first_output = current
                    current, target, edited = self._maybe_edit(current, target, generator)
                    edits += edited

        # The latent of the target image: the point every cycle's re-encoding should come back to.
        with torch.no_grad():
            reference_latent = vae.encode(target).latent_dist.mode() if config.latent > 0 else None

        l1_terms, l2_terms, lpips_terms, latent_terms, generator_terms = [], [], [], [], []
        consistency_terms = []
        kl_loss = images.new_zeros(())
        anchor_loss = images.new_zeros(())
        posterior = vae.encode(current).latent_dist
        start_latent = posterior.mode().detach()
        if config.encoder_anchor > 0:
            # The trained encoder's latent of the batch, next to the frozen original encoder's.
            anchor_latent = self.anchor_encoder(images)
            trained_latent = posterior.mode() if current is images else vae.encode(images).latent_dist.mode()
            anchor_loss = F.mse_loss(trained_latent, anchor_latent) / anchor_latent.var().clamp_min(1e-8)
        for cycle in range(num_cycles):
            if cycle == 0:
                # The KL term only moves the encoder; with a frozen encoder it is a constant.
                kl_loss = posterior.kl().mean() / posterior.mean[0].numel()
            decoded = vae.decode(posterior.sample(generator)).sample

            # Every cycle is compared with the original image (or its edited version), not with the
            # previous cycle.
            l1_terms.append(F.l1_loss(decoded, target))
            l2_terms.append(F.mse_loss(decoded, target))
            if config.lpips > 0:
                lpips_terms.append(self.lpips_model(decoded.clamp(-1, 1), target).mean())
            if config.consistency > 0:
                if first_output is None:
                    first_output = quantize_8bit(decoded).detach()  # this cycle is x1 itself, so it adds no term
                else:
                    consistency_terms.append(F.l1_loss(decoded, first_output) + F.mse_loss(decoded, first_output))
            if discriminator is not None:
                generator_terms.append(hinge_generator_loss(discriminator(decoded)))
                self.last_output = (target.detach(), decoded.detach())
            current = quantize_8bit(decoded) if config.quantize else decoded

            # An ordinary edit between this cycle and the next, as a user would make between two edits.
            if cycle + 1 < num_cycles:
                current, target, edited = self._maybe_edit(current, target, generator)
                edits += edited
                if edited and reference_latent is not None:
                    with torch.no_grad():
                        reference_latent = vae.encode(target).latent_dist.mode()

            # Re-encode the output: the next cycle's input, and the latent-consistency term's subject.
            if cycle + 1 < num_cycles or reference_latent is not None:
                posterior = vae.encode(current).latent_dist
            if reference_latent is not None:
                drift = F.mse_loss(posterior.mode(), reference_latent)
                latent_terms.append(drift / reference_latent.var().clamp_min(1e-8))

        contraction_loss, gain = images.new_zeros(()), images.new_zeros(())
        if config.contraction > 0:
            with torch.no_grad():
                anchor = reference_latent if reference_latent is not None else vae.encode(target).latent_dist.mode()
                # Start the power iteration from the chain's own drift when warm-up cycles ran: after
                # many cycles it already points along the directions that grow fastest.
                start = (start_latent - anchor) if num_warmup else torch.randn(
                    anchor.shape, generator=generator, device=anchor.device, dtype=anchor.dtype)
            gains = contraction_gain(vae, anchor, start, config.contraction_iterations, config.contraction_step)
            gain = gains.mean()
            contraction_loss = F.relu(gains - config.contraction_target).pow(2).mean()

        l1_loss = torch.stack(l1_terms).mean()
        l2_loss = torch.stack(l2_terms).mean()
        lpips_loss = torch.stack(lpips_terms).mean() if lpips_terms else images.new_zeros(())
        latent_loss = torch.stack(latent_terms).mean() if latent_terms else images.new_zeros(())
        consistency_loss = torch.stack(consistency_terms).mean() if consistency_terms else images.new_zeros(())
        adversarial_loss = torch.stack(generator_terms).mean() if generator_terms else images.new_zeros(())
        reconstruction = config.l1 * l1_loss + config.l2 * l2_loss + config.lpips * lpips_loss
        adversarial_weight = images.new_ones(())
        if generator_terms and config.adversarial_adaptive:
            last_layer = vae.decoder.conv_out.weight
            adversarial_weight = adaptive_weight(reconstruction, adversarial_loss, last_layer)
        loss = (reconstruction + config.kl * kl_loss + config.latent * latent_loss
                + config.consistency * consistency_loss
                + config.contraction * contraction_loss + config.encoder_anchor * anchor_loss
                + config.adversarial * adversarial_weight * adversarial_loss)

        logs = {
            "loss": loss.item(),
            "l1": l1_loss.item(),
            "l2": l2_loss.item(),
            "lpips": lpips_loss.item(),
            "kl": kl_loss.item(),
            "latent": latent_loss.item(),
            "consistency": consistency_loss.item(),
            "contraction": contraction_loss.item(),
            "contraction_gain": gain.item(),
            "encoder_anchor": anchor_loss.item(),
            "adversarial": adversarial_loss.item(),
            "adversarial_weight": adversarial_weight.item() if generator_terms else 0.0,
            "l2_last_cycle": l2_terms[-1].item(),
            "cycles": float(num_cycles),
            "warmup": float(num_warmup),
            "edits": float(edits),
        }
        return loss, logs
