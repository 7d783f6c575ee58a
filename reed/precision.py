"""Keep the numerically sensitive layers of a VAE in float32 under bf16/fp16 autocast.

Mixed precision runs convolutions in 16 bits. Two places in an ``AutoencoderKL`` lose accuracy there.
GroupNorm computes a variance over a whole group of a large feature map, and the decoder's last
convolution produces the image that the loss compares pixel by pixel. At inference, diffusers 0.42's
SDXL pipeline guards the decode by running the whole VAE in float32 when ``force_upcast`` is set. Here
only these layers are upcast. PyTorch's autocast op reference lists ``group_norm`` among the CUDA ops
that autocast to float32, but CPU autocast kept it in bfloat16 (checked with torch 2.13), so the upcast
is explicit and the same on every device.

The layers change class, not structure: parameter names, ``state_dict`` and ``save_pretrained`` are
unaffected, and ``copy.deepcopy`` keeps the behaviour.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


class _Float32Forward:
    """Mixin: run ``forward`` with autocast off and the input cast to float32."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (the torch.nn name)
        with torch.autocast(device_type=input.device.type, enabled=False):
            return super().forward(input.float())


class Float32GroupNorm(_Float32Forward, nn.GroupNorm):
    """A GroupNorm that always computes in float32."""


class Float32Conv2d(_Float32Forward, nn.Conv2d):
    """A Conv2d that always computes in float32."""


def upcast_sensitive_layers(vae: AutoencoderKL) -> int:
    """Make every GroupNorm, ``quant_conv`` and the decoder's ``conv_out`` compute in float32.

    ``quant_conv`` produces the posterior's log-variance, which is exponentiated. Returns the number
    of layers changed. The weights must already be float32, as accelerate's mixed precision keeps them.
    """
    changed = 0
    for module in vae.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = Float32GroupNorm
            changed += 1
    for conv in (vae.quant_conv, vae.decoder.conv_out):
        if conv is not None and type(conv) is nn.Conv2d:
            conv.__class__ = Float32Conv2d
            changed += 1
    return changed
