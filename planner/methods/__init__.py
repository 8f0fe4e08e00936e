"""The fine-tuning methods, one module each, registered here in one line each."""

from .base import Method, Tensors
from .dora import METHOD as DORA
from .full import METHOD as FULL
from .lora import METHOD as LORA
from .qdora import METHOD as QDORA
from .qlora import METHOD as QLORA

METHODS: dict[str, Method] = {m.name: m for m in (FULL, LORA, QLORA, DORA, QDORA)}

__all__ = ["METHODS", "Method", "Tensors"]
