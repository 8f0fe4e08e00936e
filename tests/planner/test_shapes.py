"""Shapes of the families people fine-tune now, against independently built transformers models; the
activation terms their features add, against bytes counted by hand; the any-architecture description."""

import subprocess
import sys
import textwrap

import pytest
from support import meta_model

from peftplan.planner import AdapterSettings, Geometry, Setup, catalog, shape_from_config
from peftplan.planner.activations import attention_saved_bytes, layer_terms, outside_layers_terms
from peftplan.planner.methods import METHODS
from peftplan.planner.shapes import UnsupportedArchitecture, shape_from_description

# Tiny configs, one per family (written here, not taken from the calibration script).
TINY = {
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=300, tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300,
                        query_pre_attn_scalar=32, sliding_window=16, sliding_window_pattern=3),
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False),
    "smollm3": dict(model_type="smollm3", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, pad_token_id=0),
    "granite": dict(model_type="granite", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True,
                    logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22),
    "granitemoehybrid": dict(model_type="granitemoehybrid", hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                             shared_intermediate_size=96, num_local_experts=0, layer_types=["attention"] * 2,
                             position_embedding_type="rope", tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True, partial_rotary_factor=0.75,
                 pad_token_id=0),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=300, sliding_window=32),
    "gemma3": dict(model_type="gemma3", text_config=dict(model_type="gemma3_text", hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, vocab_size=300, query_pre_attn_scalar=32, sliding_window=16),
                   vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      patch_size=8, image_size=32, vision_use_head=False),
                   mm_tokens_per_image=4),
}


def _first_layer(model):
    import torch

    lists = [m for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and "vision" not in name]  # the text decoder's layers
    return max(lists, key=len)[0]


def _linears(layer) -> list[tuple[str, int, int]]:
    import torch

    return sorted((name.split(".")[-1], m.in_features, m.out_features)
                  for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", sorted(TINY))
def test_parameters_and_linear_modules_match_a_tiny_transformers_model(family):
    model = meta_model(TINY[family])
    torch_count = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once
    shape = shape_from_config(TINY[family])
    assert shape.parameters == torch_count, (family, shape.parameters, torch_count)
    closed = sorted((lin.name, lin.in_features, lin.out_features) for lin in shape.linears if lin.is_linear)
    assert closed == _linears(_first_layer(model)), family
    assert shape.tie_embeddings == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", [m.id for m in catalog.models() if m.config["model_type"] in (
    "qwen3", "gemma3_text", "gemma3", "olmo2", "smollm3", "granite", "granitemoehybrid")]
    + ["microsoft/phi-4", "microsoft/Phi-4-mini-instruct", "mistralai/Mistral-Small-24B-Base-2501",
       "mistralai/Mistral-Nemo-Base-2407"])
def test_catalog_config_builds_a_model_of_the_closed_form_size(model_id):
    """The catalog's config.json subset, instantiated by transformers on the meta device: same total."""
    model = meta_model(catalog.find_model(model_id).config)
    assert shape_from_config(catalog.find_model(model_id).config).parameters == \
        sum(p.numel() for p in model.parameters())


# --- what the new features add, counted by hand -------------------------------------------------------------
def _setup(cfg: dict, batch=2, seq=128, attention="sdpa", padded=False) -> Setup:
    return Setup(shape_from_config(cfg), Geometry(batch, seq, False, 1, attention, padded),
                 AdapterSettings(rank=8, alpha=16, dropout=0.0), "adamw_torch", "bfloat16", "cpu")


def _qk_term(s: Setup, method: str) -> int:
    terms = [t for t in layer_terms(s, METHODS[method]) if t.label.startswith("q/k norms")]
    return terms[0].bytes if terms else 0


QWEN3 = dict(model_type="qwen3", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, vocab_size=1200, tie_word_embeddings=True)


def test_qk_norm_per_head_saves_fp32_inputs_and_one_rms_per_head():
    s = _setup(QWEN3)  # T = 256 tokens, a + kv = 10 heads of 32
    assert _qk_term(s, "lora") == 4 * 256 * 10 * 32 + 4 * 256 * 10  # fp32 copies + 1/rms per head and token
    assert _qk_term(s, "full") == 4 * 256 * 10 * 32 + 4 * 256 * 10 + 2 * 256 * 10 * 32  # + bf16 normed (weight grad)
    assert shape_from_config(QWEN3).extra_layer_params == 2 * 32


def test_olmo2_qk_norm_over_the_whole_projection_in_fp32():
    cfg = {**QWEN3, "model_type": "olmo2"}
    cfg.pop("head_dim")
    s = _setup(cfg)  # head_dim 256 / 8 = 32
    assert _qk_term(s, "lora") == 4 * 256 * 10 * 32 + 4 * 2 * 256  # one 1/rms per token for q and for k
    assert _qk_term(s, "full") == 2 * (4 * 256 * 10 * 32) + 4 * 2 * 256  # OLMo 2 multiplies the weight in fp32
    assert shape_from_config(cfg).extra_layer_params == (8 + 2) * 32
    assert _qk_term(_setup({**cfg, "model_type": "llama"}), "full") == 0


MISTRAL = dict(model_type="mistral", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=32, vocab_size=1000, sliding_window=96)


def test_sliding_window_reached_repeats_kv_and_saves_the_additive_mask():
    # seq 128 >= window 96: every layer's sdpa call gets a mask: k/v repeated to 8 heads, a bf16 additive mask saved
    b, seq, a, d, T = 2, 128, 8, 32, 256
    expected = 2 * T * a * d + 2 * 2 * T * a * d + 2 * T * a * d + 4 * b * a * seq + 2 * b * seq * seq
    assert attention_saved_bytes(_setup(MISTRAL))[0] == expected
    # seq 64 < window: is_causal, GQA without repeat (2 kv heads), no mask
    b, seq, T = 2, 64, 128
    assert attention_saved_bytes(_setup(MISTRAL, seq=64))[0] == \
        2 * T * a * d + 2 * 2 * T * 2 * d + 2 * T * a * d + 4 * b * a * seq
    # flash attention: never a mask, never a repeat
    b, seq, T = 2, 128, 256
    flash = attention_saved_bytes(_setup(MISTRAL, attention="flash_attention_2"))[0]
    assert flash == 2 * T * a * d + 2 * 2 * T * 2 * d + 2 * T * a * d + 4 * b * a * seq


def test_the_sliding_mask_is_built_once_per_forward_outside_the_layers():
    T, h, d, seq = 256, 256, 32, 128
    base = 24 * T + 2 * 2 * T * d + (4 * T * h + 4 * T)  # ids/labels, cos/sin, final norm input and 1/rms
    lora = METHODS["lora"]
    assert sum(t.bytes for t in outside_layers_terms(_setup(MISTRAL), lora)) == base + seq * seq  # bool, over the batch
    assert sum(t.bytes for t in outside_layers_terms(_setup({**MISTRAL, "sliding_window": None}), lora)) == base
    padded = sum(t.bytes for t in outside_layers_terms(_setup(MISTRAL, padded=True), lora))
    assert padded == base + 8 * T + 2 * seq * seq  # the padding mask, one 4D mask (only sliding layers here)


def test_hybrid_sliding_layers_average_the_repeated_kv():
    cfg = dict(model_type="gemma3_text", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1500, query_pre_attn_scalar=64,
               sliding_window=64, sliding_window_pattern=2)
    s = _setup(cfg)
    assert (s.shape.sliding_layers, s.shape.sliding_window, s.shape.rotary_tables) == (2, 64, 2)
    b, seq, a, d, T, kv = 2, 128, 4, 64, 256, 2
    # layers 0 and 2 slide (mask: k/v at 4 heads, additive mask), layers 1 and 3 attend causally (k/v at 2 heads)
    kv_bytes = (2 * 2 * T * d * (2 * a + 2 * kv)) // 4
    mask = (2 * b * seq * seq * 2) // 4
    assert attention_saved_bytes(s)[0] == 2 * T * a * d + kv_bytes + 2 * T * a * d + 4 * b * a * seq + mask
    outside = sum(t.bytes for t in outside_layers_terms(s, METHODS["lora"]))
    assert outside == 24 * T + 2 * (2 * 2 * T * d) + (4 * T * 256 + 4 * T) + seq * seq  # two rotary tables


@pytest.mark.parametrize("model_id,sliding,window", [
    ("google/gemma-3-27b-pt", 52, 1024), ("google/gemma-3-1b-pt", 22, 512), ("google/gemma-2-9b", 21, 4096),
    ("mistralai/Mistral-7B-v0.1", 32, 4096), ("mistralai/Mistral-7B-Instruct-v0.3", 0, None),
    ("Qwen/Qwen2.5-7B", 0, None), ("Qwen/Qwen3-8B", 0, None), ("HuggingFaceTB/SmolLM3-3B", 0, None),
])
def test_sliding_layers_as_transformers_assigns_them(model_id, sliding, window):
    shape = shape_from_config(catalog.find_model(model_id).config)
    assert (shape.sliding_layers, shape.sliding_window) == (sliding, window)


def test_features_without_memory_of_their_own_are_reported():
    smol = shape_from_config(catalog.find_model("HuggingFaceTB/SmolLM3-3B").config)
    assert smol.nope_layers == 9 and any("NoPE" in n for n in smol.notes)
    granite = shape_from_config(catalog.find_model("ibm-granite/granite-3.3-8b-instruct").config)
    assert granite.logits_scaling == 16.0 and any("logits_scaling" in n for n in granite.notes)
    mini = shape_from_config(catalog.find_model("microsoft/Phi-4-mini-instruct").config)
    assert (mini.rotary_width, mini.tie_embeddings) == (96, True)


# --- any architecture: the description of the model built on the meta device ----------------------------------
NEOX = dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
            vocab_size=500, rotary_pct=0.25, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
BIGCODE = dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4, vocab_size=500, multi_query=True,
               n_positions=256, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("cfg,linears", [(NEOX, 4), (BIGCODE, 4)])
def test_described_shape_counts_every_parameter_of_an_unknown_architecture(cfg, linears):
    pytest.importorskip("torch", reason="describing a model needs the [train] extra")
    from peftplan.runtime.exact import describe

    with pytest.raises(UnsupportedArchitecture):
        shape_from_config(cfg)
    model = meta_model(cfg)
    shape = shape_from_description(describe(cfg))
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert len(shape.linears) == linears == len(_linears(_first_layer(model)))
    assert not shape.calibrated and shape.norm == "layernorm" and shape.norms_per_layer == 2
    first = [lin for lin in shape.linears if lin.input == "attn_in"]
    assert [lin.name for lin in first] == [shape.linears[0].name]  # the fused qkv projection reads the normed input
    est = METHODS["lora"]
    s = Setup(shape, Geometry(2, 64, True, 1, "sdpa", False), AdapterSettings(8, 16, 0.0), "adamw_torch", "bfloat16",
              "cpu")
    assert sum(t.bytes for t in layer_terms(s, est)) > 0


OTHERS = {  # architectures the closed form does not know: layouts the description must get right
    "bloom": (dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=300), 4),  # no sdpa, ALiBi
    "cohere": (dict(model_type="cohere", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, vocab_size=300, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2), 7),  # parallel block, LayerNorm without bias
    "opt": (dict(model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                 vocab_size=300, word_embed_proj_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                 eos_token_id=2), 6),  # learned positions with an offset of 2 rows
    "starcoder2": (dict(model_type="starcoder2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, vocab_size=300), 6),
}


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_described_parameters_are_exact_for_other_layouts(family):
    pytest.importorskip("torch", reason="describing a model needs the [train] extra")
    from peftplan.runtime.exact import describe

    cfg, linears = OTHERS[family]
    model = meta_model(cfg)
    shape = shape_from_description(describe(cfg))
    assert shape.parameters == sum(p.numel() for p in model.parameters()), family
    assert len(shape.linears) == linears == len(_linears(_first_layer(model)))


def test_gpt_bigcode_multi_query_projection():
    pytest.importorskip("torch", reason="describing a model needs the [train] extra")
    from peftplan.runtime.exact import describe

    shape = shape_from_description(describe(BIGCODE))
    c_attn = shape.linears[0]
    assert (c_attn.name, c_attn.in_features, c_attn.out_features) == ("c_attn", 64, 64 + 2 * 16)  # one shared k/v head
    assert (shape.num_kv_heads, shape.learned_positions) == (1, 256)


def test_unknown_architecture_without_torch_names_the_install(tmp_path):
    """No torch: the resolve error says what to install instead of a bare 'not supported'."""
    import json

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(NEOX))
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # `import torch` raises ImportError, as without the [train] extra
        from peftplan.planner import resolve
        from peftplan.schemas import SpecError

        def describe(config):
            from peftplan.runtime.exact import describe as real
            return real(config)

        resolve.set_describer(describe)
        try:
            resolve.resolve_model(sys.argv[1])
        except SpecError as exc:
            print(exc.problems[0].message)
            sys.exit(2)
        print("resolved")
    """)
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gpt_neox" in out.stdout and "pip install 'peftplan[train]'" in out.stdout, out.stdout
    assert "Traceback" not in out.stdout + out.stderr
