"""Activation memory: what autograd keeps alive between the forward and backward passes.

Counted per decoder layer from what each op saves in the bundled runtime's models (transformers'
Llama-family, GPT-2, Phi and Falcon code under autocast), independent of the method except for the
linear modules, which the method reports (`Method.projection_saved_bytes`). T = micro_batch × seq_len.
"""

from __future__ import annotations

from . import assumptions as A
from .methods import Method
from .terms import Setup, Term


def norm_saved_bytes(s: Setup, tokens: int, trains_norms: bool) -> int:
    """One norm layer: RMSNorm saves its fp32 input and 1/rms; LayerNorm its fp32 input, mean and rstd."""
    h = s.shape.hidden_size
    if s.shape.norm == "layernorm":
        return 4 * tokens * h + 8 * tokens
    saved = 4 * tokens * h + 4 * tokens
    if trains_norms:  # weight * normed: the normed tensor is saved for the weight's gradient
        saved += (4 if s.shape.norm == "rms_gemma" else s.compute_bytes) * tokens * h
    return saved


def attention_saved_bytes(s: Setup) -> tuple[int, dict]:
    """Core attention of one layer (after the projections)."""
    sh, g, e = s.shape, s.geometry, s.compute_bytes
    b, seq, a, d = g.micro_batch_size, g.seq_len, sh.num_heads, sh.head_dim
    T = b * seq
    kv = sh.num_kv_heads
    if g.attention == "eager" or (g.attention == "sdpa" and g.padded):
        kv = a  # repeat_kv materializes k and v at num_heads (eager; sdpa with a padding mask)
    saved = e * T * a * d + 2 * e * T * kv * d  # q, k, v after rotary
    formula = "e·T·(a·d + 2·kv·d)"
    if sh.fused_qkv_views:
        saved += e * T * (a + sh.num_kv_heads) * d  # v is a view of the fused qkv output: all of it stays
        formula += " + e·T·(a+kv)·d (fused qkv storage)"
    if g.attention == "eager":
        saved += 4 * b * a * seq * seq + e * b * a * seq * seq  # fp32 softmax + its 16-bit copy
        formula += " + (4+e)·b·a·s²"
        if sh.attn_logit_softcap:
            saved += e * b * a * seq * seq  # tanh of the soft-capped scores
            formula += " + e·b·a·s² (softcap)"
    else:
        saved += e * T * a * d + 4 * b * a * seq  # output + fp32 log-sum-exp
        formula += " + e·T·a·d + 4·b·a·s"
    return saved, {"formula": formula, "T": T, "a": a, "kv_saved": kv, "d": d, "e": e}


def mlp_saved_bytes(s: Setup, tokens: int) -> tuple[int, str]:
    """MLP internals besides its linear modules' inputs (reported by the method)."""
    sh, e = s.shape, s.compute_bytes
    i = sh.intermediate_size
    routed = tokens * (sh.experts_per_token or 1)
    if sh.gated_mlp:
        # act(gate) saves gate's output; act(gate) * up saves both factors
        saved = 3 * e * routed * i
        formula = "3·e·T·i" + (" (×top_k routed)" if sh.num_experts else "")
        if sh.num_experts:
            saved += e * routed * sh.hidden_size + 12 * tokens * sh.num_experts  # expert outputs × routing weights; router
            formula += " + e·T·k·h + 12·T·E"
        return saved, formula
    if sh.activation == "gelu_new":
        # 0.5·x·(1 + tanh(√(2/π)(x + 0.044715·x³))): under CUDA autocast pow runs in fp32
        per = 14 if (s.device_kind == "cuda" and e == 2) else 4 * e
        return per * tokens * i, f"{per}·T·i (gelu_new)"
    return e * tokens * i, "e·T·i (activation input)"


def model_dropout_bytes(s: Setup, tokens: int) -> int:
    """Residual dropouts of the model itself (GPT-2 resid_pdrop): one mask each after attention and MLP."""
    p = s.shape.dropouts.get("residual", 0.0)
    if not p:
        return 0
    mask = A.DROPOUT_MASK_BYTES.get(s.device_kind) or s.compute_bytes
    return 2 * mask * tokens * s.shape.hidden_size


def layer_terms(s: Setup, method: Method) -> list[Term]:
    """Saved activations of one decoder layer, as terms."""
    T = s.geometry.tokens
    sh = s.shape
    proj, proj_inputs = method.projection_saved_bytes(s, T)
    attn, attn_inputs = attention_saved_bytes(s)
    mlp, mlp_formula = mlp_saved_bytes(s, T)
    norms = sh.norms_per_layer * norm_saved_bytes(s, T, method.trains_norms())
    terms = [
        Term("activations", "linear modules (inputs kept for backward)", proj, "per method", proj_inputs),
        Term("activations", "attention (q, k, v, output)", attn, attn_inputs.pop("formula"), attn_inputs),
        Term("activations", "MLP internals", mlp, mlp_formula, {"T": T, "i": sh.intermediate_size}),
        Term("activations", "norms (fp32 input copies)", norms, f"{sh.norms_per_layer} × (4·T·h + 4·T)",
             {"T": T, "h": sh.hidden_size}),
    ]
    drop = model_dropout_bytes(s, T)
    if drop:
        terms.append(Term("activations", "residual dropout masks", drop, "2 × mask·T·h", {"T": T}))
    return terms


def outside_layers_terms(s: Setup, method: Method) -> list[Term]:
    """Activations outside the decoder layers: inputs, rotary tables, mask, final norm, lm_head input."""
    sh, g, e = s.shape, s.geometry, s.compute_bytes
    T, b, seq = g.tokens, g.micro_batch_size, g.seq_len
    saved = 24 * T  # input_ids, labels (+ shifted copy), int64
    formula = "24·T (ids, labels)"
    if g.padded:
        saved += 8 * T  # attention_mask
        mask_bytes = e if g.attention == "eager" else 1
        saved += mask_bytes * b * seq * seq  # 4D mask built once per forward
        formula += " + 8·T + mask·b·s²"
    if sh.learned_positions == 0:
        saved += 2 * e * T * sh.head_dim  # cos and sin
    saved += norm_saved_bytes(s, T, method.trains_norms())  # final norm
    if method.trains_lm_head():
        saved += e * T * sh.hidden_size + 8 * T  # lm_head input; embedding indices
    if sh.dropouts.get("embedding"):
        saved += (A.DROPOUT_MASK_BYTES.get(s.device_kind) or e) * T * sh.hidden_size
    return [Term("activations", "outside the layers (inputs, final norm, masks)", saved, formula,
                 {"T": T, "h": sh.hidden_size})]


def logits_term(s: Setup) -> Term:
    """The loss: fp32 log-softmax output plus the two fp32 gradients alive at the start of backward."""
    sh, T = s.shape, s.geometry.tokens
    V = sh.vocab_size
    n = A.LOGIT_FP32_COPIES_AT_PEAK
    total = n * 4 * T * V
    formula = f"{n} × 4·T·V"
    if sh.final_logit_softcap:
        total += s.compute_bytes * T * V
        formula += " + e·T·V (softcap tanh)"
    return Term("logits", "logits and fp32 cross-entropy", total, formula, {"T": T, "V": V})


def checkpoint_term(s: Setup) -> Term:
    sh, T = s.shape, s.geometry.tokens
    n = s.compute_bytes * T * sh.hidden_size * sh.num_layers
    return Term("activations", "checkpointed layer inputs", n, "L × e·T·h",
                {"L": sh.num_layers, "T": T, "h": sh.hidden_size, "e": s.compute_bytes})


def backward_working_term(s: Setup, method: Method) -> Term:
    sh, T = s.shape, s.geometry.tokens
    width = max(sh.hidden_size, sh.intermediate_size * (sh.experts_per_token or 1))
    c = method.backward_working_coefficient(sh.gated_mlp)
    return Term("transient", "gradients flowing through one layer", c * T * width, f"{c}·T·max(h, i)",
                {"T": T, "width": width})
