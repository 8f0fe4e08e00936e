"""4-bit NF4 storage with double quantization (Dettmers et al. 2023, QLoRA), as bitsandbytes keeps it.

Decoder nn.Linear weights are Params4bit (one quantization state per tensor). Fused MoE experts (transformers 5
3-D parameters) are quantized by the runtime one expert matrix at a time (runtime/moe.py): per expert the same
packed data, uint8 absmax and fp32 nested absmax, an fp32 offset, and two code tables per experts module.
"""

from __future__ import annotations

from math import ceil

from .. import assumptions as A
from ..terms import Setup, Term


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(packed 4-bit data, quantization constants) bytes of one tensor of `numel` weights."""
    blocks = ceil(numel / A.NF4_BLOCKSIZE)
    data = ceil(numel / 2)
    constants = blocks + 4 * ceil(blocks / A.NF4_NESTED_BLOCKSIZE) + A.NF4_PER_TENSOR_BYTES
    return data, constants


def expert_nf4_bytes(numel: int) -> tuple[int, int]:
    """(packed data, constants) bytes of one expert's matrix in the runtime's NF4 experts (codes counted per module)."""
    blocks = ceil(numel / A.NF4_BLOCKSIZE)
    return ceil(numel / 2), blocks + 4 * ceil(blocks / A.NF4_NESTED_BLOCKSIZE) + A.NF4_EXPERT_OFFSET_BYTES


def quantized_experts(s: Setup) -> list:
    """The fused expert matrices the runtime stores in NF4 (none when it leaves them in 16-bit)."""
    if not A.QUANTIZE_FUSED_EXPERTS:
        return []
    return [lin for lin in s.shape.linears if not lin.is_linear]


class NF4Storage:
    """Mixin: decoder nn.Linear weights and fused MoE experts in NF4; everything else in the compute dtype."""

    quantized = True

    def weight_terms(self, s: Setup) -> list[Term]:
        sh, L = s.shape, s.shape.num_layers
        b = s.compute_bytes
        data = consts = q_params = 0
        for lin in sh.linears:
            if not lin.is_linear:
                continue
            copies = lin.layers(L) * lin.experts
            d, c = nf4_bytes(lin.in_features * lin.out_features)
            data, consts = data + d * copies, consts + c * copies
            q_params += lin.in_features * lin.out_features * copies
        e_data = e_consts = e_params = 0
        experts = quantized_experts(s)
        for lin in experts:
            copies = lin.layers(L) * lin.experts
            d, c = expert_nf4_bytes(lin.in_features * lin.out_features)
            e_data, e_consts = e_data + d * copies, e_consts + c * copies
            e_params += lin.in_features * lin.out_features * copies
        if experts:
            e_consts += A.NF4_EXPERTS_MODULE_BYTES * max(lin.layers(L) for lin in experts)
        label = "4-bit NF4 decoder linear weights" + (" and routed experts" if experts else "")
        terms = [Term("weights", label, data + e_data, "P_q / 2",
                      {"P_q": q_params + e_params, "P_linear": q_params, "P_experts": e_params})]
        rest = sh.parameters - q_params - e_params  # embeddings, lm_head, norms, biases, routers
        terms += [
            Term("weights", "16-bit weights left unquantized (embeddings, lm_head, norms, biases, routers)",
                 rest * b, "(P - P_q) × bytes", {"P": sh.parameters, "P_q": q_params + e_params, "bytes": b}),
            Term("quant_constants", "NF4 block constants (double-quantized absmax, codes)", consts + e_consts,
                 "per tensor: ceil(n/64) + 4·ceil(n/64/256) + 1092" + (
                     "; per expert matrix: ceil(n/64) + 4·ceil(n/64/256) + 4, + 1088 per experts module"
                     if experts else ""),
                 {"blocksize": A.NF4_BLOCKSIZE, "nested_blocksize": A.NF4_NESTED_BLOCKSIZE,
                  "linears": consts, "experts": e_consts}),
        ]
        return terms

    def backward_working_width(self, s: Setup) -> int | None:
        """Width of the gradients flowing through one MoE layer when its experts are NF4: the runtime runs one
        expert at a time (forward, recompute and backward), so an MLP gradient has the T·k/E rows of one expert,
        not the T·k rows of all of them (the 16-bit grouped_mm path). None: the default width applies.
        Measured on tiny Mixtral / Qwen3-MoE / OLMoE (benchmarks/calibrate_moe.py)."""
        sh = s.shape
        if not (sh.num_experts and quantized_experts(s)):
            return None
        return max(sh.hidden_size, ceil(sh.intermediate_size * sh.experts_per_token / sh.num_experts))

    def transients_add_to_working(self, s: Setup) -> bool:
        """Whether a layer's transient buffers (DoRA's weight norm) coexist with its backward gradients. With NF4
        experts the recompute peak is an expert's 4-bit matmul, after the attention's DoRA buffers are freed."""
        return not (s.shape.num_experts and quantized_experts(s))

    def dequant_transient(self, s: Setup) -> Term:
        """The largest weight de-quantized at once: one nn.Linear, or one expert's matrix (never a fused tensor)."""
        candidates = [lin for lin in s.shape.linears if lin.is_linear] + quantized_experts(s)
        lin = max(candidates, key=lambda cand: cand.in_features * cand.out_features)
        n = lin.in_features * lin.out_features
        what = "one expert's" if not lin.is_linear else "largest"
        return Term("transient", f"de-quantized {lin.name} weight ({what})", s.compute_bytes * n,
                    "in × out × bytes", {"module": lin.name, "in": lin.in_features, "out": lin.out_features})
