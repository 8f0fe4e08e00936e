"""Closed-form shape builders, one per family of `model_type`s (no torch here).

Defaults for absent keys follow the transformers 5 configuration classes (a key present with JSON
null is None, not the default). What a family adds to the Llama layout:

- q/k norms (Qwen3, Gemma 3: RMSNorm over head_dim per head; OLMo 2: over the whole projection);
- sliding-window layers (Mistral and Phi-3 when `sliding_window` is set, Gemma 2 every other layer,
  Gemma 3 five of six, Qwen2/3 with `use_sliding_window`): same weights, other masks (activations.py);
- Gemma's sandwich norms (4 per layer) and 1 + w RMSNorm in fp32; OLMo 2's post-norms in fp32;
- SmolLM3's NoPE layers and Granite's scalar multipliers: no weight and no saved tensor of their own;
- Gemma 3 multimodal checkpoints: the text decoder from `text_config`, and the SigLIP vision tower and
  projector the runtime loads with it (Gemma3ForConditionalGeneration) as frozen weights.
"""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from .shapes import Linear, ModelShape, UnsupportedArchitecture, _get

GEMMA = ("gemma", "gemma2", "gemma3_text")
TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text", "smollm3")
QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}


def _attention_layout(cfg: dict, model_type: str) -> tuple[int, int, int, int]:
    """(hidden, heads, kv heads, head_dim) with each config class's defaults."""
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(_get(cfg, "num_key_value_heads", default=32 if model_type == "qwen3" else heads))
    d_default = 128 if model_type == "qwen3" else 256 if model_type in GEMMA else h // heads
    d = int(_get(cfg, "head_dim", default=d_default))
    return h, heads, kv, d


def _sliding_layers(cfg: dict, model_type: str, layers: int) -> tuple[int | None, int]:
    """(window, number of sliding-window layers), as transformers assigns `layer_types`."""
    types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if model_type == "mistral" and "sliding_window" not in cfg:
        window = 4096  # MistralConfig default (MixtralConfig's is None)
    if model_type in GEMMA[1:] and "sliding_window" not in cfg:
        window = 4096
    if isinstance(types, list) and types:
        n = sum(1 for t in types[:layers] if t == "sliding_attention")
        return (int(window), n) if window and n else (None, 0)
    if not window:
        return None, 0
    window = int(window)
    if model_type == "gemma2":
        return window, ceil(layers / 2)  # layers 0, 2, 4, … slide
    if model_type == "gemma3_text":
        p = int(_get(cfg, "sliding_window_pattern", "_sliding_window_pattern", default=6))
        return window, sum(1 for i in range(layers) if (i + 1) % p)
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return None, 0
        first = int(_get(cfg, "max_window_layers", default=28))
        return window, max(0, layers - first)
    if model_type == "smollm3":
        if not cfg.get("use_sliding_window", False):
            return None, 0
        return window, layers - _rope_layers(cfg, layers)
    if model_type in ("mistral", "mixtral", "phi3"):
        return window, layers  # the sliding mask function applies to every layer
    return None, 0


def _rope_layers(cfg: dict, layers: int) -> int:
    """SmolLM3: layers that apply rotary embeddings (no_rope_layers[i] == 1), default every 4th without."""
    flags = cfg.get("no_rope_layers")
    if isinstance(flags, list) and flags:
        return sum(1 for f in flags[:layers] if f)
    interval = int(_get(cfg, "no_rope_layer_interval", default=4))
    return sum(1 for i in range(layers) if (i + 1) % interval != 0)


def llama_like(cfg: dict, model_type: str) -> ModelShape:
    h, heads, kv, d = _attention_layout(cfg, model_type)
    i = int(cfg["intermediate_size"])
    L = int(cfg["num_hidden_layers"])
    bias = bool(cfg.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or bias
    o_bias = bias and model_type != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    attn = (
        Linear("q_proj", h, heads * d, qkv_bias, "attn_in"),
        Linear("k_proj", h, kv * d, qkv_bias, "attn_in"),
        Linear("v_proj", h, kv * d, qkv_bias, "attn_in"),
        Linear("o_proj", heads * d, h, o_bias, "attn_out"),
    )
    if model_type == "phi3":  # fused projections
        attn = (
            Linear("qkv_proj", h, heads * d + 2 * kv * d, False, "attn_in"),
            Linear("o_proj", heads * d, h, False, "attn_out"),
        )
        mlp = (Linear("gate_up_proj", h, 2 * i, False, "mlp_in"), Linear("down_proj", i, h, False, "mlp_mid"))
    else:
        mlp = (
            Linear("gate_proj", h, i, mlp_bias, "mlp_in"),
            Linear("up_proj", h, i, mlp_bias, "mlp_in"),
            Linear("down_proj", i, h, mlp_bias, "mlp_mid"),
        )
    qk = QK_NORM.get(model_type, "")
    qk_params = {"head": 2 * d, "full": (heads + kv) * d}.get(qk, 0)
    window, sliding = _sliding_layers(cfg, model_type, L)
    notes: list[str] = []
    if sliding:
        notes.append(f"{sliding} of {L} layers attend through a {window}-token sliding window")
    nope = L - _rope_layers(cfg, L) if model_type == "smollm3" else 0
    if nope:
        notes.append(f"{nope} of {L} layers use no rotary embedding (NoPE): no change in saved tensors")
    rotary_dim = None
    factor = cfg.get("partial_rotary_factor")
    if factor is not None and float(factor) != 1.0:
        rotary_dim = int(d * float(factor))
    logits_scaling = _get(cfg, "logits_scaling") if model_type == "granite" else None
    if logits_scaling is not None and float(logits_scaling) == 1.0:
        logits_scaling = None
    if logits_scaling is not None:
        notes.append(f"logits are divided by logits_scaling = {logits_scaling:g}: one more T×V tensor at the loss")
    if model_type == "olmo2":
        notes.append("OLMo 2 normalizes after attention and MLP (no input norm): q/k/v and the MLP read the residual "
                     "stream")
    return ModelShape(
        model_type=model_type,
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=i,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=_get(cfg, "max_position_embeddings", "max_sequence_length"),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=model_type in TIED_BY_DEFAULT)),
        linears=attn + mlp,
        norm="rms_gemma" if model_type in GEMMA else "rms_fp32" if model_type == "olmo2" else "rms",
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        # transformers' defaults: Gemma's configs use the tanh-approximated GELU, the others SiLU
        activation=str(_get(cfg, "hidden_activation", "hidden_act",
                            default="gelu_pytorch_tanh" if model_type in GEMMA else "silu")),
        final_logit_softcap=_get(cfg, "final_logit_softcapping"),
        attn_logit_softcap=_get(cfg, "attn_logit_softcapping"),
        dropouts={"attention": float(_get(cfg, "attention_dropout", default=0.0))},
        extra_layer_params=qk_params,
        supports_sdpa=model_type != "gemma2",
        fused_qkv_views=model_type == "phi3",
        qk_norm=qk,
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        rotary_tables=2 if model_type == "gemma3_text" and 0 < sliding < L else 1,
        rotary_dim=rotary_dim,
        nope_layers=nope,
        input_norm=model_type != "olmo2",
        logits_scaling=logits_scaling,
        notes=tuple(notes),
    )


def siglip_params(v: dict) -> int:
    """Parameters of a SigLIP vision tower (transformers SiglipVisionModel), from its vision_config."""
    h = int(_get(v, "hidden_size", default=768))
    i = int(_get(v, "intermediate_size", default=3072))
    L = int(_get(v, "num_hidden_layers", default=12))
    p = int(_get(v, "patch_size", default=16))
    image = int(_get(v, "image_size", default=224))
    channels = int(_get(v, "num_channels", default=3))
    embeddings = channels * p * p * h + h + (image // p) ** 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    head = 0
    if v.get("vision_use_head", True):  # attention-pooling head: probe, MHA, LayerNorm, MLP
        head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return embeddings + L * layer + 2 * h + head


def gemma3_multimodal(cfg: dict, model_type: str) -> ModelShape:
    """A Gemma 3 image-text checkpoint: shapes of its text decoder, plus the vision tower as frozen weights."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedArchitecture("a gemma3 config.json without text_config")
    text = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text}
    shape = llama_like(text, "gemma3_text")
    vision = cfg.get("vision_config") or {}
    vh = int(_get(vision, "hidden_size", default=768))
    extra = siglip_params(vision) + vh * shape.hidden_size + vh  # + projector weight and its soft-embedding norm
    note = (f"multimodal checkpoint: the runtime loads Gemma3ForConditionalGeneration; its SigLIP vision tower and "
            f"projector ({extra / 1e6:.0f}M parameters) are counted as frozen 16-bit weights (text training never "
            "runs them; all-linear adapters on them are not counted)")
    return replace(shape, model_type="gemma3", extra_frozen_params=extra, notes=shape.notes + (note,))


def granite_hybrid(cfg: dict, model_type: str) -> ModelShape:
    """Granite 4 (granitemoehybrid) when every layer is attention and there are no experts (granite-4.0-micro)."""
    L = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * L
    if any(t not in ("attention", "full_attention") for t in types[:L]):
        raise UnsupportedArchitecture("granitemoehybrid with Mamba layers is not one the closed form knows")
    if int(_get(cfg, "num_local_experts", default=8)) > 0:
        raise UnsupportedArchitecture("granitemoehybrid with experts is not one the closed form knows")
    h, i = int(cfg["hidden_size"]), int(_get(cfg, "shared_intermediate_size", default=1024))
    base = llama_like({**cfg, "intermediate_size": i, "model_type": "granite"}, "granite")  # attention, norms, scaling
    linears = base.linears[:4] + (
        Linear("input_linear", h, 2 * i, False, "mlp_in"),  # gate and up, fused
        Linear("output_linear", i, h, False, "mlp_mid"),
    )
    rope = cfg.get("position_embedding_type") == "rope"
    return replace(base, model_type=model_type, linears=linears, rotary_dim=None if rope else 0,
                   notes=base.notes + (("no position embedding (NoPE)",) if not rope else ()))

def gpt2(cfg: dict, model_type: str = "gpt2") -> ModelShape:
    h = int(_get(cfg, "n_embd", "hidden_size"))
    heads = int(_get(cfg, "n_head", "num_attention_heads"))
    i = int(_get(cfg, "n_inner", default=4 * h))
    n_pos = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))
    return ModelShape(
        model_type="gpt2",
        hidden_size=h,
        num_layers=int(_get(cfg, "n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        intermediate_size=i,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=n_pos,
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=True)),
        linears=(  # Conv1D modules; peft handles them as linear (fan_in_fan_out)
            Linear("c_attn", h, 3 * h, True, "attn_in"),
            Linear("c_proj", h, h, True, "attn_out"),
            Linear("c_fc", h, i, True, "mlp_in"),
            Linear("c_proj", i, h, True, "mlp_mid"),
        ),
        norm="layernorm",
        norms_per_layer=2,
        gated_mlp=False,
        activation=str(_get(cfg, "activation_function", default="gelu_new")),
        learned_positions=n_pos,
        dropouts={
            "residual": float(_get(cfg, "resid_pdrop", default=0.1)),
            "embedding": float(_get(cfg, "embd_pdrop", default=0.1)),
            "attention": float(_get(cfg, "attn_pdrop", default=0.1)),
        },
    )


def phi(cfg: dict, model_type: str = "phi") -> ModelShape:
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    d = h // heads
    i = int(cfg["intermediate_size"])
    return ModelShape(
        model_type="phi",
        hidden_size=h,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=i,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=_get(cfg, "max_position_embeddings", "max_sequence_length"),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        linears=(
            Linear("q_proj", h, heads * d, True, "attn_in"),
            Linear("k_proj", h, kv * d, True, "attn_in"),
            Linear("v_proj", h, kv * d, True, "attn_in"),
            Linear("dense", heads * d, h, True, "attn_out"),
            Linear("fc1", h, i, True, "attn_in"),  # parallel block: MLP reads the same normed input
            Linear("fc2", i, h, True, "mlp_mid"),
        ),
        norm="layernorm",
        norms_per_layer=1,
        gated_mlp=False,
        activation=str(_get(cfg, "hidden_act", default="gelu_new")),
        lm_head_bias=True,
        dropouts={
            "residual": float(_get(cfg, "resid_pdrop", default=0.0)),
            "embedding": float(_get(cfg, "embd_pdrop", default=0.0)),
            "attention": float(_get(cfg, "attention_dropout", default=0.0)),
        },
    )


def falcon(cfg: dict, model_type: str = "falcon") -> ModelShape:
    h = int(cfg["hidden_size"])
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    d = h // heads
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    if new_arch:
        kv = int(_get(cfg, "num_kv_heads", default=heads))
    else:
        kv = 1 if cfg.get("multi_query", True) else heads
    bias = bool(cfg.get("bias", False))
    i = int(_get(cfg, "ffn_hidden_size", default=4 * h))
    parallel = bool(cfg.get("parallel_attn", True))
    return ModelShape(
        model_type="falcon",
        hidden_size=h,
        num_layers=int(_get(cfg, "num_hidden_layers", "n_layer")),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=i,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=_get(cfg, "max_position_embeddings", default=2048),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=True)),
        linears=(
            Linear("query_key_value", h, (heads + 2 * kv) * d, bias, "attn_in"),
            Linear("dense", h, h, bias, "attn_out"),
            Linear("dense_h_to_4h", h, i, bias, "attn_in" if parallel else "mlp_in"),
            Linear("dense_4h_to_h", i, h, bias, "mlp_mid"),
        ),
        norm="layernorm",
        norms_per_layer=2 if new_arch else (1 if parallel else 2),
        gated_mlp=False,
        activation=str(_get(cfg, "activation", default="gelu")),
        calibrated=False,
        dropouts={
            "residual": float(_get(cfg, "hidden_dropout", default=0.0)),
            "attention": float(_get(cfg, "attention_dropout", default=0.0)),
        },
    )


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
              "smollm3", "granite")
BUILDERS = {
    **{t: llama_like for t in LLAMA_LIKE},
    "gemma3": gemma3_multimodal,
    "granitemoehybrid": granite_hybrid,
    "gpt2": gpt2,
    "phi": phi,
    "falcon": falcon,
}
