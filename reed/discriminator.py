"""The PatchGAN discriminator and the hinge losses of the optional adversarial term.

A PatchGAN scores overlapping patches of an image as real or generated, so it judges texture rather
than layout. Added to a REED fine-tune, it pushes the decoder towards sharp output where L1 and L2
alone would accept blur.

Images are in [-1, 1], as everywhere in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Bounds of the adaptive weight, so a vanishing adversarial gradient cannot make it explode.
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4


class NLayerDiscriminator(nn.Module):
    """A PatchGAN: ``layers`` stride-2 convolutions, then two stride-1 ones, ending in one logit per patch.

    Channels double per layer from ``channels`` up to 8x ``channels``. The normalisation is GroupNorm
    rather than the original BatchNorm: its statistics do not depend on the batch, so small per-process
    batches and several processes need no synchronised batch statistics.
    """

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3):
        super().__init__()
        if layers < 1 or channels < 1:
            raise ValueError(f"NLayerDiscriminator needs layers >= 1 and channels >= 1, got {layers} and {channels}.")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers + 1):
            stride = 2 if index < layers else 1
            next_width = channels * min(2 ** index, 8)
            blocks += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, next_width), next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise convolution weights from N(0, 0.02), norm scales from N(1, 0.02), and biases to 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return patch logits of shape (N, 1, H', W'); positive means "real"."""
        return self.net(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: push real logits above 1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the generator (the decoder): raise the discriminator's logits on its output."""
    return -fake_logits.mean()


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor,
                       fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Score real and decoded images and return the hinge loss with its logs.

    ``fake`` must already be detached from the VAE, so this loss trains the discriminator only.
    """
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    loss = hinge_discriminator_loss(real_logits, fake_logits)
    logs = {
        "loss": loss.item(),
        "logits_real": real_logits.detach().mean().item(),
        "logits_fake": fake_logits.detach().mean().item(),
    }
    return loss, logs


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                    last_layer: torch.Tensor) -> torch.Tensor:
    """Return ‖∇ reconstruction‖ / ‖∇ generator‖ at ``last_layer``, detached and clamped to [0, 1e4].

    Scaled by this ratio, the adversarial term's gradient at the decoder's output layer is as large as
    the reconstruction gradient there, whatever the two losses' magnitudes. VQGAN's training code
    (``VQLPIPSWithDiscriminator`` in taming-transformers) balances its terms the same way. Both losses
    must still have their graphs, and this keeps them for the backward pass that follows.
    """
    reconstruction_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    generator_grad, = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    ratio = reconstruction_grad.norm() / (generator_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
