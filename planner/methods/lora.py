"""LoRA (Hu et al. 2021): frozen base, trainable A (r x in) and B (out x r) per targeted module."""

from __future__ import annotations

from .. import assumptions as A
from ..terms import Setup
from .base import Method, Tensors


def attention_output_is_the_input(s: Setup) -> bool:
    """sdpa and flash-attention return their output laid out as (batch, seq, heads, dim), so the o_proj input
    (`.transpose(1, 2).contiguous()` of it) is the very tensor they save for backward: counted with the attention
    (planner/activations.py). Eager attention's matmul output is copied by `.contiguous()`."""
    return s.geometry.attention != "eager"


def distinct_inputs(s: Setup, linears, tokens: int, all_experts: bool = False) -> dict[str, int]:
    """Elements of each distinct tensor the `linears` read, by input (modules reading one tensor — q/k/v, gate/up —
    share it; o_proj's input under sdpa is the attention's own saved output, counted with the attention).
    `all_experts`: every copy of an expert module saves its own rows (full fine-tuning)."""
    out: dict[str, int] = {}
    for lin in linears:
        if lin.input == "attn_out" and attention_output_is_the_input(s):
            continue
        n = int(tokens * lin.active * (lin.experts if all_experts else 1)) * lin.in_features
        out[lin.input] = max(out.get(lin.input, 0), n)
    return out


class LoRA(Method):
    name = "lora"
    adapter = True

    def trainable_tensors(self, s: Setup) -> list[Tensors]:
        r, L = s.adapter.rank, s.shape.num_layers
        out = []
        for lin in s.targeted():
            layers = lin.layers(L)
            out.append(Tensors(f"{lin.name}.lora_A", r * lin.in_features, layers, A.ADAPTER_BYTES))
            out.append(Tensors(f"{lin.name}.lora_B", lin.out_features * r, layers, A.ADAPTER_BYTES))
        return out

    def mask_bytes(self, s: Setup) -> int:
        fixed = A.DROPOUT_MASK_BYTES.get(s.device_kind)
        return fixed if fixed is not None else s.compute_bytes  # CPU: the mask has the input's dtype

    def module_saved_bytes(self, s: Setup, lin, tokens: int) -> int:
        """What one adapted module saves, beyond a shared input (see projection_saved_bytes). The runtime keeps the
        module's input in the compute dtype (assumptions.LORA_INPUTS_UNCAST)."""
        e, r, n_in = s.compute_bytes, s.adapter.rank, lin.in_features
        t = int(tokens * lin.active)
        saved = e * t * r  # lora_A output, saved by lora_B
        if s.adapter.dropout > 0:
            saved += e * t * n_in  # the dropout output, which lora_A saves
            saved += self.mask_bytes(s) * t * n_in
        return saved

    def projection_saved_bytes(self, s: Setup, tokens: int) -> tuple[int, dict]:
        targeted = s.targeted()
        total = sum(self.module_saved_bytes(s, lin, tokens) for lin in targeted)
        if s.adapter.dropout == 0:
            # without dropout lora_A saves its input itself, in the compute dtype: modules reading one tensor
            # (q/k/v, gate/up) share it, and the frozen base linears save nothing
            total += s.compute_bytes * sum(distinct_inputs(s, targeted, tokens).values())
        return total, {"modules": [lin.name for lin in targeted], "rank": s.adapter.rank,
                       "dropout": s.adapter.dropout, "bytes": s.compute_bytes}

    def layer0_savings(self, s: Setup, tokens: int) -> int:
        # Layer 0's attention input derives from the frozen embeddings: dropout there saves no mask.
        if s.adapter.dropout == 0:
            return 0
        return sum(self.mask_bytes(s) * int(tokens * lin.active) * lin.in_features
                   for lin in s.targeted() if lin.input == "attn_in")


METHOD = LoRA()
