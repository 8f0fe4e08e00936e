"""Plain values shared by the estimator: what is being estimated, and one explained memory term."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import assumptions as A
from .shapes import Linear, ModelShape

COMPONENTS = (
    "weights",
    "quant_constants",
    "adapter",
    "gradients",
    "optimizer",
    "paged_optimizer",
    "activations",
    "logits",
    "transient",
    "overhead",
)


@dataclass(frozen=True)
class Term:
    """One memory term: which component it belongs to, its bytes, and the formula with its inputs."""

    component: str
    label: str
    bytes: int
    formula: str
    inputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"component": self.component, "label": self.label, "bytes": int(self.bytes),
                "formula": self.formula, "inputs": self.inputs}


@dataclass(frozen=True)
class Geometry:
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    gradient_accumulation_steps: int = 1
    attention: str = "sdpa"  # sdpa | eager | flash_attention_2
    padded: bool = True  # batches carry a padding mask (no packing)

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"


@dataclass(frozen=True)
class Setup:
    """Everything one estimate depends on."""

    shape: ModelShape
    geometry: Geometry
    adapter: AdapterSettings
    optimizer: str = "adamw_torch"
    dtype: str = "bfloat16"  # compute dtype of the non-quantized weights
    device_kind: str = "cuda"  # cuda | cpu
    # FSDP2 mixed precision (planner.parallel): the trainable weights are cast to the compute dtype for
    # forward and backward, so adapters compute in 16-bit without peft's fp32 input cast
    adapters_in_compute_dtype: bool = False
    loss: str = "chunked"  # chunked (runtime/loss.py: never tokens x vocabulary) | full (transformers' loss)
    offload: bool = False  # activation offloading of the checkpointed layer inputs (runtime/offload.py, CUDA)

    @property
    def adapter_compute_bytes(self) -> int:
        """Bytes of the adapters' weights as they compute: fp32, or the compute dtype under FSDP2."""
        return self.compute_bytes if self.adapters_in_compute_dtype else A.ADAPTER_BYTES

    @property
    def compute_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def targeted(self) -> tuple[Linear, ...]:
        """The decoder linear modules that receive an adapter (peft's matching of target_modules)."""
        targets = self.adapter.target_modules
        if targets == "all-linear":
            return tuple(lin for lin in self.shape.linears if lin.is_linear)
        names = set(targets)
        return tuple(lin for lin in self.shape.linears if lin.name in names and lin.is_linear)


def gib(n: float) -> str:
    """Bytes for people: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
