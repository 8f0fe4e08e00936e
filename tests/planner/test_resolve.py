"""Resolving `model.name` (catalog, local dir, config.json, local HF cache) and `hardware.gpu` (loose matching)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peftplan.planner.resolve import resolve_hardware, resolve_model
from peftplan.schemas import SpecError, spec_from_dict

# A small Llama: 2 layers, hidden 64, 4 heads of 16, 2 kv heads, MLP 128, vocab 256.
TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
}
# embeddings + head + per layer (q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64, 2 norms) + final norm
TINY_LLAMA_PARAMS = 2 * 256 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64


@pytest.fixture(autouse=True)
def no_real_hf_cache(tmp_path, monkeypatch):
    """No test here may read the machine's own Hugging Face cache."""
    home = tmp_path / "fake-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_config(directory: Path, config: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2), encoding="utf-8")
    return path


def make_hf_cache(hub: Path, repo_id: str, config: dict, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    root = hub / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision + "\n")
    return write_config(root / "snapshots" / revision, config)


def one_problem(info) -> str:
    lines = info.value.lines()
    assert len(lines) == 1, lines
    return lines[0]


# --- catalog --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "LLAMA-3.1-8B", "llama3.1-8b", "Llama-3.1-8B",
                                  "META-LLAMA/llama-3.1-8b", "  llama-3.1-8b  "])
def test_catalog_names_and_aliases_case_insensitive(name):
    m = resolve_model(name)
    assert m.source == "catalog"
    assert m.name == "meta-llama/Llama-3.1-8B"
    assert m.shape.model_type == "llama"
    assert m.shape.num_layers == 32 and m.shape.hidden_size == 4096
    assert m.shape.parameters == 8_030_261_248  # published count for Llama 3.1 8B


def test_catalog_wins_over_a_same_named_local_directory(tmp_path, monkeypatch):
    write_config(tmp_path / "gpt2", TINY_LLAMA)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gpt2").source == "catalog"


def test_unknown_model_error_names_key_and_suggests(tmp_path):
    with pytest.raises(SpecError) as info:
        resolve_model("llama-3.1-8c", base_dir=tmp_path)
    line = one_problem(info)
    assert line.startswith("model.name: ")
    assert "'llama-3.1-8c'" in line and "meta-llama/Llama-3.1-8B" in line and "config.json" in line


# --- local config.json ---------------------------------------------------------------------------------

def test_local_model_directory(tmp_path):
    write_config(tmp_path / "tiny", TINY_LLAMA)
    m = resolve_model(str(tmp_path / "tiny"))
    assert m.source == "config.json"
    assert Path(m.location) == tmp_path / "tiny" / "config.json"
    assert m.config["hidden_size"] == 64
    assert m.shape.model_type == "llama"
    assert (m.shape.num_layers, m.shape.hidden_size, m.shape.num_kv_heads, m.shape.vocab_size) == (2, 64, 2, 256)
    assert m.shape.parameters == TINY_LLAMA_PARAMS
    assert m.shape.max_positions == 512


def test_path_to_config_json(tmp_path):
    cfg = write_config(tmp_path / "somewhere", TINY_LLAMA)
    m = resolve_model(str(cfg))
    assert m.source == "config.json"
    assert Path(m.location) == cfg
    assert m.shape.parameters == TINY_LLAMA_PARAMS


def test_config_json_with_another_file_name(tmp_path):
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(TINY_LLAMA), encoding="utf-8")
    assert resolve_model(str(path)).shape.parameters == TINY_LLAMA_PARAMS


def test_relative_directory_resolved_against_base_dir(tmp_path, monkeypatch):
    write_config(tmp_path / "specs" / "models" / "tiny", TINY_LLAMA)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = resolve_model("models/tiny", base_dir=tmp_path / "specs")
    assert m.source == "config.json"
    assert Path(m.location).resolve() == (tmp_path / "specs" / "models" / "tiny" / "config.json").resolve()


def test_unsupported_model_type(tmp_path):
    write_config(tmp_path / "mamba", {**TINY_LLAMA, "model_type": "mamba"})
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "mamba"))
    line = one_problem(info)
    assert line.startswith("model.name: ")
    assert "mamba" in line
    assert "llama" in line  # says which types are supported


def test_config_missing_a_required_key(tmp_path):
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "hidden_size"}
    write_config(tmp_path / "broken", cfg)
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "broken"))
    line = one_problem(info)
    assert line.startswith("model.name: ") and "hidden_size" in line


def test_directory_without_config_json(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "empty-model"))
    line = one_problem(info)
    assert line.startswith("model.name: ")
    assert str(tmp_path / "empty-model") in line and "config.json" in line


def test_invalid_json_config_gives_line_and_column(tmp_path):
    text = '{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n'
    cfg = write_config(tmp_path / "bad", text)
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "bad"))
    line = one_problem(info)
    assert line.startswith("model.name: ")
    col = text.splitlines()[2].index(",,") + 2  # the second comma, 1-based
    assert f"{cfg}:3:{col}:" in line, line


def test_json_that_is_not_an_object(tmp_path):
    write_config(tmp_path / "list", "[1, 2, 3]")
    with pytest.raises(SpecError) as info:
        resolve_model(str(tmp_path / "list"))
    assert one_problem(info).startswith("model.name: ")


# --- local Hugging Face cache --------------------------------------------------------------------------

def test_hub_id_in_hf_hub_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    cfg = make_hf_cache(hub, "acme/tiny-llama", TINY_LLAMA)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    m = resolve_model("acme/tiny-llama")
    assert m.source == "hf-cache"
    assert m.name == "acme/tiny-llama"
    assert Path(m.location) == cfg
    assert m.shape.parameters == TINY_LLAMA_PARAMS


def test_hub_id_in_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make_hf_cache(tmp_path / "hf" / "hub", "acme/tiny-llama", TINY_LLAMA)
    assert resolve_model("acme/tiny-llama").source == "hf-cache"


def test_hf_cache_follows_refs_main_not_newest_snapshot(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    main_rev = "a" * 40
    cfg = make_hf_cache(hub, "acme/tiny-llama", TINY_LLAMA, revision=main_rev)
    other = write_config(hub / "models--acme--tiny-llama" / "snapshots" / ("b" * 40),
                         {**TINY_LLAMA, "num_hidden_layers": 7})
    os.utime(cfg, (1_000_000, 1_000_000))  # the refs/main snapshot is the older one
    os.utime(other, None)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    m = resolve_model("acme/tiny-llama")
    assert Path(m.location) == cfg
    assert m.shape.num_layers == 2


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_hf_cache(tmp_path / "hub", "acme/other-model", TINY_LLAMA)
    with pytest.raises(SpecError) as info:
        resolve_model("acme/tiny-llama")
    line = one_problem(info)
    assert line.startswith("model.name: ") and "acme/tiny-llama" in line


# --- hardware --------------------------------------------------------------------------------------------

def hw_spec(gpu: str, **hardware) -> object:
    return spec_from_dict({"model": {"name": "gpt2"}, "hardware": {"gpu": gpu, **hardware}})


@pytest.mark.parametrize(
    "name, device_id, memory_mib",
    [
        ("a100 80gb", "A100-80GB", 81920),
        ("A100-80GB", "A100-80GB", 81920),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB", 81920),
        ("a100 40gb", "A100-40GB", 40960),
        ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB", 81920),
        ("h100", "H100-SXM", 81559),
        ("NVIDIA H100 80GB HBM3", "H100-SXM", 81559),
        ("NVIDIA H100 PCIe", "H100-PCIe", None),
        ("Tesla T4", "T4", 15360),
        ("a10", "A10", None),
        ("NVIDIA A10G", "A10G", None),
        ("NVIDIA GeForce RTX 4090", "RTX-4090", None),
    ],
)
def test_resolve_hardware_loose_names(name, device_id, memory_mib):
    hw = resolve_hardware(hw_spec(name))
    assert hw.device.id == device_id
    assert not hw.device.is_cpu and hw.device.kind == "cuda"
    if memory_mib is not None:  # what nvidia-smi reports as total for this device
        assert hw.device.memory_bytes == memory_mib * 2**20
    assert (hw.count, hw.nodes) == (1, 1)
    assert hw.notes == ()


def test_count_and_nodes_carried():
    hw = resolve_hardware(hw_spec("h100", count=8, nodes=2))
    assert (hw.count, hw.nodes) == (8, 2)


@pytest.mark.parametrize("name", ["cpu", "CPU", " Cpu "])
def test_cpu_with_memory_gib(name):
    hw = resolve_hardware(hw_spec(name, memory_gib=64))
    assert hw.device.is_cpu and hw.device.kind == "cpu"
    assert hw.device.memory_bytes == 64 * 2**30
    assert not any("RAM" in note for note in hw.notes)


def test_cpu_without_memory_uses_machine_ram():
    meminfo = Path("/proc/meminfo")
    hw = resolve_hardware(hw_spec("cpu"))
    assert hw.device.is_cpu
    if meminfo.exists():
        total_kib = next(int(line.split()[1]) for line in meminfo.read_text().splitlines()
                         if line.startswith("MemTotal:"))
        assert hw.device.memory_bytes == total_kib * 1024
    assert any("hardware.memory_gib" in note and "RAM" in note for note in hw.notes), hw.notes


def test_memory_override_for_catalog_gpu():
    hw = resolve_hardware(hw_spec("a100", memory_gib=40))
    assert hw.device.id == "A100-80GB"
    assert hw.device.memory_bytes == 40 * 2**30
    assert len(hw.notes) == 1
    assert "hardware.memory_gib" in hw.notes[0] and "40" in hw.notes[0]


def test_fractional_memory_override():
    hw = resolve_hardware(hw_spec("Tesla T4", memory_gib=14.5))
    assert hw.device.memory_bytes == int(14.5 * 2**30)


def test_unknown_gpu_without_memory():
    with pytest.raises(SpecError) as info:
        resolve_hardware(hw_spec("a1000"))
    line = one_problem(info)
    assert line.startswith("hardware.gpu: ")
    assert "'a1000'" in line and "A100-80GB" in line and "hardware.memory_gib" in line


def test_unknown_gpu_with_memory():
    hw = resolve_hardware(hw_spec("Fancy Accelerator 9000", memory_gib=48))
    assert hw.device.id == "Fancy Accelerator 9000"
    assert hw.device.memory_bytes == 48 * 2**30
    assert hw.device.kind == "cuda"
    assert len(hw.notes) == 1 and "not in the catalog" in hw.notes[0]


def test_price_override():
    hw = resolve_hardware(hw_spec("h100", price_usd_per_hour=1.25))
    assert hw.device.price_usd_per_hour == 1.25


@pytest.mark.parametrize("name, warned", [("tiiuae/falcon-7b", True), ("meta-llama/Llama-3.1-8B", False)])
def test_an_architecture_without_calibration_rows_says_so(name, warned):
    """Falcon has no measured rows in benchmarks/results/calibration-cpu*.csv; Llama has 49."""
    from peftplan.planner.report import estimate_spec

    spec = spec_from_dict({"model": {"name": name}, "data": {"num_examples": 1000}, "hardware": {"gpu": "A100-80GB"}})
    report = estimate_spec(spec)
    said = [p.message for p in report.resolved.warnings if "not checked against measured" in p.message]
    assert bool(said) == warned
