"""What a fine-tuning method contributes to memory. One subclass per method, one module each.

A method answers four questions for the estimator:
- `weight_terms`: how the base model is stored (16-bit, fp32 master weights, 4-bit NF4);
- `trainable_tensors`: which tensors train (sizes and dtype), from which gradients and optimizer
  state follow;
- `projection_saved_bytes`: what each decoder layer's linear modules save for backward;
- `layer_transient_terms`: short-lived buffers inside one layer (de-quantized weights, DoRA's norm).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import assumptions as A
from ..terms import Setup, Term


@dataclass(frozen=True)
class Tensors:
    """`count` trainable tensors of `numel` elements each, stored with `bytes_per` bytes per element."""

    label: str
    numel: int
    count: int
    bytes_per: int

    @property
    def elements(self) -> int:
        return self.numel * self.count


class Method:
    name = "method"
    adapter = False  # trains adapters on a frozen base (else: every weight trains)
    quantized = False  # the base is stored as 4-bit NF4
    dora = False  # DoRA's magnitude and weight norm
    plain: str | None = None  # the method without DoRA on the same base, which DoRA's cost is judged against

    # -- storage ----------------------------------------------------------------------------------
    def weight_bytes(self, s: Setup) -> int:
        """Bytes per element of the non-quantized base weights."""
        return A.DTYPE_BYTES[s.dtype]

    def weight_terms(self, s: Setup) -> list[Term]:
        P = s.shape.parameters
        b = self.weight_bytes(s)
        return [Term("weights", "base model weights", P * b, "P × bytes", {"P": P, "bytes": b})]

    def trainable_tensors(self, s: Setup) -> list[Tensors]:
        raise NotImplementedError

    def trainable_parameters(self, s: Setup) -> int:
        return sum(t.elements for t in self.trainable_tensors(s))

    # -- activations ------------------------------------------------------------------------------
    def projection_saved_bytes(self, s: Setup, tokens: int) -> tuple[int, dict]:
        """Bytes one decoder layer's linear modules save for backward, and the formula inputs."""
        raise NotImplementedError

    def layer0_savings(self, s: Setup, tokens: int) -> int:
        """Bytes layer 0 does not save because its input (the frozen embedding output) needs no grad."""
        return 0

    def layer_transient_terms(self, s: Setup, tokens: int) -> list[Term]:
        return []

    def not_yet_graded_bytes(self, s: Setup) -> int:
        """Gradient bytes that do not exist yet while the first layer is recomputed in backward:
        that layer's own trainable tensors (and, for full fine-tuning, the input embeddings)."""
        tensors = self.trainable_tensors(s)
        return sum(t.elements * t.bytes_per for t in tensors) // s.shape.num_layers

    def trains_norms(self) -> bool:
        return False

    def trains_lm_head(self) -> bool:
        return False

    def backward_working_width(self, s: Setup) -> int | None:
        """The width of one MLP gradient in backward when narrower than the layer's (planner/methods/nf4.py)."""
        return None

    def transients_add_to_working(self, s: Setup) -> bool:
        """Whether a layer's transient buffers (DoRA's weight norm) coexist with its backward gradients."""
        return True

    def backward_working_coefficient(self, gated_mlp: bool) -> int:
        return A.BACKWARD_WORKING_BYTES["adapter" if gated_mlp else "adapter_plain_mlp"]
