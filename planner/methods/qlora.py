"""QLoRA (Dettmers et al. 2023): LoRA adapters over a frozen 4-bit NF4 base with double quantization."""

from __future__ import annotations

from ..terms import Setup, Term
from .lora import LoRA
from .nf4 import NF4Storage


class QLoRA(NF4Storage, LoRA):
    name = "qlora"

    def layer_transient_terms(self, s: Setup, tokens: int) -> list[Term]:
        return [self.dequant_transient(s)]


METHOD = QLoRA()
