"""Model shapes: every tensor the estimator needs to count, as plain frozen values.

`shape_from_config` reads a Hugging Face `config.json` for the architectures the closed form knows
(builders in `planner.architectures`; MoE builders in `planner.shapes_moe`) and raises
`UnsupportedArchitecture` for the rest. `shape_from_description` builds a shape for *any* architecture
from the plain description `runtime.exact.describe` returns (the model instantiated on the meta
device): it is marked `calibrated=False`. Each shape lists the decoder layer's linear modules under
the names peft targets (`q_proj`, `c_attn`, ...), with their in/out features, so adapters and 4-bit
storage are counted per real module (GQA's smaller k/v projections, fused projections, MoE experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class UnsupportedArchitecture(ValueError):
    pass


class MalformedConfig(UnsupportedArchitecture):
    """A model_type the closed form knows, with a config.json it cannot read (a key missing, a wrong type)."""


@dataclass(frozen=True)
class Linear:
    """One linear module of a decoder layer (`experts` copies for MoE experts)."""

    name: str  # leaf module name, as peft's target_modules matches it
    in_features: int
    out_features: int
    bias: bool = False
    input: str = "attn_in"  # which activation feeds it: attn_in | attn_out | mlp_in | mlp_mid (or in<k>, described)
    experts: int = 1  # copies in the layer (MoE)
    active: float = 1.0  # fraction of tokens each copy sees (MoE: top_k / experts)
    is_linear: bool = True  # False: a fused 3D parameter (transformers 5 MoE experts), not an nn.Linear
    # the share of the decoder layers that have this module (Llama 4 Maverick: MoE on every other layer, a dense
    # MLP on the others); per-layer figures (`parameters`) are averages over the layers
    layer_share: float = 1.0

    @property
    def parameters(self) -> int:
        one = self.experts * (self.in_features * self.out_features + (self.out_features if self.bias else 0))
        return one if self.layer_share == 1.0 else round(one * self.layer_share)

    def layers(self, num_layers: int) -> int:
        """How many of `num_layers` decoder layers have this module."""
        return round(num_layers * self.layer_share)


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
    # rms: x.to(dtype) * w | layernorm | rms_gemma: fp32, scales by 1 + w | rms_fp32: (w * x_fp32).to(dtype) (OLMo 2)
    norm: str = "rms"
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
    dropouts: dict = field(default_factory=dict)  # residual/embedding/attention dropout probabilities
    extra_layer_params: int = 0  # per layer, besides linears and norms (q/k norms)
    supports_sdpa: bool = True  # transformers has an sdpa path for this architecture
    fused_qkv_views: bool = False  # q/k/v are views of one fused projection output (Phi-3): v keeps it all alive
    calibrated: bool = True  # the activation formulas were checked against measured training steps
    # -- attention variants ------------------------------------------------------------------------
    qk_norm: str = ""  # "": none | "head": RMSNorm over head_dim per head (Qwen3, Gemma 3) | "full": over a·d (OLMo 2)
    sliding_window: int | None = None  # window of the sliding-window layers
    sliding_layers: int = 0  # how many layers attend through the sliding window (the others: full causal)
    rotary_tables: int = 1  # cos/sin tables per forward (Gemma 3: one per layer type, local and global)
    rotary_dim: int | None = None  # rotated dimensions per head (partial rotary); None: head_dim
    nope_layers: int = 0  # layers without rotary embedding (SmolLM3): same saved tensors
    input_norm: bool = True  # a norm reads each layer's input (pre-norm); False: OLMo 2 normalizes outputs only
    # -- outside the decoder -----------------------------------------------------------------------
    extra_frozen_params: int = 0  # loaded but never run by text training (a multimodal checkpoint's vision tower)
    logits_scaling: float | None = None  # Granite: logits / scaling, one more T×V tensor at the loss
    notes: tuple[str, ...] = ()  # what the builder assumed, for the report

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
    def decoder_parameters(self) -> int:
        """Embeddings, decoder layers, final norm and head: what text training runs."""
        layer = self.linear_params_per_layer + self.router_params_per_layer + self.extra_layer_params
        return self.embedding_params + self.lm_head_params + self.norm_params + self.num_layers * layer

    @property
    def parameters(self) -> int:
        return self.decoder_parameters + self.extra_frozen_params

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(lin.name for lin in self.linears))

    @property
    def rotary_width(self) -> int:
        """Width of one cos (or sin) table row: 0 without rotary embeddings."""
        if self.learned_positions:
            return 0
        return self.head_dim if self.rotary_dim is None else self.rotary_dim


def _get(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def shape_from_config(cfg: dict) -> ModelShape:
    """Build a `ModelShape` from a config.json dictionary (MoE types by planner.shapes_moe, the rest by
    planner.architectures); MalformedConfig when its numbers cannot describe a model."""
    from . import architectures, shapes_moe  # both import this module's types

    model_type = str(cfg.get("model_type", "")).lower()
    if model_type == "refinedwebmodel":
        model_type = "falcon"
    builder = shapes_moe.build if model_type in shapes_moe.TYPES else architectures.BUILDERS.get(model_type)
    if builder is None:
        raise UnsupportedArchitecture(f"model_type {model_type!r} is not one the closed-form estimator knows "
                                      f"({', '.join((*architectures.BUILDERS, *shapes_moe.TYPES))})")
    try:
        return builder(cfg, model_type)
    except MalformedConfig as exc:
        raise MalformedConfig(f"config.json of model_type {model_type!r}: {exc}") from None
    except UnsupportedArchitecture:
        raise
    except KeyError as exc:
        raise MalformedConfig(f"config.json of model_type {model_type!r} lacks the key {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:  # a zero count divides, too
        raise MalformedConfig(f"config.json of model_type {model_type!r}: {exc}") from None


from .described import shape_from_description  # noqa: E402  (re-exported: the any-architecture path)

__all__ = ["Linear", "MalformedConfig", "ModelShape", "UnsupportedArchitecture", "shape_from_config",
           "shape_from_description"]
