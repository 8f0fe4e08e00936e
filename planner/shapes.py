"""Model shapes from a Hugging Face `config.json`: every tensor the estimator needs to count.

`shape_from_config` understands the architectures below and raises `UnsupportedArchitecture` for
the rest. Each builder lists the decoder layer's linear modules under the names peft targets
(`q_proj`, `c_attn`, ...), with their in/out features, so adapters and 4-bit storage are counted
per real module (GQA's smaller k/v projections, fused projections, MoE experts).
Defaults for absent keys follow the transformers configuration classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Linear:
    """One linear module of a decoder layer (`experts` copies for MoE experts)."""

    name: str  # leaf module name, as peft's target_modules matches it
    in_features: int
    out_features: int
    bias: bool = False
    input: str = "attn_in"  # which activation feeds it: attn_in | attn_out | mlp_in | mlp_mid
    experts: int = 1  # copies in the layer (MoE)
    active: float = 1.0  # fraction of tokens each copy sees (MoE: top_k / experts)
    is_linear: bool = True  # False: a fused 3D parameter (transformers 5 MoE experts), not an nn.Linear

    @property
    def parameters(self) -> int:
        return self.experts * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None
    tie_embeddings: bool
    linears: tuple[Linear, ...]  # per decoder layer
    norm: str = "rms"  # rms | layernorm | rms_gemma (computes in fp32, scales by 1 + w)
    norms_per_layer: int = 2
    gated_mlp: bool = True
    activation: str = "silu"
    learned_positions: int = 0  # rows of a learned position embedding (GPT-2)
    lm_head_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    router_params_per_layer: int = 0
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    parallel_block: bool = False  # attention and MLP read the same normed input (Falcon, Phi-2)
    dropouts: dict = field(default_factory=dict)  # residual/embedding/attention dropout probabilities
    extra_layer_params: int = 0  # per layer, besides linears and norms (e.g. q/k norms)
    supports_sdpa: bool = True  # transformers has an sdpa path for this architecture
    fused_qkv_views: bool = False  # q/k/v are views of one fused projection output (Phi-3): v keeps it all alive
    calibrated: bool = True  # the activation formulas were checked against measured training steps

    @property
    def norm_params(self) -> int:
        per = self.hidden_size * (2 if self.norm == "layernorm" else 1)
        return per * (self.norms_per_layer * self.num_layers + 1)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size + self.learned_positions * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return head + (self.vocab_size if self.lm_head_bias else 0)

    @property
    def linear_params_per_layer(self) -> int:
        return sum(lin.parameters for lin in self.linears)

    @property
    def parameters(self) -> int:
        layer = self.linear_params_per_layer + self.router_params_per_layer + self.extra_layer_params
        return self.embedding_params + self.lm_head_params + self.norm_params + self.num_layers * layer

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(lin.name for lin in self.linears))


def _get(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _llama_like(cfg: dict, model_type: str) -> ModelShape:
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    d = int(_get(cfg, "head_dim", default=h // heads))
    i = int(cfg["intermediate_size"])
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = bool(cfg.get("attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    tie_default = model_type in ("gemma2", "gemma")
    experts = int(_get(cfg, "num_local_experts", default=0))
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
    elif experts:
        top_k = int(_get(cfg, "num_experts_per_tok", default=2))
        share = top_k / experts
        mlp = (  # transformers 5: experts are fused 3D parameters, not nn.Linear
            Linear("gate_up_proj", h, 2 * i, False, "mlp_in", experts, share, is_linear=False),
            Linear("down_proj", i, h, False, "mlp_mid", experts, share, is_linear=False),
        )
    else:
        mlp = (
            Linear("gate_proj", h, i, mlp_bias, "mlp_in"),
            Linear("up_proj", h, i, mlp_bias, "mlp_in"),
            Linear("down_proj", i, h, mlp_bias, "mlp_mid"),
        )
    gemma = model_type in ("gemma2", "gemma")
    return ModelShape(
        model_type=model_type,
        hidden_size=h,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d,
        intermediate_size=i,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=_get(cfg, "max_position_embeddings", "max_sequence_length"),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=tie_default)),
        linears=attn + mlp,
        norm="rms_gemma" if gemma else "rms",
        norms_per_layer=4 if model_type == "gemma2" else 2,
        activation=str(_get(cfg, "hidden_activation", "hidden_act", default="silu")),
        num_experts=experts,
        experts_per_token=int(_get(cfg, "num_experts_per_tok", default=0)) if experts else 0,
        router_params_per_layer=experts * h,
        final_logit_softcap=_get(cfg, "final_logit_softcapping"),
        attn_logit_softcap=_get(cfg, "attn_logit_softcapping"),
        dropouts={"attention": float(_get(cfg, "attention_dropout", default=0.0))},
        supports_sdpa=model_type != "gemma2",
        fused_qkv_views=model_type == "phi3",
        calibrated=model_type != "mixtral",
    )


def _gpt2(cfg: dict) -> ModelShape:
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


def _phi(cfg: dict) -> ModelShape:
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
        parallel_block=True,
        dropouts={
            "residual": float(_get(cfg, "resid_pdrop", default=0.0)),
            "embedding": float(_get(cfg, "embd_pdrop", default=0.0)),
            "attention": float(_get(cfg, "attention_dropout", default=0.0)),
        },
    )


def _falcon(cfg: dict) -> ModelShape:
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
        parallel_block=parallel,
        calibrated=False,
        dropouts={
            "residual": float(_get(cfg, "hidden_dropout", default=0.0)),
            "attention": float(_get(cfg, "attention_dropout", default=0.0)),
        },
    )


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral", "gemma2", "gemma", "phi3")
SUPPORTED = _LLAMA_LIKE + ("gpt2", "phi", "falcon")


def shape_from_config(cfg: dict) -> ModelShape:
    """Build a `ModelShape` from a config.json dictionary."""
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type == "refinedwebmodel":
        model_type = "falcon"
    try:
        if model_type in _LLAMA_LIKE:
            return _llama_like(cfg, model_type)
        if model_type == "gpt2":
            return _gpt2(cfg)
        if model_type == "phi":
            return _phi(cfg)
        if model_type == "falcon":
            return _falcon(cfg)
    except KeyError as exc:
        raise UnsupportedArchitecture(f"config.json of model_type {model_type!r} lacks the key {exc.args[0]!r}") from None
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not one the closed-form estimator knows ({', '.join(SUPPORTED)})"
    )
