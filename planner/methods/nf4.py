"""4-bit NF4 storage with double quantization (Dettmers et al. 2023, QLoRA), as bitsandbytes keeps it."""

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


class NF4Storage:
    """Mixin: decoder nn.Linear weights in NF4; everything else in the compute dtype."""

    quantized = True

    def weight_terms(self, s: Setup) -> list[Term]:
        sh, L = s.shape, s.shape.num_layers
        b = s.compute_bytes
        data = consts = q_params = 0
        for lin in sh.linears:
            if not lin.is_linear:
                continue
            d, c = nf4_bytes(lin.in_features * lin.out_features)
            data += d * L * lin.experts
            consts += c * L * lin.experts
            q_params += lin.in_features * lin.out_features * L * lin.experts
        rest = sh.parameters - q_params  # embeddings, lm_head, norms, biases, unquantized experts
        return [
            Term("weights", "4-bit NF4 decoder linear weights", data, "P_q / 2",
                 {"P_q": q_params}),
            Term("weights", "16-bit weights left unquantized (embeddings, lm_head, norms, biases)",
                 rest * b, "(P - P_q) × bytes", {"P": sh.parameters, "P_q": q_params, "bytes": b}),
            Term("quant_constants", "NF4 block constants (double-quantized absmax, codes)", consts,
                 "per tensor: ceil(n/64) + 4·ceil(n/64/256) + 1092",
                 {"blocksize": A.NF4_BLOCKSIZE, "nested_blocksize": A.NF4_NESTED_BLOCKSIZE}),
        ]

    def dequant_transient(self, s: Setup) -> Term:
        lin = max((l for l in s.shape.linears if l.is_linear), key=lambda l: l.in_features * l.out_features)
        n = lin.in_features * lin.out_features
        return Term("transient", f"de-quantized {lin.name} weight (largest)", s.compute_bytes * n,
                    "in × out × bytes", {"module": lin.name, "in": lin.in_features, "out": lin.out_features})
