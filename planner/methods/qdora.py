"""QDoRA: DoRA over a frozen 4-bit NF4 base; each forward de-quantizes W for DoRA's weight norm."""

from __future__ import annotations

from ..terms import Setup, Term
from .dora import DoRA
from .nf4 import NF4Storage


class QDoRA(NF4Storage, DoRA):
    name = "qdora"
    plain = "qlora"

    def layer_transient_terms(self, s: Setup, tokens: int) -> list[Term]:
        norm, dq = self.norm_transient(s), self.dequant_transient(s)
        return [norm if norm.bytes >= dq.bytes else dq]


METHOD = QDoRA()
