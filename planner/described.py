"""A `ModelShape` for any architecture, from the plain description `runtime.exact.describe` returns.

The description comes from the model instantiated on the meta device (torch side); this module only
reads the dictionary, so the planner still never imports torch. The weights are exact (every
parameter counted, whatever the layout); the activation formulas are the Llama-family ones applied to
the described modules, which is why the shape is marked `calibrated=False` and `estimate` traces
such a model exactly (runtime.exact.trace) instead of trusting the closed form.
"""

from __future__ import annotations

from dataclasses import replace

from .shapes import Linear, ModelShape, UnsupportedArchitecture

_GUESS_INPUT = (  # when the forward pass could not run on meta tensors: by module name
    (("q_proj", "k_proj", "v_proj", "qkv", "query", "key", "value", "c_attn", "wqkv", "in_proj"), "attn_in"),
    (("o_proj", "out_proj", "attn.c_proj", "attention.dense", "self_attn.dense", "wo"), "attn_out"),
    (("gate", "up_proj", "fc1", "c_fc", "w1", "w3", "h_to_4h", "input_linear", "fc_in"), "mlp_in"),
    (("down", "fc2", "mlp.c_proj", "w2", "4h_to_h", "output_linear", "fc_out"), "mlp_mid"),
)


def _input_of(lin: dict) -> str:
    if lin.get("input"):
        return str(lin["input"])
    path = str(lin.get("path", lin["name"])).lower()
    for words, label in _GUESS_INPUT:
        if any(w in path for w in words):
            return label
    return "attn_in"


def _is_qk_norm(path: str) -> bool:
    leaf = path.split(".")[-1].lower()
    return leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm", "q_ln", "k_ln")


def _dropouts(d: dict) -> dict:
    raw = d.get("dropouts") or {}

    def first(*keys):
        return next((float(raw[k]) for k in keys if raw.get(k)), 0.0)

    return {"residual": first("resid_pdrop", "hidden_dropout", "residual_dropout"),
            "embedding": first("embd_pdrop", "embedding_dropout"),
            "attention": first("attn_pdrop", "attention_dropout")}


def shape_from_description(d: dict) -> ModelShape:
    """A `ModelShape` (calibrated=False) from `runtime.exact.describe(config)`."""
    try:
        return _build(d)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise UnsupportedArchitecture(f"cannot read the model description ({type(exc).__name__}: {exc})") from None


def _build(d: dict) -> ModelShape:
    h = int(d["hidden_size"])
    L = int(d["num_layers"])
    if not d["linears"]:
        raise UnsupportedArchitecture(f"{d.get('class', 'the model')}: no linear modules in its decoder layers")
    linears = tuple(Linear(str(lin["name"]), int(lin["in_features"]), int(lin["out_features"]), bool(lin["bias"]),
                           _input_of(lin)) for lin in d["linears"])
    by_input: dict[str, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    inter = d.get("intermediate_size")
    if not inter:  # the widest output that is not the fused attention projection feeds the MLP's last linear
        inter = max((lin.in_features for lin in linears if lin.out_features == h and lin.in_features != h),
                    default=4 * h)
    inter = int(inter)
    gated = any(sum(1 for lin in group if lin.out_features == inter) >= 2 for group in by_input.values()) or any(
        lin.out_features == 2 * inter for lin in linears)
    norms = list(d.get("norms", ()))
    other_norms = [n for n in norms if int(n["width"]) != h or _is_qk_norm(str(n["path"]))]
    hidden_norms = [n for n in norms if n not in other_norms]
    # a norm with a bias (2·h parameters) is a LayerNorm; weight-only norms (RMSNorm, Cohere's bias-free
    # LayerNorm) count h parameters each
    layernorm = any(n.get("bias") for n in hidden_norms)
    heads, kv, hd = int(d["num_heads"]), int(d["num_kv_heads"]), int(d["head_dim"])
    qk = ""
    if other_norms:
        qk = "head" if all(int(n["width"]) == hd for n in other_norms) else "full"
    layer_params = d.get("layer_params") or []
    norm_in_layer = sum(int(n["params"]) for n in hidden_norms)
    per_norm = 2 if layernorm else 1
    described_layer = sum(lin.parameters for lin in linears) + len(hidden_norms) * per_norm * h
    if layer_params:  # everything in a layer besides its linears and hidden-width norms (q/k norms, scales, …)
        extra_layer = sum(int(p) for p in layer_params) // len(layer_params) - described_layer
    else:
        extra_layer = sum(int(n["params"]) for n in other_norms)
    notes = [f"{d.get('class', d.get('model_type'))}: shapes read from the model built on the meta device "
             "(runtime.exact.describe); activations use the Llama-family formulas, not calibrated for this "
             "architecture"]
    if norm_in_layer != len(hidden_norms) * per_norm * h:
        notes.append("the decoder layer's norms are not plain LayerNorm/RMSNorm weights: counted per described module")
    if layer_params and len(set(layer_params)) > 1:
        notes.append(f"decoder layers differ ({min(layer_params):,}–{max(layer_params):,} parameters): "
                     "layer 0 stands for all in the activation formulas; the parameter total is exact")
    shape = ModelShape(
        model_type=str(d.get("model_type")),
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hd,
        intermediate_size=inter,
        vocab_size=int(d["vocab_size"]),
        max_positions=d.get("max_positions"),
        tie_embeddings=bool(d["tie_embeddings"]),
        linears=linears,
        norm="layernorm" if layernorm else "rms",
        norms_per_layer=len(hidden_norms),
        gated_mlp=gated,
        activation=str(d.get("activation", "unknown")),
        learned_positions=int(d.get("learned_positions", 0)),
        lm_head_bias=bool(d.get("lm_head_bias", False)),
        dropouts=_dropouts(d),
        extra_layer_params=max(extra_layer, 0),
        supports_sdpa=bool(d.get("supports_sdpa", True)),
        calibrated=False,
        qk_norm=qk,
        notes=tuple(notes),
    )
    rest = int(d["parameters"]) - shape.decoder_parameters
    if rest < 0:
        notes.append("the described layers hold fewer parameters than layer 0's modules: total over-counted by "
                     f"{-rest:,}")
    return replace(shape, extra_frozen_params=max(rest, 0), notes=tuple(notes))
