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

REQUIRED_FAMILIES = ["Llama-2", "Llama-3-", "Llama-3.1", "Llama-3.2", "Mistral-7B", "Mixtral-8x7B", "Qwen2.5",
                     "gemma-2", "phi-2", "Phi-3", "gpt2", "falcon-7b", "TinyLlama", "vicuna-7b-v1.5"]


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


def test_gqa_and_moe_shapes():
    llama = shape_from_config(catalog.find_model("meta-llama/Llama-3.1-8B").config)
    k = next(l for l in llama.linears if l.name == "k_proj")
    assert (k.in_features, k.out_features) == (4096, 8 * 128)  # 8 KV heads
    mixtral = shape_from_config(catalog.find_model("mistralai/Mixtral-8x7B-v0.1").config)
    experts = [l for l in mixtral.linears if l.experts == 8]
    assert experts and all(not l.is_linear for l in experts)


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
                 "V100-16GB", "V100-32GB", "RTX-3090", "RTX-4090", "RTX-5090", "RTX-A6000", "RTX-6000-Ada", "MI300X"):
        assert want in ids, want


def test_no_bf16_on_t4_and_v100():
    assert not catalog.find_device("T4").bf16
    assert not catalog.find_device("V100-32GB").bf16


def test_catalog_files_are_data_not_python():
    data = Path(catalog.__file__).with_name("data")
    for f in ("models.toml", "gpus.toml"):
        tomllib.loads((data / f).read_text())
