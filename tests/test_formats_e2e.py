"""Every data layout a user brings, trained end to end on the CPU: `peftplan generate` a project from a spec
that points at the files, then its own `train.py` for a few steps.

ShareGPT (JSONL), instruction records (CSV), completions (Parquet), plain text (.txt, documents separated by
blank lines) and several weighted files with a separate evaluation file. The expectations (how many records
each file holds, how many examples a weight makes) come from the files written here, not from the runtime.
These tests start training processes; they need the [train] extra.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from support import OFFLINE_ENV

pytest.importorskip("torch", reason="needs the [train] extra")
pytest.importorskip("peft", reason="needs the [train] extra")

STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from peftplan.runtime.testing import build_tiny_model

    root = tmp_path_factory.mktemp("formats")
    build_tiny_model(root / "model", family="llama", hidden_size=64, intermediate_size=128)
    return root


def spec(data: dict) -> dict:
    return {"model": {"name": "model"}, "data": {"seq_len": 128, "packing": False, **data},
            "hardware": {"gpu": "cpu", "memory_gib": 8},
            "method": {"name": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "epochs": 1,
                         "learning_rate": 2e-3}}


def generate_and_train(workspace: Path, name: str, data: dict) -> tuple[dict, list[float]]:
    (workspace / f"{name}.toml").write_text(tomli_w.dumps(spec(data)))
    project = workspace / name
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", f"{name}.toml", "-o", name],
                          cwd=workspace, capture_output=True, text=True, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "train.py", "--max-steps", str(STEPS)], cwd=project, capture_output=True,
                          text=True, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    losses = [r["loss"] for r in rows if "loss" in r and "event" not in r]
    assert (project / "outputs" / "final" / "adapter_model.safetensors").exists()
    return start, losses


def trained(losses: list[float]) -> None:
    import math

    assert losses and all(math.isfinite(x) and x > 0 for x in losses), losses


@pytest.mark.slow
def test_sharegpt_jsonl(workspace):
    from peftplan.runtime.testing import example_records, write_records

    write_records(workspace / "sharegpt.jsonl", example_records("sharegpt", 80))
    start, losses = generate_and_train(workspace, "sharegpt", {"path": "sharegpt.jsonl", "eval_fraction": 0.1})
    assert start["format"] == "sharegpt"
    assert start["dropped"] == 0  # at 128 tokens every example keeps a trained token
    assert start["train_examples"] == 72 and start["eval_examples"] == 8  # 10% of 80 held out
    trained(losses)


@pytest.mark.slow
def test_instruction_csv_and_completion_parquet_in_one_run(workspace):
    from peftplan.runtime.testing import example_records, write_records

    write_records(workspace / "alpaca.csv", example_records("instruction", 40))
    write_records(workspace / "pairs.parquet", example_records("completion", 24))
    start, losses = generate_and_train(workspace, "mixed-files", {"path": ["alpaca.csv", "pairs.parquet"],
                                                                 "eval_fraction": 0.0})
    by = {Path(s["path"]).name: s for s in start["sources"]}
    assert by["alpaca.csv"]["format"] == "instruction" and by["alpaca.csv"]["records"] == 40
    assert by["pairs.parquet"]["format"] == "completion" and by["pairs.parquet"]["records"] == 24
    assert start["train_examples"] == 64
    trained(losses)


@pytest.mark.slow
def test_plain_text_documents(workspace):
    documents = [f"Document {i}. The red cat sees the dog in the park.\nIt is day {i}." for i in range(30)]
    (workspace / "notes.txt").write_text("\n\n\n".join(documents) + "\n")  # runs of blank lines separate documents
    start, losses = generate_and_train(workspace, "text", {"path": "notes.txt", "eval_fraction": 0.0})
    assert start["format"] == "text" and start["train_examples"] == 30  # a line break inside a document keeps it whole
    trained(losses)


@pytest.mark.slow
def test_weighted_sources_with_a_separate_eval_file(workspace):
    from peftplan.runtime.testing import example_records, write_records

    write_records(workspace / "chat.jsonl", example_records("chat", 20))
    write_records(workspace / "more.jsonl", example_records("text", 40))
    write_records(workspace / "held.json", example_records("sharegpt", 12))
    data = {"sources": [{"path": "chat.jsonl", "weight": 2.0}, {"path": "more.jsonl", "weight": 0.5}],
            "eval_path": "held.json"}
    start, losses = generate_and_train(workspace, "weighted", data)
    by = {(Path(s["path"]).name, s["role"]): s for s in start["sources"]}
    assert by[("chat.jsonl", "train")]["examples"] == 2 * 20  # weight 2: every example twice
    assert by[("more.jsonl", "train")]["examples"] == 40 // 2  # weight 0.5: half of them
    assert by[("held.json", "eval")]["records"] == 12 and by[("held.json", "eval")]["format"] == "sharegpt"
    assert start["train_examples"] == 60 and start["eval_examples"] == 12
    trained(losses)
