"""The model card: YAML front matter the Hub reads (parsed back with yaml.safe_load), the plan's and the run's
numbers in the body, hostile names escaped in both, and a README.md of the user's never overwritten."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import tomli_w
import yaml

from peftplan.runtime.card import (
    CARD_MARKER,
    PEFT_DEFAULT,
    display_name,
    hub_id,
    md,
    render_card,
    run_summary,
    write_card,
    yaml_str,
)
from peftplan.runtime.config import load_config

HOSTILE = ('evil"\'\\ name\n---\nlibrary_name: hacked\n<script>alert(1)<img src=x onerror=alert(1)> **bold** '
           '[x](javascript:alert(1)) `code` | cell # h &amp; ~~s~~ $x$ \u202etxt.exe\x1b[31m')


def write_plan(root: Path, *, model: str = "org/base-7b", method: str = "lora", data="data.jsonl",
               eval_path=None, **training) -> Path:
    method_table = {"name": method}
    if method != "full":
        method_table.update(rank=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"])
    data_table = {"path": data, "format": "auto", "seq_len": 512, "packing": True, "eval_fraction": 0.05}
    if eval_path:
        data_table["eval_path"] = eval_path
    plan = {
        "provenance": {"peftplan_version": "1.2.3", "spec_sha256": "ab" * 32},
        "model": {"name": model},
        "method": method_table,
        "data": data_table,
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
                     "optimizer": "paged_adamw_8bit", "learning_rate": 2e-4, "lr_scheduler": "cosine",
                     "warmup_ratio": 0.03, "epochs": 3.0, "precision": "bf16", "seed": 42, **training},
        "output": {"dir": "outputs"},
        "launch": {"parallelism": "ddp", "devices_per_node": 2, "nodes": 1},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.toml").write_text(tomli_w.dumps(plan), encoding="utf-8")
    return root / "plan.toml"


def split_card(text: str) -> tuple[dict, str]:
    lines = text.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])), "\n".join(lines[end + 1:])


METRICS = [
    {"event": "start", "train_examples": 10, "eval_examples": 1, "format": "text"},  # an earlier run
    {"step": 1, "loss": 9.0},
    {"event": "start", "world_size": 2, "train_examples": 950, "eval_examples": 50, "format": "chat", "packed": True},
    {"step": 1, "epoch": 0.01, "loss": 2.5, "learning_rate": 0.0},
    {"event": "peak_memory", "step": 2, "measured_peak_allocated_bytes": 6 * 2**30,
     "predicted_peak_allocated_bytes": 5 * 2**30, "device": "NVIDIA A100-SXM4-80GB"},
    {"step": 10, "epoch": 0.1, "loss": 1.25},
    {"step": 10, "epoch": 0.1, "eval_loss": 1.5, "eval_runtime": 3.0},
    {"step": 10, "train_runtime": 125.4, "train_loss": 1.8},
]


def write_metrics(project: Path) -> None:
    out = project / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in METRICS]
    lines.insert(4, "not json {")
    lines.insert(5, "[1, 2]")
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("text", [
    HOSTILE, "", "---", "...", "a: b", "- item", "#comment", "'single'", '"double"', "back\\slash", "tab\there",
    "cr\rlf\r\n", "nul\x00", "del\x7f", "nel\x85", "ls\u2028ps\u2029", "bom\ufeff", "emoji 🦙",
    "&anchor *alias !tag",
    "{flow: map}", "[flow, seq]", "%YAML", "@at `tick`", "  leading and trailing  ", "ünïcödé 漢字", "yes", "null",
    "1e3", "0x10", "~",
])
def test_yaml_str_reads_back_exactly(text):
    assert yaml.safe_load(f"k: {yaml_str(text)}") == {"k": text}
    assert "\n" not in yaml_str(text)


def test_yaml_str_replaces_a_lone_surrogate():
    assert yaml.safe_load(f"k: {yaml_str('a' + chr(0xD800) + 'b')}") == {"k": "a\ufffdb"}


@pytest.mark.parametrize("text", [HOSTILE, "adamw_8bit", "a | b", "<b>x</b>", "1. not a list", "![img](x.png)"])
def test_md_is_one_line_that_unescapes_to_the_text(text):
    out = md(text, limit=1000)
    assert "\n" not in out and "\r" not in out
    assert not re.search(r"(?<!\\)[<>\[\]|`*_]", out)  # every Markdown/HTML punctuation mark is escaped
    shown = re.sub(r"\\(.)", r"\1", out)
    expected = " ".join(text.split()).replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")
    assert shown == expected


def test_hub_ids(tmp_path):
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_id(str(snap)) == "Qwen/Qwen2.5-7B"
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    assert hub_id("org/model", tmp_path) is None  # a local folder that looks like an id is a local folder
    assert hub_id(str(local)) is None and display_name(str(local)) == "model"
    assert display_name(str(local / "config.json")) == "model"
    for bad in ("a/b/c", "../x", "a--b/c", "org/ name", "/abs/path", "name"):
        assert hub_id(bad) is None, bad


def test_front_matter_for_an_adapter_of_a_hub_model(tmp_path):
    plan = write_plan(tmp_path / "p", data=["data.jsonl", "HuggingFaceH4/ultrachat"])
    write_metrics(tmp_path / "p")
    meta, body = split_card(render_card(load_config(plan), "adapter", repo_id="me/my-adapter"))
    assert meta == {
        "base_model": "org/base-7b", "library_name": "peft", "pipeline_tag": "text-generation",
        "tags": ["peftplan", "lora", "base_model:adapter:org/base-7b"], "datasets": ["HuggingFaceH4/ultrachat"],
        "peftplan": {"version": "1.2.3", "method": "lora", "base": "org/base-7b", "spec_sha256": "ab" * 32},
    }
    assert body.startswith(f"\n{CARD_MARKER}\n\n# A LoRA adapter for org/base-7b\n")
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/my-adapter")' in body


@pytest.mark.parametrize("kind, method, library, tags", [
    ("merged", "qdora", "transformers", ["peftplan", "qdora", "dora"]),
    ("full", "full", "transformers", ["peftplan", "full"]),
])
def test_front_matter_of_merged_and_full_models(tmp_path, kind, method, library, tags):
    plan = write_plan(tmp_path / "p", method=method)
    meta, body = split_card(render_card(load_config(plan), kind))
    assert meta["library_name"] == library and meta["tags"] == tags and meta["base_model"] == "org/base-7b"
    assert 'AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")' in body
    assert "No metrics were recorded" in body


def test_body_has_the_plan_and_the_last_run(tmp_path):
    plan = write_plan(tmp_path / "p", data=str(tmp_path / "private" / "alice" / "chat.jsonl"),
                      eval_path=str(tmp_path / "private" / "val.jsonl"))
    write_metrics(tmp_path / "p")
    text = render_card(load_config(plan), "adapter")
    _, body = split_card(text)
    rows = dict(re.findall(r"^\| (.+?) \| (.+) \|$", body, re.M))
    assert rows["rank r / alpha"] == r"16 / 32 \(update scale alpha/r = 2\)"
    assert rows["target modules"] == r"q\_proj, v\_proj"
    assert rows["optimizer"] == r"paged\_adamw\_8bit"
    assert rows["learning rate"] == r"0.0002 \(cosine, warmup 0.03\)"
    assert rows["batch"] == "4 × 8 accumulation × 2 devices = 64 sequences per step"
    assert rows["sequence length"] == "512 tokens, packed"
    assert rows["files"] == "chat.jsonl" and rows["held out"] == "val.jsonl"  # names only: no local paths
    assert str(tmp_path) not in text
    assert rows["examples"] == "950 training, 50 held out" and rows["format"] == "chat"  # the last run's
    assert rows["training loss"] == r"2.5000 \(step 1\) → 1.2500 \(step 10\)"
    assert rows["held-out loss"] == rf"1.5000 \(perplexity {math.exp(1.5):.2f}\) at step 10"
    assert rows["training time"] == "2 min 5 s for 10 steps"
    assert rows["peak memory"] == "6.00 GiB measured on NVIDIA A100-SXM4-80GB, predicted 5.00 GiB"


def test_run_summary_of_a_missing_file(tmp_path):
    assert run_summary(tmp_path / "nope.jsonl") == {}


def test_hostile_names_stay_values(tmp_path):
    name = str(tmp_path / "models" / HOSTILE)
    plan = write_plan(tmp_path / "p", model=name, data="data.jsonl")
    config = load_config(plan)
    assert config.model["name"] == name
    text = render_card(config, "adapter")
    meta, body = split_card(text)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local model: no Hub id
    assert meta["peftplan"]["base"] == HOSTILE  # exactly the folder's name, read back
    assert set(meta) == {"library_name", "pipeline_tag", "tags", "peftplan"}
    assert text.count("\n---\n") == 1  # the front matter ends once
    for raw in ("](", "**bold**", "~~s~~", "`code`", "\x1b", "\u202e"):
        assert raw not in body, raw
    assert not re.search(r"(?<!\\)[<>]", body.replace(CARD_MARKER, ""))  # no HTML tag can open
    heading = [line for line in body.split("\n") if line.startswith("# ")]
    assert heading == [f"# {md('A LoRA adapter for ' + HOSTILE)}"]
    assert "The base model was a local folder" in body


def test_write_card_keeps_the_users_readme(tmp_path):
    d = tmp_path / "final"
    d.mkdir()
    assert write_card(d, "card 1\n" + CARD_MARKER) and (d / "README.md").read_text() == "card 1\n" + CARD_MARKER
    assert write_card(d, "card 2\n" + CARD_MARKER) and (d / "README.md").read_text().startswith("card 2")  # ours
    (d / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card\n" + PEFT_DEFAULT + "\n")
    assert write_card(d, "card 3") and (d / "README.md").read_text() == "card 3"  # peft's empty template
    (d / "README.md").write_text("# my notes\n")
    assert not write_card(d, "card 4") and (d / "README.md").read_text() == "# my notes\n"
    assert sorted(p.name for p in d.iterdir()) == ["README.md"]  # no temporary files left


def test_card_in_a_merge_folder_is_replaced_by_the_next_merge(tmp_path):
    from peftplan.runtime.merge import MARKER, _publish

    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / MARKER).write_text("model.safetensors\n")
    assert write_card(out, "card\n" + CARD_MARKER)
    assert (out / MARKER).read_text().splitlines() == ["README.md", "model.safetensors"]
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"y")
    _publish(staging, out)  # a second merge: removes what the first wrote, card included, or fails
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
