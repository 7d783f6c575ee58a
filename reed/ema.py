"""An exponential moving average (EMA) of the trained weights, saved by parameter name.

The averaging is diffusers' ``EMAModel``. In diffusers 0.42 its decay ramps up as
(1 + step) / (10 + step) and is capped at ``decay``, so early weights are not frozen into the average.
This module adds what checkpoints need: the averaged tensors keyed by parameter name (a safetensors
file) and the counters as JSON.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel


class NamedEMA:
    """The EMA of the parameters of ``model`` that require gradients, at the time of construction."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMAModel(self.parameters, decay=decay)

    def step(self) -> None:
        """Fold the current weights into the average; call after each optimizer step."""
        self.ema.step(self.parameters)

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the averaged weights keyed by parameter name, ready for ``safetensors.save_file``."""
        return {name: shadow.detach().contiguous() for name, shadow in zip(self.names, self.ema.shadow_params)}

    def counters(self) -> dict:
        """Return the JSON-safe part of the state: the step count and the decay settings."""
        state = self.ema.state_dict()
        return {key: value for key, value in state.items() if key != "shadow_params"}

    def load(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        """Restore from ``tensors()`` and ``counters()`` output; raises ``ValueError`` on a name mismatch."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise ValueError(f"The EMA in this checkpoint lacks {len(missing)} trained parameters (first: "
                             f"{missing[0]}). Resume with the train_encoder setting the run started with.")
        state = dict(counters)
        state["shadow_params"] = [tensors[name].to(p.device, p.dtype) for name, p in zip(self.names, self.parameters)]
        self.ema.load_state_dict(state)

    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the matching parameters of ``model`` (same names) with the averaged weights."""
        copy_named_tensors(model, self.tensors())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the trained parameters for the ``with`` block, then swap back."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)


def copy_named_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the parameters of ``model`` that have a tensor of the same name in ``tensors``."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in tensors:
                parameter.copy_(tensors[name])
