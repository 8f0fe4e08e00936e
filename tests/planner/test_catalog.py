"""The bundled catalogs: coverage, sources, parameter counts against published figures, name matching."""

import tomllib
from pathlib import Path

import pytest

from peftplan.planner import catalog, shape_from_config

# Published total parameter counts (model cards / safetensors metadata), written here independently of
# the catalog file. GPT-2 and Llama-2 exclude the non-parameter buffers their checkpoints store.
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-405B": 405_853_388_800,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "huggyllama/llama-65b": 65_285_660_672,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-3B": 3_085_938_688,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-27b": 27_227_128_320,
    "microsoft/phi-2": 2_779_683_840,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "openai-community/gpt2": 124_439_808,
    "openai-community/gpt2-xl": 1_557_611_200,
    "tiiuae/falcon-7b": 6_920_000_000,  # published rounded: "6.92B"
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "lmsys/vicuna-7b-v1.5": 6_738_415_616,
}

# The models people fine-tune now: exact published totals (HF API safetensors.total, keras-hub presets), written
# here from those sources, not from the catalog. Qwen3-0.6B/1.7B: the hub totals (751,632,384 / 2,031,739,904)
# count a separately stored copy of the tied lm_head; these are the model's own counts. Gemma 3 4B+ totals include
# the SigLIP vision tower and projector of the image-text checkpoint.
PUBLISHED_NEW = {
    "Qwen/Qwen3-0.6B": 596_049_920,
    "Qwen/Qwen3-1.7B": 1_720_574_976,
    "Qwen/Qwen3-4B": 4_022_468_096,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-14B": 14_768_307_200,
    "Qwen/Qwen3-32B": 32_762_123_264,
    "Qwen/Qwen2.5-Coder-7B": 7_615_616_512,
    "Qwen/Qwen2.5-Coder-14B": 14_770_033_664,
    "Qwen/Qwen2.5-Coder-32B": 32_763_876_352,
    "google/gemma-3-1b-pt": 999_885_952,
    "google/gemma-3-4b-pt": 4_300_079_472,
    "google/gemma-3-12b-pt": 12_187_325_040,
    "google/gemma-3-27b-pt": 27_432_406_640,
    "mistralai/Mistral-Small-24B-Base-2501": 23_572_403_200,
    "mistralai/Mistral-Nemo-Base-2407": 12_247_782_400,
    "microsoft/phi-4": 14_659_507_200,
    "microsoft/Phi-4-mini-instruct": 3_836_021_760,
    "allenai/OLMo-2-1124-7B": 7_298_617_344,
    "allenai/OLMo-2-1124-13B": 13_716_198_400,
    "allenai/OLMo-2-0325-32B": 32_234_279_936,
    "HuggingFaceTB/SmolLM3-3B": 3_075_098_624,
    "ibm-granite/granite-3.3-8b-instruct": 8_170_864_640,
    "ibm-granite/granite-3.3-2b-instruct": 2_533_539_840,
    "ibm-granite/granite-4.0-micro": 3_402_836_480,
    "meta-llama/Llama-3.3-70B-Instruct": 70_553_706_496,
}
# Gemma 3 image-text checkpoints: the text decoder alone (published total minus the SigLIP so400m tower,
# 416,866,032, minus the projector 1152 x hidden + 1152)
GEMMA3_TEXT = {"google/gemma-3-4b-pt": 3_880_263_168, "google/gemma-3-12b-pt": 11_766_034_176,
               "google/gemma-3-27b-pt": 27_009_346_304}

REQUIRED_FAMILIES = ["Llama-2", "Llama-3-", "Llama-3.1", "Llama-3.2", "Mistral-7B", "Mixtral-8x7B", "Qwen2.5",
                     "gemma-2", "phi-2", "Phi-3", "gpt2", "falcon-7b", "TinyLlama", "vicuna-7b-v1.5",
                     "Qwen3-", "Qwen2.5-Coder", "gemma-3-", "Mistral-Small", "Mistral-Nemo", "phi-4", "Phi-4-mini",
                     "OLMo-2", "SmolLM3", "granite-3.3", "granite-4.0"]


def test_at_least_30_models_each_with_a_source():
    models = catalog.models()
    assert len(models) >= 30
    for m in models:
        assert m.source.startswith("https://huggingface.co/") and m.source.endswith("config.json"), m.id
        assert "model_type" in m.config


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_required_families_present(family):
    assert any(family.lower() in m.id.lower() for m in catalog.models()), family


@pytest.mark.parametrize("model_id,published", sorted(PUBLISHED.items()))
def test_parameter_count_within_1_percent_of_published(model_id, published):
    entry = catalog.find_model(model_id)
    assert entry is not None, model_id
    computed = shape_from_config(entry.config).parameters
    assert abs(computed - published) / published < 0.01, (model_id, computed, published)


@pytest.mark.parametrize("model_id,published", sorted(PUBLISHED_NEW.items()))
def test_new_models_match_their_published_count_within_0_1_percent(model_id, published):
    entry = catalog.find_model(model_id)
    assert entry is not None, model_id
    assert entry.published_parameters == published, (model_id, "the catalog's published figure")
    computed = shape_from_config(entry.config).parameters
    assert abs(computed - published) / published < 0.001, (model_id, computed, published)


@pytest.mark.parametrize("model_id,text", sorted(GEMMA3_TEXT.items()))
def test_gemma3_text_decoder_is_read_from_text_config(model_id, text):
    shape = shape_from_config(catalog.find_model(model_id).config)
    assert shape.decoder_parameters == text
    assert shape.extra_frozen_params == PUBLISHED_NEW[model_id] - text


@pytest.mark.parametrize("name,entry,hub,prequantized", [
    ("NousResearch/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", "NousResearch/Meta-Llama-3-8B", None),
    ("unsloth/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B", "unsloth/Llama-3.2-3B-Instruct", None),
    ("unsloth/Llama-3.2-3B-Instruct-bnb-4bit", "meta-llama/Llama-3.2-3B", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
     "bnb-4bit"),
    ("unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit", "Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit",
     "bnb-4bit"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", None),
    ("Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", None),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct",
     None),
    ("google/gemma-3-4b-it", "google/gemma-3-4b-pt", "google/gemma-3-4b-it", None),
    ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base", None),
    ("Qwen/Qwen2.5-Coder-32B-Instruct", "Qwen/Qwen2.5-Coder-32B", "Qwen/Qwen2.5-Coder-32B-Instruct", None),
    ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", None),
    ("allenai/OLMo-2-1124-7B-Instruct", "allenai/OLMo-2-1124-7B", "allenai/OLMo-2-1124-7B-Instruct", None),
])
def test_mirrors_and_instruct_variants_resolve_with_a_reason(name, entry, hub, prequantized):
    m = catalog.match_model(name)
    assert m is not None, name
    assert (m.entry.id, m.hub_id, m.prequantized) == (entry, hub, prequantized)
    assert m.how and entry in m.how  # the note names what it resolved to


@pytest.mark.parametrize("name", ["someone/Llama-3.1-8B-Instruct", "meta-llama/Llama-9-8B-Instruct",
                                  "Qwen/Qwen2.5-7B-Instruct-1M", "unsloth/not-a-model",
                                  "Llama-3.1-8B-Instruct-bnb-4bit"])
def test_names_that_only_look_like_catalog_models_do_not_match(name):
    assert catalog.match_model(name) is None, name


def test_an_exact_catalog_id_resolves_without_a_note():
    m = catalog.match_model("meta-llama/Llama-3.1-8B")
    assert m.entry.id == m.hub_id == "meta-llama/Llama-3.1-8B" and m.how is None and not m.by_rule


def test_gqa_and_moe_shapes():
    llama = shape_from_config(catalog.find_model("meta-llama/Llama-3.1-8B").config)
    k = next(lin for lin in llama.linears if lin.name == "k_proj")
    assert (k.in_features, k.out_features) == (4096, 8 * 128)  # 8 KV heads
    mixtral = shape_from_config(catalog.find_model("mistralai/Mixtral-8x7B-v0.1").config)
    experts = [lin for lin in mixtral.linears if lin.experts == 8]
    assert experts and all(not lin.is_linear for lin in experts)


def test_at_least_20_devices_with_sources_and_prices():
    devs = catalog.devices()
    assert len(devs) >= 20
    for d in devs:
        assert d.memory_bytes > 4 * 2**30 and d.source and d.price_date
        assert d.fp16_tflops > 0 and d.memory_bandwidth_gbps > 0
        assert (d.bf16_tflops > 0) == d.bf16


@pytest.mark.parametrize("name,expected", [
    ("a100 80gb", "A100-80GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("A100-80GB", "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("h100", "H100-SXM"), ("NVIDIA H100 80GB HBM3", "H100-SXM"),
    ("Tesla T4", "T4"), ("t4", "T4"), ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("rtx 4090", "RTX-4090"),
    ("NVIDIA L4", "L4"), ("l40s", "L40S"), ("NVIDIA A10G", "A10G"), ("H200", "H200"), ("mi300x", "MI300X"),
])
def test_loose_device_names(name, expected):
    d = catalog.find_device(name)
    assert d is not None and d.id == expected, (name, d and d.id)


def test_required_devices_present():
    ids = {d.id for d in catalog.devices()}
    for want in ("H200", "H100-SXM", "H100-PCIe", "A100-40GB", "A100-80GB", "L40S", "L4", "A10G", "A10", "T4",
                 "V100-16GB", "V100-32GB", "RTX-3090", "RTX-4090", "RTX-5090", "RTX-A6000", "RTX-6000-Ada", "MI300X",
                 "RTX-4080", "RTX-4070-Ti", "RTX-3080", "RTX-5080", "RTX-PRO-6000", "B300", "MI325X", "L40", "A40",
                 "H100-NVL", "GH200"):
        assert want in ids, want


@pytest.mark.parametrize("name,expected,gib", [
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX-PRO-6000", 95.6), ("rtx pro 6000", "RTX-PRO-6000", 95.6),
    ("b300", "B300", 288), ("mi325x", "MI325X", 256), ("NVIDIA GeForce RTX 5080", "RTX-5080", 16),
    ("rtx 4080 super", "RTX-4080", 16), ("4070 ti", "RTX-4070-Ti", 12), ("NVIDIA GeForce RTX 3080", "RTX-3080", 10),
    ("a5000", "RTX-A5000", 24), ("rtx 4000 ada", "RTX-4000-Ada", 20),
])
def test_new_devices_by_name_with_their_memory(name, expected, gib):
    d = catalog.find_device(name)
    assert d is not None and d.id == expected, (name, d and d.id)
    assert abs(d.memory_bytes / 2**30 - gib) < 0.1, (name, d.memory_bytes / 2**30)


def test_dense_not_sparse_tensor_rates():
    """Datasheets print 2:4-sparse figures; the catalog holds dense ones (B300: 4.5 PF sparse, RTX PRO 6000: 1 PF)."""
    assert catalog.find_device("B300").bf16_tflops == 2250
    assert catalog.find_device("RTX-PRO-6000").bf16_tflops < 600
    assert catalog.find_device("MI325X").bf16_tflops == catalog.find_device("MI300X").bf16_tflops


def test_every_device_alias_names_one_device():
    raw = tomllib.loads((Path(catalog.__file__).with_name("data") / "gpus.toml").read_text())["gpus"]
    seen: dict[str, str] = {}
    for g in raw:
        for name in {catalog._norm(n) for n in (g["id"], g["name"], *g.get("aliases", ()))}:
            assert seen.setdefault(name, g["id"]) == g["id"], (name, seen[name], g["id"])
        assert g.get("price_source") and g.get("price_date"), g["id"]


def test_no_bf16_on_t4_and_v100():
    assert not catalog.find_device("T4").bf16
    assert not catalog.find_device("V100-32GB").bf16


def test_catalog_files_are_data_not_python():
    data = Path(catalog.__file__).with_name("data")
    for f in ("models.toml", "gpus.toml"):
        tomllib.loads((data / f).read_text())
