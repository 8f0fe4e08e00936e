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
        saved += (4 if s.shape.norm in ("rms_gemma", "rms_fp32") else s.compute_bytes) * tokens * h
    return saved


def qk_norm_saved_bytes(s: Setup, trains_norms: bool) -> tuple[int, str]:
    """RMSNorm on q and k (Qwen3, Gemma 3: per head over head_dim; OLMo 2: over the whole projection):
    each saves its fp32 input and 1/rms per normalized row, and with trained norm weights the normed tensor."""
    sh = s.shape
    if not sh.qk_norm:
        return 0, ""
    T, width = s.geometry.tokens, (sh.num_heads + sh.num_kv_heads) * sh.head_dim
    rows = T * (sh.num_heads + sh.num_kv_heads) if sh.qk_norm == "head" else 2 * T
    saved = 4 * T * width + 4 * rows
    formula = "4·T·(a+kv)·d + 4·rows"
    if trains_norms:
        per = 4 if sh.norm in ("rms_gemma", "rms_fp32") else s.compute_bytes
        saved += per * T * width
        formula += f" + {per}·T·(a+kv)·d"
    return saved, formula


def _masked_layers(s: Setup) -> int:
    """Layers whose sdpa call receives an explicit mask (so GQA's k/v are repeated to num_heads): all of
    them with a padding mask; sliding-window layers once the sequence reaches the window."""
    sh, g = s.shape, s.geometry
    if g.attention != "sdpa":
        return 0
    if g.padded:
        return sh.num_layers
    if sh.sliding_layers and g.seq_len >= sh.sliding_window:
        return sh.sliding_layers
    return 0


def attention_saved_bytes(s: Setup) -> tuple[int, dict]:
    """Core attention of one layer (after the projections)."""
    sh, g, e = s.shape, s.geometry, s.compute_bytes
    b, seq, a, d = g.micro_batch_size, g.seq_len, sh.num_heads, sh.head_dim
    T = b * seq
    kv, L = sh.num_kv_heads, sh.num_layers
    # repeat_kv materializes k and v at num_heads: eager always; sdpa when its call gets a mask (padding,
    # a sliding window the sequence reaches) or the head is wider than 256 (transformers' GQA condition)
    if g.attention == "eager" or (g.attention == "sdpa" and d > 256):
        repeated = L
    else:
        repeated = _masked_layers(s)
    saved = e * T * a * d + (2 * e * T * d * (repeated * a + (L - repeated) * kv)) // L  # q, k, v after rotary
    kv = a if repeated == L else kv if repeated == 0 else round((repeated * a + (L - repeated) * kv) / L, 2)
    formula = "e·T·(a·d + 2·kv·d)" + (" (kv: mean over layers)" if 0 < repeated < L else "")
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
        masked = _masked_layers(s)
        if masked:  # sdpa converts a bool mask to an additive one in q's dtype, per call, and saves it
            saved += (e * b * seq * seq * masked) // L
            formula += " + e·b·s² (additive mask" + (", mean over layers)" if masked < L else ")")
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
            # expert outputs × routing weights; router
            saved += e * routed * sh.hidden_size + 12 * tokens * sh.num_experts
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
    qk, qk_formula = qk_norm_saved_bytes(s, method.trains_norms())
    terms = [
        Term("activations", "linear modules (inputs kept for backward)", proj, "per method", proj_inputs),
        Term("activations", "attention (q, k, v, output)", attn, attn_inputs.pop("formula"), attn_inputs),
        *([Term("activations", f"q/k norms ({sh.qk_norm}, fp32 copies)", qk, qk_formula,
                {"T": T, "a": sh.num_heads, "kv": sh.num_kv_heads, "d": sh.head_dim})] if qk else []),
        Term("activations", "MLP internals", mlp, mlp_formula, {"T": T, "i": sh.intermediate_size}),
        Term("activations", "norms (fp32 input copies)", norms, f"{sh.norms_per_layer} × (4·T·h + 4·T)",
             {"T": T, "h": sh.hidden_size}),
    ]
    drop = model_dropout_bytes(s, T)
    if drop:
        terms.append(Term("activations", "residual dropout masks", drop, "2 × mask·T·h", {"T": T}))
    return terms


def outside_layers_terms(s: Setup, method: Method) -> list[Term]:
    """Activations outside the decoder layers, as two terms: what every layer's recomputation still needs in
    backward (ids, labels, masks, rotary tables, embedding indices) and what the final norm and the head save."""
    sh, g, e = s.shape, s.geometry, s.compute_bytes
    T, b, seq = g.tokens, g.micro_batch_size, g.seq_len
    saved = 24 * T  # input_ids, labels (+ shifted copy), int64
    formula = "24·T (ids, labels)"
    mask_bytes = e if g.attention == "eager" else 1
    full_layers = sh.num_layers - sh.sliding_layers
    if g.padded:
        saved += 8 * T  # attention_mask
        masks = (1 if full_layers else 0) + (1 if sh.sliding_layers else 0)  # one 4D mask per attention type
        if g.attention in ("sdpa", "eager"):
            saved += masks * mask_bytes * b * seq * seq  # 4D mask built once per forward
        formula += f" + 8·T + {masks}×mask·b·s²"
    elif g.attention == "sdpa" and sh.sliding_layers and seq >= sh.sliding_window:
        saved += seq * seq  # the sliding-window mask (bool, broadcast over the batch); full layers use is_causal
        formula += " + s² (sliding-window mask)"
    if sh.rotary_width:
        saved += sh.rotary_tables * 2 * e * T * sh.rotary_width  # cos and sin (one pair per rotary table)
        formula += " + cos/sin"
    if method.trains_lm_head():
        saved += 8 * T  # embedding indices, for the embedding's gradient
    if sh.dropouts.get("embedding"):
        saved += (A.DROPOUT_MASK_BYTES.get(s.device_kind) or e) * T * sh.hidden_size
    head = norm_saved_bytes(s, T, method.trains_norms())  # final norm
    head_formula = "final norm"
    if method.trains_lm_head() and s.loss == "full":
        head += e * T * sh.hidden_size  # lm_head's input, for its weight gradient (the chunked loss saves none)
        head_formula += " + e·T·h (lm_head input)"
    return [Term("activations", "inputs, masks and rotary tables (kept for every layer)", saved, formula,
                 {"T": T, "h": sh.hidden_size}),
            Term("activations", "final norm (and the head's input)", head, head_formula, {"T": T, "h": sh.hidden_size})]


def checkpoint_term(s: Setup) -> Term:
    sh, T = s.shape, s.geometry.tokens
    n = s.compute_bytes * T * sh.hidden_size * sh.num_layers
    return Term("activations", "checkpointed layer inputs", n, "L × e·T·h",
                {"L": sh.num_layers, "T": T, "h": sh.hidden_size, "e": s.compute_bytes})


def working_extra(sh) -> int:
    """Bytes per element the backward of some layers holds besides the method's coefficient: a gated MLP with the
    tanh-approximated GELU (Gemma) keeps its backward's temporaries (assumptions.BACKWARD_WORKING_EXTRA)."""
    if sh.gated_mlp and str(sh.activation).startswith("gelu"):
        return A.BACKWARD_WORKING_EXTRA["gated_gelu"]
    return 0


def backward_working_term(s: Setup, method: Method) -> Term:
    sh, T = s.shape, s.geometry.tokens
    # the widest gradient inside the MLP: i, or 2i where gate and up are one fused projection (Phi-3)
    fused = max((lin.out_features for lin in sh.linears if lin.input == "mlp_in" and lin.is_linear), default=0)
    width = max(sh.hidden_size, sh.intermediate_size * (sh.experts_per_token or 1), fused)
    narrower = method.backward_working_width(s)  # NF4 experts run one at a time
    if narrower is not None:
        width = narrower
    c = method.backward_working_coefficient(sh.gated_mlp) + working_extra(sh)
    if s.adapters_in_compute_dtype and method.adapter:  # FSDP2 mixed precision: measured separately
        c = A.BACKWARD_WORKING_BYTES["adapter_fsdp"] + working_extra(sh)
    return Term("transient", "gradients flowing through one layer", c * T * width, f"{c}·T·max(h, i)",
                {"T": T, "width": width})
