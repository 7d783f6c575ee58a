"""Edit operations by name. Importing this package registers every operation in ``OPERATIONS``."""

from reed.edits import diffusion, pixel, vae_ops  # noqa: F401 (importing registers the operations)
from reed.edits.registry import OPERATIONS, EditContext, Operation, Param, get_operation, register

__all__ = ["OPERATIONS", "EditContext", "Operation", "Param", "get_operation", "register"]
