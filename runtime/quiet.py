"""Known-harmless library messages, filtered once, each with the reason it is harmless.

Imported for its effect by every runtime entry point (train, merge, evaluate, exact) before bitsandbytes loads.
"""

from __future__ import annotations

import logging
import warnings


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
    # peft 0.21 asks transformers 5 `model.is_gradient_checkpointing`, deprecated for `is_activation_checkpointing`
    # (removal in transformers 6; constraints.txt pins 5.23): a FutureWarning on every adapter load, about peft's
    # code, with nothing for the user to do.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


filter_known_warnings()
