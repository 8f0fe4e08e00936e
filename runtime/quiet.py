"""Known-harmless library messages, filtered once, each with the reason it is harmless.

Imported for its effect by every runtime entry point (train, merge, evaluate, exact) before bitsandbytes loads.
"""

from __future__ import annotations

import logging


class _Drop(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def filter_known_warnings() -> None:
    # bitsandbytes >= 0.48 on CPUs with AVX512-BF16 tries an optional faster 4-bit matmul from the `kernels`
    # package (a hub download) and logs a warning on *every* import when it is absent, even for plain LoRA. It
    # then uses its built-in CPU kernel, which is what the calibration measured; GPUs never take this path.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("gemm_4bit_forward from kernels-community"))


filter_known_warnings()
