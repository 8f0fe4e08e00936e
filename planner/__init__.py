"""Decide: resolve the model and hardware, estimate memory per method, choose a plan.

Depends on pydantic, jinja2, rich and the standard library only: never on torch.
"""

from .memory import MemoryEstimate, estimate, estimate_all
from .methods import METHODS
from .resolve import ResolvedHardware, ResolvedModel, resolve_hardware, resolve_model
from .shapes import ModelShape, shape_from_config
from .terms import AdapterSettings, Geometry, Setup, Term

__all__ = [
    "METHODS",
    "AdapterSettings",
    "Geometry",
    "MemoryEstimate",
    "ModelShape",
    "ResolvedHardware",
    "ResolvedModel",
    "Setup",
    "Term",
    "estimate",
    "estimate_all",
    "resolve_hardware",
    "resolve_model",
    "shape_from_config",
]
