"""`peftplan import` on real axolotl and LLaMA-Factory example configs (tests/data/imports, copied from both projects
with their commit in a header): the settings each maps, written here by hand from the YAML; every key accounted for;
the spec estimates, plans and generates as any other; bad input is one clear line and exit 2, never a traceback, and
an existing file is never replaced without --force.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from peftplan.cli import main
from peftplan.planner.imports import import_config, to_toml

DATA = Path(__file__).resolve().parents[1] / "data" / "imports"
AX = DATA / "axolotl" / "examples"
LF = DATA / "llamafactory" / "examples"
GIB = 2**30


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No Hugging Face cache is read (names resolve through the catalog only) and relative paths start in tmp."""
    home = tmp_path / "home"
    home.mkdir()
    for var, value in (("HOME", home), ("HF_HOME", home / "hf"), ("HF_HUB_CACHE", home / "hub")):
        monkeypatch.setenv(var, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("PEFTPLAN_CONFIG_DIR", "XDG_CONFIG_HOME"):  # no local calibration is applied to the estimates
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def imported(path: Path, tmp_path: Path, **kw):
    return import_config(path, out_dir=tmp_path, gpu=kw.pop("gpu", "H100-SXM"), **kw)


def spec_of(result) -> dict:
    return result.spec_dict()


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in err, err
    return rc, out, err


def unmapped(result, kind: str | None = None) -> set[str]:
    return {u.key for u in result.unmapped if kind is None or u.kind == kind}


# --- axolotl -------------------------------------------------------------------------------------------------------

def test_axolotl_qlora(tmp_path):
    r = imported(AX / "llama-3" / "qlora.yml", tmp_path)
    assert r.tool == "axolotl"
    assert spec_of(r) == {
        "model": {"name": "NousResearch/Meta-Llama-3-8B", "dtype": "auto"},  # base_model; bf16: auto
        "data": {"seq_len": 4096, "packing": True, "path": "tatsu-lab/alpaca", "format": "instruction",
                 "eval_fraction": 0.0},  # sequence_len, sample_packing, datasets[0] (type alpaca), val_set_size: 0
        "hardware": {"gpu": "H100-SXM", "count": 1},
        "method": {"name": "qlora", "rank": 32, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"},
        # micro_batch_size 2 × packed rows under flash_attention: sdpa with a block-diagonal mask here
        "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
                     "attention": "sdpa", "loss": "full", "learning_rate": 0.0002, "epochs": 4.0,
                     "optimizer": "paged_adamw_32bit", "lr_scheduler": "cosine"},
    }
    assert {d.term for d in r.differences} == {"activations"}  # only the packed flash-attention mask
    assert {"pad_to_sequence_len", "special_tokens", "warmup_steps", "load_in_8bit"} <= unmapped(r, "no effect")
    assert {"wandb_project", "deepspeed", "fsdp"} <= set(r.empty_keys)


def test_axolotl_lora_8bit_with_modules_to_save(tmp_path):
    r = imported(AX / "llama-3" / "lora-8b.yml", tmp_path)
    s = spec_of(r)
    assert s["method"] == {"name": "lora", "rank": 32, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}
    assert s["training"]["optimizer"] == "adamw_8bit"  # adamw_bnb_8bit
    assert s["training"]["warmup_ratio"] == 0.1 and s["data"]["eval_fraction"] == 0.05
    assert unmapped(r, "not supported") == {"load_in_8bit", "lora_modules_to_save"}
    by_term = {d.term: d.text for d in r.differences}
    # Llama-3-8B's decoder linears: 32 layers × (2·4096² + 2·4096·1024 + 3·4096·14336) = 6,979,321,856 weights, one
    # byte each less in 8-bit than the estimate's 16-bit: 6.5 GiB
    assert "6.5 GiB" in by_term["weights"]
    # embed_tokens + lm_head: 2 × 128256 × 4096 = 1.05B parameters trained in full: 16-bit copy + gradient + 8-bit
    # AdamW's two 1-byte states = 6 bytes each, 6,304,038,912 bytes = 5.9 GiB
    assert "1.05B parameters" in by_term["adapter"] and "5.9 GiB" in by_term["adapter"]


def test_axolotl_qlora_fsdp_70b_needs_a_known_model(tmp_path, capsys):
    config = AX / "llama-3" / "qlora-fsdp-70b.yaml"
    rc, out, err = run(capsys, "import", config)
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("base_model:"))
    assert rc == 2 and out == ""
    assert f"qlora-fsdp-70b.yaml:{line}: base_model: unknown model 'casperhansen/llama-3-70b-fp16'" in err
    assert "--model" in err
    r = imported(config, tmp_path, gpu="RTX-3090", count=2, model="meta-llama/Meta-Llama-3-70B")
    s = spec_of(r)
    assert s["model"]["name"] == "meta-llama/Meta-Llama-3-70B" and s["hardware"] == {"gpu": "RTX-3090", "count": 2}
    assert s["method"] == {"name": "qlora", "rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}
    assert s["data"]["seq_len"] == 512 and s["data"]["packing"] is False and s["data"]["eval_fraction"] == 0.05
    assert s["training"]["micro_batch_size"] == 1 and s["training"]["gradient_accumulation_steps"] == 4
    assert s["training"]["optimizer"] == "adamw_torch" and s["training"]["learning_rate"] == 1e-5
    assert s["training"]["parallelism"] == "fsdp" and s["training"]["attention"] == "flash_attention_2"
    texts = " ".join(d.text for d in r.differences)
    assert "offloads parameters" in texts and "FSDP1" in texts  # fsdp_offload_params: true; no fsdp_version


def test_axolotl_full_fsdp_with_liger(tmp_path):
    r = imported(AX / "llama-3" / "fft-8b-liger-fsdp.yaml", tmp_path)
    s = spec_of(r)
    assert s["method"] == {"name": "full"}
    assert s["training"]["loss"] == "chunked"  # LigerPlugin + liger_fused_linear_cross_entropy
    assert s["training"]["learning_rate"] == 2e-5  # `2e-5` is a string to YAML 1.1; axolotl converts it
    assert s["training"]["optimizer"] == "adamw_torch"  # adamw_torch_fused: the same states
    assert s["training"]["parallelism"] == "fsdp" and s["hardware"]["count"] == 2  # no --count: 2, said so
    assert any("hardware.count: 2" in a and "--count" in a for a in r.assumptions)
    # conversations with from/value (message_property_mappings) is sharegpt; attention: flash with 2-row packs
    assert s["data"]["format"] == "sharegpt" and s["data"]["path"] == "mlabonne/FineTome-100k"
    assert s["training"]["attention"] == "sdpa" and s["data"]["packing"] is True
    assert "datasets[0].split" in unmapped(r)
    assert {"liger_rms_norm", "liger_glu_activation", "liger_rope"} <= {d.source for d in r.differences}


def test_axolotl_deepspeed_zero3_reads_its_json(tmp_path):
    config = AX / "gpt-oss" / "gpt-oss-20b-fft-deepspeed-zero3.yaml"
    r = imported(config, tmp_path, count=8)
    s = spec_of(r)
    assert s["model"] == {"name": "openai/gpt-oss-20b", "dtype": "bfloat16"}
    assert s["training"]["parallelism"] == "deepspeed-zero3"
    assert next(m for m in r.mapped if m.key == "training.parallelism").note == \
        "ZeRO stage 3 (from deepspeed_configs/zero3_bf16.json)"
    assert s["training"]["loss"] == "chunked"  # the Cut Cross Entropy plugin is on once listed
    assert s["training"]["activation_offloading"] is True and s["training"]["optimizer"] == "adamw_8bit"
    assert s["training"]["attention"] == "flash_attention_2"  # micro_batch_size 1: flash-attention as they run it
    lines = [n for n, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("attn_implementation:")]
    assert any(f":{lines[1]}: attn_implementation is written twice (first on line {lines[0]})" in a
               for a in r.assumptions)
    # without the JSON next to it, the stage comes from the file name, and the spec says so
    alone = tmp_path / "alone.yaml"
    shutil.copy(config, alone)
    r = imported(alone, tmp_path)
    assert spec_of(r)["training"]["parallelism"] == "deepspeed-zero3"
    assert any("ZeRO stage 3 read from its file name" in a for a in r.assumptions)


def test_axolotl_gpt_oss_lora_and_fsdp2(tmp_path):
    r = imported(AX / "gpt-oss" / "gpt-oss-20b-sft-lora-singlegpu.yaml", tmp_path)
    s = spec_of(r)
    assert s["method"] == {"name": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert s["training"]["attention"] == "flash_attention_2" and s["training"]["gradient_accumulation_steps"] == 8
    assert "attn_implementation" in unmapped(r)  # the Hub flash kernel: the same tensors as flash_attention
    assert "use_kernels" in {d.source for d in r.differences}
    r = imported(AX / "gpt-oss" / "gpt-oss-20b-fft-fsdp2.yaml", tmp_path, count=4)
    s = spec_of(r)
    assert s["method"] == {"name": "full"} and s["training"]["parallelism"] == "fsdp"
    assert not [d for d in r.differences if "FSDP1" in d.text or "offloads" in d.text]  # v2, offload_params: false


def test_axolotl_full_8b_and_mistral_qlora(tmp_path):
    s = spec_of(imported(AX / "llama-3" / "fft-8b.yaml", tmp_path))
    assert s["method"] == {"name": "full"} and s["data"]["seq_len"] == 8192
    assert s["training"]["optimizer"] == "paged_adamw_8bit" and s["training"]["micro_batch_size"] == 1
    assert s["training"]["gradient_accumulation_steps"] == 8 and s["training"]["attention"] == "flash_attention_2"
    r = imported(AX / "mistral" / "qlora.yml", tmp_path)
    s = spec_of(r)
    assert s["model"] == {"name": "mistralai/Mistral-7B-v0.1", "dtype": "auto"}
    assert s["method"]["target_modules"] == "all-linear"  # lora_target_linear adds every linear to the list
    assert s["training"]["optimizer"] == "adamw_8bit" and s["data"]["eval_fraction"] == 0.1


def test_axolotl_defaults_are_pinned(tmp_path):
    """A config that leaves memory settings out gets axolotl's defaults, not the planner's choices."""
    config = tmp_path / "minimal.yml"
    config.write_text("base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nlora_r: 16\nlora_alpha: 32\n"
                      "learning_rate: 0.0001\ndatasets:\n  - path: data.jsonl\n    type: chat_template\n")
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    s = spec_of(imported(config, tmp_path))
    assert s["data"]["seq_len"] == 512 and s["data"]["packing"] is False and s["data"]["eval_fraction"] == 0.0
    assert s["training"]["micro_batch_size"] == 1 and s["training"]["gradient_accumulation_steps"] == 1
    assert s["training"]["gradient_checkpointing"] is False  # axolotl's default, unlike the planner's
    assert s["training"]["optimizer"] == "adamw_torch" and s["training"]["epochs"] == 1.0
    assert s["method"]["dropout"] == 0.0 and s["training"]["loss"] == "full"
    assert s["data"]["path"] == "data.jsonl" and s["data"]["format"] == "chat"  # found here: relative to the spec


# --- LLaMA-Factory -------------------------------------------------------------------------------------------------

def test_llamafactory_lora(tmp_path):
    r = imported(LF / "train_lora" / "llama3_lora_sft.yaml", tmp_path)
    assert r.tool == "LLaMA-Factory"
    s = spec_of(r)
    assert s["model"] == {"name": "meta-llama/Meta-Llama-3-8B-Instruct", "dtype": "bfloat16"}
    # lora_rank 8; lora_alpha and lora_dropout left out: 2 × rank and 0; lora_target: all
    assert s["method"] == {"name": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert s["training"]["gradient_checkpointing"] is True  # LLaMA-Factory turns it on unless disabled
    assert (s["training"]["micro_batch_size"], s["training"]["gradient_accumulation_steps"]) == (1, 8)
    assert s["training"]["learning_rate"] == 1e-4 and s["training"]["epochs"] == 3.0
    assert s["training"]["lr_scheduler"] == "cosine" and s["training"]["warmup_ratio"] == 0.1
    assert s["training"]["loss"] == "full" and s["training"]["optimizer"] == "adamw_torch"
    assert s["data"]["seq_len"] == 2048 and s["data"]["packing"] is False and s["data"]["eval_fraction"] == 0.0
    # dataset: identity,alpaca_en_demo -> data/dataset_info.json file_name entries (alpaca formatting)
    root = DATA / "llamafactory" / "data"
    assert [Path(tmp_path, p).resolve() for p in s["data"]["path"]] == [root / "identity.json",
                                                                        root / "alpaca_en_demo.json"]
    assert s["data"]["format"] == "instruction"
    assert "trust_remote_code" in unmapped(r) and "max_samples" not in unmapped(r, "unknown")


def test_llamafactory_qlora_and_fsdp_qlora(tmp_path):
    s = spec_of(imported(LF / "train_qlora" / "llama3_lora_sft_otfq.yaml", tmp_path))
    assert s["method"] == {"name": "qlora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert s["data"]["eval_fraction"] == 0.1
    r = imported(LF / "extras" / "fsdp_qlora" / "llama3_lora_sft.yaml", tmp_path, count=2)
    s = spec_of(r)
    assert s["method"]["name"] == "qlora" and s["method"]["target_modules"] == ["q_proj", "v_proj"]
    assert s["model"]["dtype"] == "float16" and s["data"]["seq_len"] == 1024  # fp16: true; cutoff_len 1024
    assert "parallelism" not in s["training"]  # FSDP comes from accelerate's config, not this file: said so
    assert any("accelerate" in a for a in r.assumptions)


def test_llamafactory_deepspeed(tmp_path):
    r = imported(LF / "train_full" / "llama3_full_sft.yaml", tmp_path)
    s = spec_of(r)
    assert s["method"] == {"name": "full"} and s["training"]["parallelism"] == "deepspeed-zero3"
    assert s["training"]["learning_rate"] == 1e-5 and s["training"]["gradient_accumulation_steps"] == 2
    assert s["hardware"]["count"] == 2 and not r.differences  # DeepSpeed keeps fp32 masters, as estimated
    s = spec_of(imported(LF / "train_lora" / "llama3_lora_sft_ds3.yaml", tmp_path, count=4))
    assert s["method"]["name"] == "lora" and s["training"]["parallelism"] == "deepspeed-zero3"
    assert s["hardware"]["count"] == 4 and s["data"]["eval_fraction"] == 0.1


def test_llamafactory_full_without_deepspeed_says_fp32_masters(tmp_path):
    """Without pure_bf16 or DeepSpeed, LLaMA-Factory keeps the trained weights in fp32 (adapter.py init_adapter)."""
    text = (LF / "train_full" / "llama3_full_sft.yaml").read_text()
    config = tmp_path / "full_no_ds.yaml"
    config.write_text("\n".join(line for line in text.splitlines() if not line.startswith("deepspeed:")))
    r = imported(config, tmp_path)
    weights = [d.text for d in r.differences if d.term == "weights"]
    # fp32 weights (+2), gradients (+2) and AdamW states (+2 × 2) over pure bf16: 8 bytes × 8,030,261,248 = 59.8 GiB
    assert len(weights) == 1 and "8 bytes per parameter" in weights[0] and "59.8 GiB" in weights[0]


def test_llamafactory_galore_is_named_not_supported(tmp_path):
    r = imported(LF / "extras" / "galore" / "llama3_full_sft.yaml", tmp_path)
    s = spec_of(r)
    assert s["method"] == {"name": "full"} and s["model"]["dtype"] == "bfloat16"  # pure_bf16
    assert "use_galore" in unmapped(r, "not supported")
    assert {"galore_layerwise", "galore_target", "galore_rank", "galore_scale"} <= unmapped(r)
    assert not [d for d in r.differences if d.term == "weights"]  # pure_bf16: what the estimate counts


def test_llamafactory_without_dataset_info_says_so(tmp_path):
    config = tmp_path / "lora.yaml"
    shutil.copy(LF / "train_lora" / "llama3_lora_sft.yaml", config)
    r = imported(config, tmp_path)
    assert "path" not in spec_of(r)["data"]
    assert any("dataset: identity: no data/dataset_info.json found here" in a for a in r.assumptions)


# --- every example: each key accounted for, the spec round-trips, estimates, plans ---------------------------------

EXAMPLES = sorted(p for p in DATA.rglob("*.y*ml"))
COUNTS = {"gpt-oss-20b-fft-deepspeed-zero3.yaml": 8, "gpt-oss-20b-fft-fsdp2.yaml": 8}


def test_every_example_is_exercised():
    assert len(EXAMPLES) == 15, [p.name for p in EXAMPLES]  # 9 axolotl, 6 LLaMA-Factory


@pytest.mark.parametrize("config", [p for p in EXAMPLES if "70b" not in p.name], ids=lambda p: p.name)
def test_every_key_is_accounted_for_and_the_spec_estimates(config, tmp_path, capsys):
    r = imported(config, tmp_path, count=COUNTS.get(config.name))
    keys = set(yaml.safe_load(config.read_text()))
    words = {w for m in r.mapped for w in re.findall(r"[A-Za-z0-9_]+", m.source)}
    seen = words | {u.key.split(".")[0].split("[")[0] for u in r.unmapped} | set(r.empty_keys) \
        | {d.source for d in r.differences}
    assert keys <= seen, keys - seen
    text = to_toml(r, config.name, "test")
    assert tomllib.loads(text) == r.spec_dict()
    out = tmp_path / "spec.toml"
    rc, _, err = run(capsys, "import", config, "--gpu", "H100-SXM", "--count", r.value("hardware.count"), "-o", out)
    assert rc == 0 and f"estimate: {r.method} on" in err
    rc, stdout, _ = run(capsys, "estimate", out, "--json")
    assert rc == 0, stdout
    import json

    method = json.loads(stdout)["methods"][r.method]
    assert method["peak_allocated_bytes"] == r.report.estimates[r.method].peak_allocated_bytes


def test_stdout_is_the_same_spec_and_the_summary_goes_to_stderr(tmp_path, capsys):
    config = AX / "llama-3" / "qlora.yml"
    rc, out, err = run(capsys, "import", config, "--gpu", "RTX-4090")
    assert rc == 0 and tomllib.loads(out)["hardware"] == {"gpu": "RTX-4090", "count": 1}
    assert "qlora on RTX-4090" in err and "[model]" not in err
    rc, _, _ = run(capsys, "import", config, "--gpu", "RTX-4090", "-o", tmp_path / "a.toml")
    assert (tmp_path / "a.toml").read_text() == out


def test_imported_spec_plans_and_generates(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    assert run(capsys, "import", AX / "llama-3" / "qlora.yml", "--gpu", "A100-80GB", "-o", spec)[0] == 0
    rc, out, err = run(capsys, "plan", spec, "--json")
    assert rc == 0, err
    import json

    chosen = json.loads(out)["chosen"]
    assert chosen["method"] == "qlora" and chosen["hyperparameters"]["rank"] == 32
    assert chosen["geometry"]["micro_batch_size"] == 2 and chosen["geometry"]["gradient_accumulation_steps"] == 4
    rc, _, err = run(capsys, "generate", spec, "-o", tmp_path / "project")
    assert rc == 0, err
    plan = tomllib.loads((tmp_path / "project" / "plan.toml").read_text())
    assert "tatsu-lab/alpaca" in str(plan)  # the hub dataset, read when the run starts


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("base_model: [unclosed\n", "bad.yaml:2:1: YAML syntax error"),  # where the parser found it
    ("learning_rate: 0.1\nlora_r: 8\n", "neither an axolotl config"),
    ("- just\n- a list\n", "not a mapping of settings"),
    ("", "the YAML document is empty"),
    ("model_name_or_path: Qwen/Qwen2.5-7B\ndataset_name: trl-lib/Capybara\nuse_peft: true\n", "TRL"),
    ("base_model: NousResearch/Meta-Llama-3-8B\nadapter: foo\n", "adapter: 'foo' is not an adapter peftplan plans"),
    ("base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nlora_r: abc\n", "lora_r: must be an integer"),
    ("base_model: NousResearch/Meta-Llama-3-8B\nadapter: qlora\n", "qlora needs load_in_4bit"),
    ("base_model: no-such-org/no-such-model\n", "base_model: unknown model"),
    ("model_name_or_path: meta-llama/Meta-Llama-3-8B\nfinetuning_type: oft\n", "finetuning_type: 'oft'"),
    ("base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nlora_target_modules: [w1]\n", "lora_target_modules"),
])
def test_bad_configs_are_one_clear_line(text, needle, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    rc, out, err = run(capsys, "import", bad, "-o", tmp_path / "spec.toml")
    assert rc == 2 and needle in err and out == ""
    assert not (tmp_path / "spec.toml").exists()


def test_unknown_gpu_missing_file_and_no_pyyaml(tmp_path, capsys, monkeypatch):
    config = AX / "llama-3" / "qlora.yml"
    rc, _, err = run(capsys, "import", config, "--gpu", "H1000")
    assert rc == 2 and "--gpu: unknown device 'H1000'" in err
    rc, _, err = run(capsys, "import", tmp_path / "nope.yml")
    assert rc == 2 and "config file not found" in err
    rc, _, err = run(capsys, "import", tmp_path)
    assert rc == 2 and "is a directory" in err
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # `import yaml` raises ImportError, as uninstalled
    rc, _, err = run(capsys, "import", config)
    assert rc == 2 and "pip install pyyaml" in err


def test_existing_output_is_never_replaced_without_force(tmp_path, capsys):
    config = AX / "llama-3" / "qlora.yml"
    out = tmp_path / "spec.toml"
    out.write_text("mine\n")
    rc, _, err = run(capsys, "import", config, "-o", out)
    assert rc == 2 and "exists: pass --force" in err and out.read_text() == "mine\n"
    rc, _, _ = run(capsys, "import", config, "-o", out, "--force")
    assert rc == 0 and tomllib.loads(out.read_text())["method"]["name"] == "qlora"
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    rc, _, err = run(capsys, "import", config, "-o", folder, "--force")
    assert rc == 2 and "not a regular file" in err and folder.is_dir()
    link = tmp_path / "link.toml"
    link.symlink_to(tmp_path / "elsewhere.toml")
    rc, _, _ = run(capsys, "import", config, "-o", link)
    assert rc == 2 and not (tmp_path / "elsewhere.toml").exists()
    rc, _, err = run(capsys, "import", config, "-o", tmp_path / "no" / "such" / "spec.toml")
    assert rc == 2 and "does not exist" in err


def test_text_from_the_config_is_escaped(tmp_path, capsys):
    config = tmp_path / "evil.yml"
    config.write_text("base_model: NousResearch/Meta-Llama-3-8B\nwandb_name: \"run\\u202e\\x1b[31mred\"\n"
                      "datasets:\n  - path: \"x\\u202e.jsonl\"\n    type: alpaca\n")
    rc, out, err = run(capsys, "import", config)
    assert rc == 0
    assert "\u202e" not in out + err and "\x1b" not in out + err
    assert tomllib.loads(out)["data"]["path"] == "x\u202e.jsonl"  # escaped in the TOML string, the same value


@pytest.mark.parametrize("name, stage, terms", [
    ("deepspeed_configs/zero3_bf16_cpuoffload_params.json", "deepspeed-zero3", {"weights"}),  # axolotl's names
    ("deepspeed_configs/zero3_bf16_cpuoffload_all.json", "deepspeed-zero3", {"weights", "optimizer"}),
    ("deepspeed_configs/zero1.json", "deepspeed-zero2", {"gradients"}),  # ZeRO-1 keeps gradients whole: said so
    ("examples/deepspeed/ds_z2_offload_config.json", "deepspeed-zero2", {"optimizer"}),  # LLaMA-Factory's names
    ("examples/deepspeed/ds_z0_config.json", "ddp", set()),
])
def test_deepspeed_stage_and_offload_from_file_names(name, stage, terms, tmp_path):
    config = tmp_path / "ds.yml"
    config.write_text(f"base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nlora_r: 8\ndeepspeed: {name}\n")
    r = imported(config, tmp_path, count=4)
    assert spec_of(r)["training"]["parallelism"] == stage
    assert {d.term for d in r.differences if d.source == "deepspeed"} == terms


def test_inline_deepspeed_and_preference_training(tmp_path):
    config = tmp_path / "inline.yml"
    config.write_text("base_model: NousResearch/Meta-Llama-3-8B\nadapter: lora\nlora_r: 8\nrl: dpo\n"
                      "deepspeed:\n  zero_optimization:\n    stage: 2\n")
    r = imported(config, tmp_path, count=2)
    assert spec_of(r)["training"]["parallelism"] == "deepspeed-zero2"
    assert "rl" in unmapped(r, "not supported") and "rl" in {d.source for d in r.differences}
    config = tmp_path / "dpo.yaml"
    config.write_text("model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct\nstage: dpo\nfinetuning_type: lora\n")
    r = imported(config, tmp_path)
    assert "stage" in unmapped(r, "not supported") and spec_of(r)["method"]["name"] == "lora"


def test_llamafactory_defaults_are_pinned(tmp_path):
    """LLaMA-Factory's and transformers' defaults for what a config leaves out (hparams/*_args.py)."""
    config = tmp_path / "minimal.yaml"
    config.write_text("model_name_or_path: meta-llama/Meta-Llama-3-8B\nstage: sft\ndataset: mine\n")
    s = spec_of(imported(config, tmp_path))
    assert s["method"] == {"name": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert s["training"]["micro_batch_size"] == 8 and s["training"]["gradient_accumulation_steps"] == 1
    assert s["training"]["gradient_checkpointing"] is True and s["training"]["loss"] == "full"
    assert s["training"]["learning_rate"] == 5e-5 and s["training"]["epochs"] == 3.0
    assert s["training"]["lr_scheduler"] == "linear" and s["training"]["optimizer"] == "adamw_torch"
    assert s["data"]["seq_len"] == 2048 and s["data"]["packing"] is False and s["data"]["eval_fraction"] == 0.0
    assert s["model"]["dtype"] == "auto"
    # stage pt packs by default and reads plain text; disable_gradient_checkpointing turns it off
    config.write_text("model_name_or_path: meta-llama/Meta-Llama-3-8B\nstage: pt\nfinetuning_type: lora\n"
                      "disable_gradient_checkpointing: true\nenable_liger_kernel: true\nlora_rank: 16\n")
    s = spec_of(imported(config, tmp_path))
    assert s["data"]["packing"] is True and s["training"]["gradient_checkpointing"] is False
    assert s["training"]["loss"] == "chunked" and s["method"]["alpha"] == 32.0  # 2 × lora_rank
