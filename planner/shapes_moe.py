"""Model shapes of mixture-of-experts decoders (no torch here), as transformers 5 builds them.

`build(cfg, model_type)` is what `planner.shapes.shape_from_config` calls for the MoE model types. Every builder
lists a decoder layer's modules as `Linear`s: attention and shared/dense MLPs are `nn.Linear` (`is_linear=True`,
4-bit under QLoRA, adapted by "all-linear"); the routed experts are fused 3-D parameters (`is_linear=False`,
`experts` copies, each seeing `top_k / experts` of the tokens), which the bundled runtime stores in NF4 under
qlora/qdora (runtime/moe.py) and which adapters do not target. Routers stay in the compute dtype
(`router_params_per_layer`). Defaults for absent keys follow the transformers 5.23 configuration classes.

- mixtral: attention + 8 experts (top 2), one router per layer.
- qwen3_moe: per-head q/k RMSNorm; `decoder_sparse_step` / `mlp_only_layers` turn some layers into dense MLPs.
- olmoe: q/k RMSNorm over the whole projections (like OLMo 2), pre-norm layers; 64 experts, top 8.
- granitemoe: Granite's scalar multipliers (embedding, residual, attention, logits) — no weights of their own.
- llama4_text / llama4: a shared expert beside the routed ones (top 1); Maverick interleaves MoE layers with dense
  MLPs (`interleave_moe_layer_step` 2, `intermediate_size_mlp`); weightless L2 q/k norm on RoPE layers, every
  fourth layer without RoPE (NoPE). The image-text checkpoint (llama4) adds its vision tower as frozen weights.
- gpt_oss: attention with biases and one learned sink per head, alternating sliding-window (128) and full
  layers, experts with biases and a clamped SwiGLU, a router with a bias. The hub checkpoints store the experts
  in MXFP4; training de-quantizes them (transformers' Mxfp4Config(dequantize=True)), so 16-bit methods hold them in
  16-bit and qlora/qdora re-quantize them to NF4 (runtime/moe.py). No sdpa path (sinks): eager attention.
"""

from __future__ import annotations

from dataclasses import replace

from .architectures import _rope_layers, llama_like
from .shapes import Linear, MalformedConfig, ModelShape, UnsupportedArchitecture, _get

TYPES = ("mixtral", "qwen3_moe", "olmoe", "granitemoe", "llama4_text", "llama4", "gpt_oss")


# the MoE types the two-rank-free CPU calibration measured (benchmarks/calibrate_moe.py, calibration-cpu-moe.csv)
CALIBRATED = ("mixtral", "qwen3_moe", "olmoe")


def _experts(h: int, i: int, n: int, top_k: int, bias: bool = False, share: float = 1.0) -> tuple[Linear, ...]:
    """Routed experts as transformers 5 stores them: fused gate/up [E, 2i, h] and down [E, h, i]."""
    if n < 1 or not 1 <= top_k <= n:
        raise MalformedConfig(f"a mixture-of-experts model needs 1 ≤ experts per token ≤ experts, got {top_k} of {n}")
    active = top_k / n
    return (Linear("gate_up_proj", h, 2 * i, bias, "mlp_in", n, active, is_linear=False, layer_share=share),
            Linear("down_proj", i, h, bias, "mlp_mid", n, active, is_linear=False, layer_share=share))


def _mlp(h: int, i: int, share: float = 1.0) -> tuple[Linear, ...]:
    """A dense SwiGLU MLP of nn.Linear modules (shared expert, dense layers)."""
    names = (("gate_proj", h, i, "mlp_in"), ("up_proj", h, i, "mlp_in"), ("down_proj", i, h, "mlp_mid"))
    return tuple(Linear(n, a, b, False, inp, layer_share=share) for n, a, b, inp in names)


def _base(cfg: dict, like: str, head_dim: int | None = None, kv: int | None = None) -> ModelShape:
    """Attention, norms, embeddings and position handling from the dense builder (no MLP, no experts)."""
    dense = dict(cfg)
    if head_dim is not None:
        dense["head_dim"] = head_dim
    if kv is not None:
        dense["num_key_value_heads"] = kv
    dense.setdefault("intermediate_size", 1)
    return llama_like(dense, like)


def _finish(base: ModelShape, model_type: str, mlp: tuple[Linear, ...], *, experts: int, top_k: int, i: int,
            router: int, notes: tuple[str, ...] = (), **changes) -> ModelShape:
    attention = tuple(lin for lin in base.linears if lin.input in ("attn_in", "attn_out"))
    note = (f"{experts} routed experts per MoE layer, {top_k} per token: fused 3-D parameters (transformers 5), "
            "not nn.Linear — 4-bit under qlora/qdora by the runtime's NF4 experts, not adapted by all-linear")
    return replace(base, model_type=model_type, linears=attention + mlp, intermediate_size=i, num_experts=experts,
                   experts_per_token=top_k, router_params_per_layer=router,
                   calibrated=model_type in CALIBRATED,
                   notes=base.notes + (note,) + notes, **changes)


def _mixtral(cfg: dict, model_type: str) -> ModelShape:
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    n, k = int(_get(cfg, "num_local_experts", default=8)), int(_get(cfg, "num_experts_per_tok", default=2))
    base = _base(cfg, "mixtral")
    return _finish(base, model_type, _experts(h, i, n, k), experts=n, top_k=k, i=i, router=n * h)


def _qwen3_moe(cfg: dict, model_type: str) -> ModelShape:
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    L = int(cfg["num_hidden_layers"])
    d = int(_get(cfg, "head_dim", default=h // heads))  # Qwen3MoeConfig has no head_dim default: h / heads
    i = int(_get(cfg, "moe_intermediate_size", default=768))
    n, k = int(_get(cfg, "num_experts", default=128)), int(_get(cfg, "num_experts_per_tok", default=8))
    base = _base(cfg, "qwen3", head_dim=d, kv=int(_get(cfg, "num_key_value_heads", default=4)))
    step = int(_get(cfg, "decoder_sparse_step", default=1))
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    moe_layers = sum(1 for j in range(L) if j not in dense_layers and step > 0 and (j + 1) % step == 0)
    if moe_layers == L:
        mlp = _experts(h, i, n, k)
        notes: tuple[str, ...] = ()
    else:
        share = moe_layers / L
        mlp = _experts(h, i, n, k, share=share) + _mlp(h, int(cfg["intermediate_size"]), 1 - share)
        notes = (f"{moe_layers} of {L} layers are MoE, the others dense MLPs (mlp_only_layers / decoder_sparse_step)",)
    return _finish(base, model_type, mlp, experts=n, top_k=k, i=i, router=round(n * h * moe_layers / L), notes=notes)


def _olmoe(cfg: dict, model_type: str) -> ModelShape:
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    n, k = int(_get(cfg, "num_experts", default=64)), int(_get(cfg, "num_experts_per_tok", default=8))
    base = _base(cfg, "llama")
    qk = (base.num_heads + base.num_kv_heads) * base.head_dim  # q_norm over heads·d, k_norm over kv·d
    notes = (("q, k and v are clamped to ±clip_qkv (in place: no saved tensor)",) if cfg.get("clip_qkv") else ())
    return _finish(base, model_type, _experts(h, i, n, k), experts=n, top_k=k, i=i, router=n * h,
                   qk_norm="full", extra_layer_params=qk, notes=notes)


def _granitemoe(cfg: dict, model_type: str) -> ModelShape:
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    n, k = int(_get(cfg, "num_local_experts", default=8)), int(_get(cfg, "num_experts_per_tok", default=2))
    base = _base(cfg, "granite")
    return _finish(base, model_type, _experts(h, i, n, k), experts=n, top_k=k, i=i, router=n * h)


def _llama4_decoder(cfg: dict, model_type: str) -> ModelShape:
    h, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    i = int(_get(cfg, "intermediate_size", default=8192))
    i_dense = int(_get(cfg, "intermediate_size_mlp", default=16384))
    n, k = int(_get(cfg, "num_local_experts", default=16)), int(_get(cfg, "num_experts_per_tok", default=1))
    step = int(_get(cfg, "interleave_moe_layer_step", default=1))
    moe = cfg.get("moe_layers")
    moe_layers = len(moe) if isinstance(moe, list) else len(range(step - 1, L, step)) if step > 0 else 0
    rope = _rope_layers(cfg, L)  # Llama4TextConfig, as SmolLM3: every 4th layer (by default) has no RoPE
    base = _base({**cfg, "sliding_window": None}, "llama", head_dim=int(_get(cfg, "head_dim", default=128)))
    share = moe_layers / L
    mlp = _experts(h, i, n, k, share=share) + _mlp(h, i, share)  # routed experts + the shared expert
    notes = [f"a shared expert (SwiGLU, {i}) beside the routed ones; {L - rope} of {L} layers use no RoPE"]
    if share < 1:
        mlp += _mlp(h, i_dense, 1 - share)
        notes.append(f"{moe_layers} of {L} layers are MoE, the others dense MLPs of {i_dense}")
    if cfg.get("attention_chunk_size"):
        notes.append(f"RoPE layers attend within chunks of {cfg['attention_chunk_size']} tokens (a mask; same tensors)")
    return _finish(base, model_type, mlp, experts=n, top_k=k, i=i, router=round(n * h * share), notes=tuple(notes),
                   nope_layers=L - rope, qk_norm="head" if _get(cfg, "use_qk_norm", default=True) else "")


def llama4_vision_params(v: dict, text_hidden: int) -> int:
    """Llama 4's vision tower, its pixel-shuffle adapter and the projector to the text width (transformers 5)."""
    h = int(_get(v, "hidden_size", default=768))
    i = int(_get(v, "intermediate_size", default=5632))
    L = int(_get(v, "num_hidden_layers", default=34))
    p = int(_get(v, "patch_size", default=14))
    patches = (int(_get(v, "image_size", default=448)) // p) ** 2
    channels = int(_get(v, "num_channels", default=3))
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    tower = h + (patches + 1) * h + channels * p * p * h + 4 * h + L * layer
    adapter = (i * int(_get(v, "projector_input_dim", default=4096))
               + int(_get(v, "projector_output_dim", default=4096)) ** 2)
    return tower + adapter + int(_get(v, "vision_output_dim", default=7680)) * text_hidden


def _with_vision(shape: ModelShape, vision: dict, model_type: str) -> ModelShape:
    extra = llama4_vision_params(vision, shape.hidden_size)
    note = (f"image-text checkpoint (Llama4ForConditionalGeneration): the vision tower, adapter and projector "
            f"({extra / 1e6:.0f}M parameters) are frozen 16-bit weights that text training never runs")
    return replace(shape, model_type=model_type, extra_frozen_params=extra, notes=shape.notes + (note,))


def _llama4_text(cfg: dict, model_type: str) -> ModelShape:
    """The text decoder; a `vision_config` beside its keys (the catalog's form of the image-text checkpoints)
    adds the vision tower as frozen weights."""
    shape = _llama4_decoder(cfg, model_type)
    vision = cfg.get("vision_config")
    return _with_vision(shape, vision, model_type) if isinstance(vision, dict) else shape


def _llama4(cfg: dict, model_type: str) -> ModelShape:
    """A Llama 4 config.json as the hub ships it: the decoder under text_config, the vision tower beside it."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedArchitecture("a llama4 config.json without text_config")
    text = {"tie_word_embeddings": cfg.get("tie_word_embeddings", False), **text}
    return _with_vision(_llama4_decoder(text, "llama4_text"), cfg.get("vision_config") or {}, model_type)


def _gpt_oss(cfg: dict, model_type: str) -> ModelShape:
    h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    n = int(_get(cfg, "num_local_experts", default=128))
    k = int(_get(cfg, "num_experts_per_tok", "experts_per_token", default=4))
    base = _base({"attention_bias": True, **cfg}, "llama", head_dim=int(_get(cfg, "head_dim", default=64)))
    notes = (("one learned attention sink per head; experts and router carry biases; clamped SwiGLU "
              f"(limit {_get(cfg, 'swiglu_limit', default=7.0)}): not a calibrated activation formula"),
             ("hub checkpoints store the experts in MXFP4: loaded de-quantized to 16-bit for training "
              "(NF4 again under qlora/qdora)"))
    return _finish(base, model_type, _experts(h, i, n, k, bias=True), experts=n, top_k=k, i=i, router=n * h + n,
                   extra_layer_params=base.extra_layer_params + base.num_heads, supports_sdpa=False, notes=notes)


BUILDERS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe, "granitemoe": _granitemoe,
            "llama4_text": _llama4_text, "llama4": _llama4, "gpt_oss": _gpt_oss}


def build(cfg: dict, model_type: str) -> ModelShape:
    """The `ModelShape` of a MoE config.json (`model_type` as planner.shapes normalised it)."""
    builder = BUILDERS.get(model_type)
    if builder is None:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not a MoE type this estimator knows "
                                      f"({', '.join(TYPES)})")
    return builder(cfg, model_type)


def active_parameters(shape: ModelShape) -> int:
    """Parameters one token runs through: everything but the routed experts it is not sent to."""
    idle = sum(lin.parameters * (1 - lin.active) for lin in shape.linears if not lin.is_linear)
    return shape.decoder_parameters - round(shape.num_layers * idle)

