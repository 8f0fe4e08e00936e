"""A model's config.json checked at the boundary: the numbers the closed form reads must be numbers.

A hand-edited or hostile config.json can hold zero layers, a string head count, null, a list, NaN, 10^400 or a
negative vocabulary. Read blindly, those become a ZeroDivisionError, a TypeError, or worse a negative parameter
count that "fits". Every problem is reported at once, naming the file and the key.
"""

from __future__ import annotations

import math

# Structural sizes: whole numbers ≥ 1 where present (None / absent means "the architecture's default").
POSITIVE_INTS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "max_sequence_length", "num_local_experts",
    "num_experts", "num_experts_per_tok", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
    "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size", "num_kv_heads", "n_head_kv",
    "sliding_window", "num_shared_experts", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "decoder_sparse_step", "interleave_moe_layer_step",
    "intermediate_size_mlp", "no_rope_layer_interval", "sliding_window_pattern",
)
# Counts where 0 means "none" (a dense model: Granite 4.0 micro writes num_local_experts = 0): whole numbers ≥ 0.
ZERO_MEANS_NONE = ("num_local_experts", "num_experts", "num_experts_per_tok", "num_shared_experts",
                   "first_k_dense_replace", "shared_expert_intermediate_size")
FINITE_FLOATS = ("final_logit_softcapping", "attn_logit_softcapping", "logits_scaling", "logit_scale",
                 "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout")
MAX_SIZE = 2**31 - 1  # no real dimension comes near it; larger values overflow the byte arithmetic's meaning


def config_problems(cfg: dict, prefix: str = "") -> list[str]:
    """Every malformed number in `cfg` (and in its `text_config`, for multimodal checkpoints)."""
    problems = []
    for key in POSITIVE_INTS:
        if key not in cfg or cfg[key] is None:
            continue
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"{prefix}{key} must be a whole number, got {_short(v)}")
        elif not (low := 0 if key in ZERO_MEANS_NONE else 1) <= v <= MAX_SIZE:
            problems.append(f"{prefix}{key} must be between {low} and {MAX_SIZE:,}, got {_short(v)}")
    for key in FINITE_FLOATS:
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e12:
            problems.append(f"{prefix}{key} must be a finite number below 1e12, got {_short(v)}")
    if "model_type" in cfg and not isinstance(cfg["model_type"], str):
        problems.append(f"{prefix}model_type must be a string, got {_short(cfg['model_type'])}")
    if "tie_word_embeddings" in cfg and cfg["tie_word_embeddings"] is not None \
            and not isinstance(cfg["tie_word_embeddings"], bool):
        problems.append(f"{prefix}tie_word_embeddings must be true or false, got {_short(cfg['tie_word_embeddings'])}")
    sub = cfg.get("text_config")
    if isinstance(sub, dict) and not prefix:
        problems += config_problems(sub, "text_config.")
    return problems


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else \
        f"a {len(str(abs(value)))}-digit number"
    return text if len(text) <= 60 else text[:50] + "…"
