"""Pushing to the Hub: refused offline and without a token before any network call (huggingface_hub's upload
functions are replaced by ones that fail the test if called), only the model's own files selected, and a dry run
that writes the card and pushes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

torch = pytest.importorskip("torch")
huggingface_hub = pytest.importorskip("huggingface_hub")

from peftplan.runtime.card import CARD_MARKER  # noqa: E402
from peftplan.runtime.push import PushError, files_to_push, main, push  # noqa: E402

NETWORK = ("create_repo", "create_commit", "upload_folder", "upload_file", "upload_large_folder", "whoami",
           "create_branch", "repo_info")


@pytest.fixture
def no_network(monkeypatch):
    """Every huggingface_hub entry point that talks to the Hub fails the test if it is called."""
    calls = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"huggingface_hub.{name} was called: a network call was attempted")
        return fail

    assert all(hasattr(huggingface_hub.HfApi, n) for n in ("create_repo", "create_commit", "upload_folder"))
    for name in NETWORK:
        if hasattr(huggingface_hub.HfApi, name):
            monkeypatch.setattr(huggingface_hub.HfApi, name, refuse(f"HfApi.{name}"))
        if hasattr(huggingface_hub, name):
            monkeypatch.setattr(huggingface_hub, name, refuse(name))
    return calls


def make_project(root: Path, method: str = "lora") -> Path:
    from safetensors.torch import save_file

    plan = {
        "provenance": {"peftplan_version": "0.0.test"},
        "model": {"name": "org/base"},
        "method": {"name": method, "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "data.jsonl", "format": "auto", "seq_len": 64, "packing": False, "eval_fraction": 0.0},
        "training": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                     "optimizer": "adamw_torch", "learning_rate": 1e-3, "epochs": 1.0, "precision": "fp32"},
    }
    root.mkdir(parents=True)
    (root / "plan.toml").write_text(tomli_w.dumps(plan))
    final = root / "outputs" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 8)}, str(final / "adapter_model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (final / name).write_text("{}")
    (final / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (final / "notes.txt").write_text("mine")
    (final / "checkpoint-3").mkdir()
    (final / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"x")
    (final / "additional_chat_templates").mkdir()
    (final / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (final / "config.json.bak").write_text("{}")
    (root / "secret.env").write_text("HF_TOKEN=hf_xxx")
    (final / "merges.txt").symlink_to(root / "secret.env")  # an allowed name, but a link out of the folder
    return root / "plan.toml"


def test_only_model_files_are_selected(tmp_path):
    plan = make_project(tmp_path / "p")
    pushed, left = files_to_push(plan.parent / "outputs" / "final")
    assert pushed == ["adapter_config.json", "adapter_model.safetensors", "additional_chat_templates/tool_use.jinja",
                      "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert left == ["checkpoint-3/adapter_model.safetensors", "config.json.bak", "merges.txt", "notes.txt",
                    "training_args.bin"]


def test_shards_of_a_merged_model(tmp_path):
    d = tmp_path / "merged"
    d.mkdir()
    for name in ("config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", ".peftplan_merged",
                 "model-1-of-2.safetensors", "pytorch_model.bin"):
        (d / name).write_text("x")
    pushed, left = files_to_push(d)
    assert pushed == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                      "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert left == [".peftplan_merged", "model-1-of-2.safetensors", "pytorch_model.bin"]


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_refused_offline_without_a_network_call(tmp_path, monkeypatch, no_network, capsys, var):
    plan = make_project(tmp_path / "p")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(PushError, match=rf"^{var} is set: nothing is pushed offline"):
        push(plan, "me/model")
    assert main(["me/model", "--config", str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {var} is set: nothing is pushed offline") and err.count("\n") == 1
    assert no_network == []
    assert (plan.parent / "outputs" / "final" / "README.md").exists() is False  # nothing written either


def test_refused_without_a_token(tmp_path, monkeypatch, no_network):
    plan = make_project(tmp_path / "p")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert huggingface_hub.get_token() is None
    with pytest.raises(PushError, match=r"^no Hugging Face token: run `hf auth login`, or set HF_TOKEN"):
        push(plan, "me/model")
    assert no_network == []


def test_dry_run_writes_the_card_offline(tmp_path, monkeypatch, no_network, capsys):
    plan = make_project(tmp_path / "p")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["me/model", "--config", str(plan), "--dry-run"]) == 0
    out = capsys.readouterr().out
    readme = plan.parent / "outputs" / "final" / "README.md"
    assert CARD_MARKER in readme.read_text() and 'from_pretrained("me/model")' in readme.read_text()
    assert "would push 7 files: README.md, adapter_config.json," in out
    assert "not pushed (not model files): checkpoint-3/adapter_model.safetensors, config.json.bak, merges.txt, " \
           "notes.txt, training_args.bin" in out
    assert no_network == []


@pytest.mark.parametrize("repo, why", [("a/b/c", "not a valid repository id"), ("bad name/x", "not a valid"),
                                       ("me/model--x", "not a valid")])
def test_bad_repo_ids(tmp_path, no_network, repo, why):
    plan = make_project(tmp_path / "p")
    with pytest.raises(PushError, match=why):
        push(plan, repo, dry_run=True)


def test_merged_needs_a_merge_first(tmp_path, no_network):
    plan = make_project(tmp_path / "p")
    with pytest.raises(PushError, match=r"outputs/merged does not exist: merge first \(python merge.py\)"):
        push(plan, "me/model", merged=True, dry_run=True)
