"""The registry of edit operations: a name, a function and typed parameters for each.

An operation takes the image a user holds (uint8 RGB, shape (H, W, 3)) and an ``EditContext`` and returns
a new image of the same size. The context carries the arm's VAE and a random generator seeded per step,
so both arms of a comparison get identical operations and identical randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Value = int | float | str | bool


@dataclass(frozen=True)
class Param:
    """One parameter of an operation: its type, default, allowed range or choices, and help text."""

    name: str
    kind: type
    default: Value | None
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False
    # Extra validation for strings, such as colour names; raises ValueError with a message for the user.
    check: Callable[[str], Any] | None = None

    def convert(self, value: Any, op_name: str) -> Value:
        """Convert a value from text or JSON to this parameter's type, raising ``ValueError`` when invalid."""
        where = f"{op_name} {self.name}={value!r}"
        if self.kind is bool:
            if isinstance(value, bool):
                result: Value = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                result = True
            elif str(value).lower() in ("0", "false", "no", "off"):
                result = False
            else:
                raise ValueError(f"Invalid value in '{where}': expected true or false.")
        elif self.kind in (int, float):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Invalid value in '{where}': expected a number.") from None
            if not np.isfinite(number):
                raise ValueError(f"Invalid value in '{where}': expected a finite number.")
            if self.kind is int and number != int(number):
                raise ValueError(f"Invalid value in '{where}': expected a whole number.")
            result = int(number) if self.kind is int else number
        else:
            result = str(value)
        if self.minimum is not None and result < self.minimum or self.maximum is not None and result > self.maximum:
            raise ValueError(f"Out of range: '{where}'; {self.name} must be between {self.minimum} and {self.maximum}.")
        if self.choices is not None and result not in self.choices:
            raise ValueError(f"Invalid value in '{where}'; choose one of: {', '.join(self.choices)}.")
        if self.check is not None:
            self.check(result)
        return result

    def describe(self) -> str:
        if self.choices:
            allowed = "|".join(self.choices)
        elif self.minimum is not None or self.maximum is not None:
            allowed = f"{self.kind.__name__} {self.minimum}..{self.maximum}"
        else:
            allowed = self.kind.__name__
        default = "required" if self.required else f"default {self.default}"
        return f"{self.name} ({allowed}, {default}): {self.help}"


@dataclass
class EditContext:
    """Inputs an operation may use besides the image: the arm's VAE, a seeded generator, the step number
    and the tile size in pixels for round trips over larger images (None: whole image). Diffusion edits
    ignore the tile size and encode the whole image."""

    vae: Any = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    seed: int = 0
    step: int = 1
    tile: int | None = None


# A pre-flight check: called with an operation's resolved parameters and the arms' VAEs by name before
# a chain's first step. It raises (``ValueError`` or ``reed.models.ModelLoadError``) when the step cannot
# run, and returns warnings for the result's notes.
PrepareHook = Callable[[dict[str, Any], dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Operation:
    name: str
    function: Callable[..., np.ndarray]
    params: tuple[Param, ...]
    help: str
    uses_vae: bool = False
    prepare: PrepareHook | None = None
    # Returns why the operation cannot run with its default parameters (such as a model that is not
    # available offline), or None when it can. It must be cheap: the app calls it when it starts.
    unavailable_reason: Callable[[], str | None] | None = None

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        valid = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"Unknown parameter '{name}' for operation '{self.name}'. Valid parameters: {valid}.")

    def resolve(self, given: dict[str, Any]) -> dict[str, Value]:
        """Validate given parameters and fill in defaults; raise ``ValueError`` naming what is wrong."""
        values = {name: self.param(name).convert(value, self.name) for name, value in given.items()}
        for param in self.params:
            if param.name not in values:
                if param.required:
                    raise ValueError(f"Missing parameter '{param.name}' for operation '{self.name}': {param.help}")
                values[param.name] = param.default
        return values

    def describe(self) -> str:
        lines = [f"{self.name}: {self.help}"]
        lines += [f"    {param.describe()}" for param in self.params]
        return "\n".join(lines)


OPERATIONS: dict[str, Operation] = {}


def register(name: str, help: str, params: tuple[Param, ...] = (), uses_vae: bool = False,
             prepare: PrepareHook | None = None, unavailable_reason: Callable[[], str | None] | None = None):
    """Add the decorated function to ``OPERATIONS`` under ``name``."""
    def decorator(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in OPERATIONS:
            raise ValueError(f"Operation '{name}' is registered twice.")
        OPERATIONS[name] = Operation(name, function, params, help, uses_vae, prepare, unavailable_reason)
        return function
    return decorator


def get_operation(name: str) -> Operation:
    if name not in OPERATIONS:
        raise ValueError(f"Unknown operation '{name}'. Valid operations: {', '.join(sorted(OPERATIONS))}.")
    return OPERATIONS[name]
