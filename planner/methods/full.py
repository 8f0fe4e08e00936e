"""Full fine-tuning: every weight trains; gradients and optimizer state for all of them."""

from __future__ import annotations

from .. import assumptions as A
from ..terms import Setup
from .base import Method, Tensors
from .lora import distinct_inputs


class Full(Method):
    name = "full"

    def weight_bytes(self, s: Setup) -> int:
        if s.dtype == "float16" and A.FULL_FT_MASTER_FP32_WITH_FP16:
            return 4  # fp32 master weights under fp16 autocast
        return A.DTYPE_BYTES[s.dtype]

    def trainable_tensors(self, s: Setup) -> list[Tensors]:
        sh, b = s.shape, self.weight_bytes(s)
        L, h = sh.num_layers, sh.hidden_size
        out = [Tensors("token embeddings", sh.vocab_size * h, 1, b)]
        if sh.learned_positions:
            out.append(Tensors("position embeddings", sh.learned_positions * h, 1, b))
        if not sh.tie_embeddings:
            out.append(Tensors("lm_head", sh.vocab_size * h, 1, b))
        if sh.lm_head_bias:
            out.append(Tensors("lm_head bias", sh.vocab_size, 1, b))
        for lin in sh.linears:
            layers = lin.layers(L)  # Llama 4 Maverick: MoE on every other layer
            out.append(Tensors(lin.name, lin.in_features * lin.out_features, layers * lin.experts, b))
            if lin.bias:
                out.append(Tensors(f"{lin.name} bias", lin.out_features, layers * lin.experts, b))
        per_norm = 2 if sh.norm == "layernorm" else 1
        out.append(Tensors("norms", h, per_norm * (sh.norms_per_layer * L + 1), b))
        if sh.router_params_per_layer:
            out.append(Tensors("MoE router", sh.router_params_per_layer, L, b))
        if sh.extra_layer_params:  # q/k norms and other per-layer weights besides linears and norms
            out.append(Tensors("other per-layer weights (q/k norms, …)", sh.extra_layer_params, L, b))
        return out

    def projection_saved_bytes(self, s: Setup, tokens: int) -> tuple[int, dict]:
        # Each linear saves its input for the weight gradient; modules reading the same tensor
        # (q/k/v, gate/up) share one saved copy.
        by_input = distinct_inputs(s, s.shape.linears, tokens, all_experts=True)
        return s.compute_bytes * sum(by_input.values()), {"distinct_inputs(elements)": by_input,
                                                          "bytes": s.compute_bytes}

    def not_yet_graded_bytes(self, s: Setup) -> int:
        sh, b = s.shape, self.weight_bytes(s)
        per_norm = 2 if sh.norm == "layernorm" else 1
        layer = (sh.linear_params_per_layer + sh.router_params_per_layer
                 + per_norm * sh.hidden_size * sh.norms_per_layer + sh.extra_layer_params)
        embeddings = 0 if sh.tie_embeddings else sh.vocab_size * sh.hidden_size  # tied: lm_head graded it first
        return b * (layer + embeddings + sh.learned_positions * sh.hidden_size)

    def trains_norms(self) -> bool:
        return True

    def trains_lm_head(self) -> bool:
        return True

    def backward_working_coefficient(self, gated_mlp: bool) -> int:
        return A.BACKWARD_WORKING_BYTES["full"]


METHOD = Full()
