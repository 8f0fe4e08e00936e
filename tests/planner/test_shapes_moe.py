"""MoE shapes (planner/shapes_moe.py) and their NF4 storage (planner/methods/nf4.py), against independent counts:
transformers models built on the meta device, published parameter totals written here, NF4 bytes by hand, and
the published Mixtral-8x7B QLoRA measurement on one A100-80GB (fms-acceleration)."""

from math import ceil

import pytest
from support import meta_model

from peftplan.planner import (
    AdapterSettings,
    Geometry,
    Setup,
    catalog,
    estimate,
    shape_from_config,
)
from peftplan.planner.shapes_moe import active_parameters, build

TINY = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=300),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, vocab_size=300),  # no head_dim: h / heads, not Qwen3's 128
    "qwen3_moe_dense_layers": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
                                   moe_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                   vocab_size=300, mlp_only_layers=[0, 2]),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=300),
    "granitemoe": dict(model_type="granitemoe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                       vocab_size=300, embedding_multiplier=12.0, logits_scaling=8.0),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, vocab_size=300, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=1, vocab_size=300),
    "llama4_text_interleaved": dict(model_type="llama4_text", hidden_size=64, intermediate_size=96,
                                    intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                                    vocab_size=300, interleave_moe_layer_step=2),
}

# Published totals, written here (model cards / hub safetensors totals); see planner/data/models.toml for sources.
PUBLISHED = {
    "mistralai/Mixtral-8x7B-v0.1": (46_702_792_704, 12.9e9),
    "mistralai/Mixtral-8x22B-v0.1": (140_620_634_112, 39e9),
    "Qwen/Qwen3-30B-A3B": (30_532_122_624, 3.3e9),
    "Qwen/Qwen3-235B-A22B": (235_093_634_560, 22e9),
    "allenai/OLMoE-1B-7B-0924": (6_919_161_856, 1.3e9),
    "openai/gpt-oss-20b": (20_914_757_184, 3.6e9),
    "openai/gpt-oss-120b": (116_829_156_672, 5.1e9),
    "meta-llama/Llama-4-Scout-17B-16E": (108_641_793_536, 17e9),
    "meta-llama/Llama-4-Maverick-17B-128E": (401_583_781_376, 17e9),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_parameters_match_a_tiny_transformers_model(name):
    model = meta_model(TINY[name])
    assert shape_from_config(TINY[name]).parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"])
def test_experts_are_fused_and_the_rest_are_the_models_linear_modules(name):
    import torch

    model = meta_model(TINY[name])
    shape = shape_from_config(TINY[name])
    layer = model.model.layers[0]
    linears = sorted((n.split(".")[-1], m.in_features, m.out_features) for n, m in layer.named_modules()
                     if type(m) is torch.nn.Linear)
    assert sorted((lin.name, lin.in_features, lin.out_features) for lin in shape.linears if lin.is_linear) == linears
    fused = {n.split(".")[-1]: p.shape for n, p in layer.named_parameters() if p.dim() == 3}
    for lin in (module for module in shape.linears if not module.is_linear):
        e, a, b = fused[lin.name]
        assert e == lin.experts and {a, b} == {lin.in_features, lin.out_features}
        cfg = TINY[name]  # top_k / E, from the config itself
        assert lin.active == cfg["num_experts_per_tok"] / (cfg.get("num_local_experts") or cfg["num_experts"])


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_catalog_moe_models_match_their_published_totals(model_id):
    total, active = PUBLISHED[model_id]
    entry = catalog.find_model(model_id)
    assert entry is not None and entry.published_parameters == total
    shape = shape_from_config(entry.config)
    assert shape.parameters == total
    counted = active_parameters(shape)
    if model_id.startswith("openai/"):  # OpenAI's active count leaves the input embedding out
        counted -= shape.vocab_size * shape.hidden_size
    assert abs(counted - active) / active < 0.05, (model_id, counted, active)


def test_llama4_shared_expert_and_interleaved_dense_layers():
    scout = shape_from_config(catalog.find_model("meta-llama/Llama-4-Scout-17B-16E").config)
    names = [(lin.name, lin.is_linear) for lin in scout.linears]
    assert names.count(("gate_proj", True)) == 1  # the shared expert, an nn.Linear: 4-bit and adapted
    assert scout.extra_frozen_params == 871_932_416  # vision tower + adapter + projector
    maverick = shape_from_config(catalog.find_model("meta-llama/Llama-4-Maverick-17B-128E").config)
    shares = sorted((lin.out_features, lin.layer_share) for lin in maverick.linears if lin.name == "gate_proj")
    assert shares == [(8192, 0.5), (16384, 0.5)]  # shared expert on the 24 MoE layers, dense MLP on the other 24


def test_an_unknown_moe_type_is_refused():
    from peftplan.planner.shapes import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="deepseek_v3"):
        build({"model_type": "deepseek_v3"}, "deepseek_v3")


# ------------------------------------------------------------------------------------------------ NF4 storage


def _setup(shape, batch=1, seq=512, method_targets="all-linear", dtype="bfloat16", attention="sdpa", padded=True):
    return Setup(shape, Geometry(batch, seq, True, 1, attention, padded), AdapterSettings(16, 16, 0.0, method_targets),
                 "adamw_torch", dtype, "cuda")


def test_qlora_stores_the_experts_in_nf4_byte_for_byte():
    shape = shape_from_config(TINY["mixtral"])
    est = estimate("qlora", _setup(shape))
    c = est.components()
    L, E, h, i = 2, 4, 64, 96
    # hand count: per expert matrix n/2 data + n/64 absmax + 4 per 256 absmax + 4 offset; 1088 code bytes a layer
    experts_data = L * E * (2 * i * h // 2 + i * h // 2)
    experts_consts = L * (E * ((2 * i * h) // 64 + 4 * ceil(2 * i * h / 64 / 256) + 4)
                          + E * ((i * h) // 64 + 4 * ceil(i * h / 64 / 256) + 4) + 1088)
    attn = [(h, 64), (h, 32), (h, 32), (64, h)]  # q, k, v, o
    linear_data = L * sum(a * b // 2 for a, b in attn)
    linear_consts = L * sum(a * b // 64 + 4 * ceil(a * b / 64 / 256) + 1092 for a, b in attn)
    rest = shape.parameters - L * (E * 3 * i * h + sum(a * b for a, b in attn))
    assert c["weights"] == experts_data + linear_data + 2 * rest
    assert c["quant_constants"] == experts_consts + linear_consts
    lora = estimate("lora", _setup(shape)).components()
    assert lora["weights"] == 2 * shape.parameters


def test_dequantized_transient_is_one_expert_matrix_not_the_fused_tensor():
    shape = shape_from_config(catalog.find_model("mistralai/Mixtral-8x7B-v0.1").config)
    from peftplan.planner.methods import METHODS

    term = METHODS["qlora"].dequant_transient(_setup(shape))
    assert term.bytes == 2 * 14336 * 2 * 4096  # gate_up of one expert in bf16, not 8 of them


def test_mixtral_8x7b_qlora_on_one_a100_matches_the_published_measurement():
    """fms-acceleration, accelerated-peft-bnb (NF4 + double quantization, no fp32 upcast), A100-80GB:
    peak torch allocated 36,218,024,448 B at batch 4 and 47,207,756,288 B at batch 8 (x ~4096 tokens), r 16,
    alpha 16, dropout 0, q/k/v/o, fp16 AMP, flash-attention 2, gradient checkpointing
    (docs/published_measurements.toml)."""
    shape = shape_from_config(catalog.find_model("mistralai/Mixtral-8x7B-v0.1").config)
    for batch, published in ((4, 36_218_024_448), (8, 47_207_756_288)):
        setup = Setup(shape, Geometry(batch, 4096, True, 1, "flash_attention_2", True),
                      AdapterSettings(16, 16, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")), "adamw_torch",
                      "float16", "cuda", loss="full")  # the source ran transformers' own loss
        predicted = estimate("qlora", setup).peak_allocated_bytes
        assert abs(predicted - published) / published < 0.10, (batch, predicted, published)
    # and the experts in 16-bit would not fit at all
    assert estimate("lora", setup).peak_allocated_bytes > 85e9
