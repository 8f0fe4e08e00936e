"""A generated project that was damaged or misused: every entry point answers with one line naming the file,
exit 2, never a traceback, and nothing of the user's is overwritten (no training needed: every check here
happens before a model loads)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import OFFLINE_ENV, RunLockHolder, cpu_spec

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "vocab_size": 642, "tie_word_embeddings": False,
}


def run(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=OFFLINE_ENV, timeout=timeout)


def one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    shown = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1, shown
    for needle in needles:
        assert needle in proc.stderr, shown


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (root / "data.jsonl").write_text('{"text": "hello world"}\n' * 8)
    (root / "spec.toml").write_text(cpu_spec(model=root / "model", num_examples=8))
    proc = run("-m", "peftplan", "generate", root / "spec.toml", "-o", root / "proj")
    assert proc.returncode == 0, proc.stderr
    return root / "proj"


@pytest.fixture
def copy(project, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "proj"
    shutil.copytree(project, dst, symlinks=True)
    return dst


DAMAGE = {
    "bad TOML": lambda t: t.replace("[training]", "[training"),
    "wrong type": lambda t: t.replace("micro_batch_size = 4", 'micro_batch_size = "four"'),
    "nan learning rate": lambda t: re.sub(r"(?m)^learning_rate = \S+", "learning_rate = nan", t),
    "launch not a table": lambda t: "launch = 3\n" + t.replace("[launch]", "[launch_old]"),
    "zero devices": lambda t: t.replace("devices_per_node = 1", "devices_per_node = 0"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_plan_toml(copy, damage):
    plan = copy / "plan.toml"
    text = plan.read_text()
    assert DAMAGE[damage](text) != text, "the damage must change the file"
    plan.write_text(DAMAGE[damage](text))
    one_clear_line(run("-m", "peftplan", "run", copy), "plan.toml")
    one_clear_line(run("train.py", cwd=copy), "plan.toml")


def test_plan_toml_not_utf8(copy):
    (copy / "plan.toml").write_bytes((copy / "plan.toml").read_bytes().replace(b"[model]", b"[model]\n# \xff\xfe"))
    one_clear_line(run("-m", "peftplan", "run", copy), "plan.toml", "UTF-8")
    one_clear_line(run("train.py", cwd=copy), "plan.toml", "UTF-8")
    one_clear_line(run("-m", "peftplan", "merge", copy), "plan.toml")


def test_max_steps_must_be_positive(copy):
    for cmd in (("-m", "peftplan", "run", copy, "--max-steps", "0"), ("train.py", "--max-steps", "0")):
        proc = run(*cmd, cwd=copy)
        assert proc.returncode == 2 and "must be at least 1" in proc.stderr, proc.stderr
        assert not (copy / "outputs" / "checkpoint-1").exists()


def test_run_is_refused_while_another_run_holds_the_project(copy):
    with RunLockHolder(copy) as holder:
        one_clear_line(run("train.py", cwd=copy), "another run", str(holder.pid))


def _adapter(d: Path, config: str, weights: bytes | None) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(config)
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return d


GOOD_CONFIG = json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA", "target_modules": ["q_proj"]})


@pytest.mark.parametrize("config,weights,needle", [
    ("{not json", b"", "adapter_config.json: unreadable"),
    (json.dumps({"r": "eight"}), b"", "not a LoRA adapter config"),
    (GOOD_CONFIG, b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "truncated or corrupt"),
    (GOOD_CONFIG, None, "truncated or corrupt"),
])
def test_merge_refuses_a_broken_adapter(copy, config, weights, needle):
    _adapter(copy / "outputs" / "final", config, weights)
    one_clear_line(run("-m", "peftplan", "merge", copy), needle)
    assert not (copy / "outputs" / "merged").exists()


def test_merge_never_writes_over_the_base_model_or_a_users_folder(project, copy, tmp_path):
    import torch
    from safetensors.torch import save_file

    final = _adapter(copy / "outputs" / "final", GOOD_CONFIG, None)
    save_file({"x": torch.zeros(2)}, str(final / "adapter_model.safetensors"))
    model_dir = project.parent / "model"  # plan.toml names the base model by its absolute path
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    one_clear_line(run("-m", "peftplan", "merge", copy, "-o", model_dir), "base model")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    one_clear_line(run("-m", "peftplan", "merge", copy, "-o", mine), "not an earlier merge")
    assert (mine / "notes.txt").read_text() == "mine"
    one_clear_line(run("-m", "peftplan", "merge", copy, "-o", copy), "project")


def test_merge_output_places(tmp_path):
    from peftplan.runtime.merge import MergeError, check_output

    project, base = tmp_path / "proj", tmp_path / "model"
    adapter = project / "outputs" / "final"
    for d in (adapter, base):
        d.mkdir(parents=True)
    places = {"base model": base, "adapter": adapter, "project": project}
    check_output(project / "outputs" / "merged", places)  # the default: a new folder inside the project
    check_output(tmp_path / "elsewhere", places)
    for out, words in [(project, "is the project"), (tmp_path, "contains the"), (base / "sub", "inside the base model"),
                       (adapter / "merged", "inside the adapter"), (base, "is the base model")]:
        with pytest.raises(MergeError) as info:
            check_output(out, places)
        assert words in str(info.value), (out, str(info.value))


def test_run_sh_without_the_training_stack_says_what_to_install(copy, tmp_path):
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\nexit 1\n")  # any import fails
    fake.chmod(0o755)
    proc = subprocess.run(["./run.sh"], cwd=copy, capture_output=True, text=True,
                          env={**OFFLINE_ENV, "PYTHON": str(fake)}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "pip install -r requirements.txt" in proc.stderr and "Traceback" not in proc.stderr
