"""benchmarks/published.py models what each published stack ran: the loss, the model entry, activation offloading.

The expectations are written by hand from the sources (docs/published_measurements.toml notes, the stacks' code)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import published  # noqa: E402


@pytest.fixture(scope="module")
def recs() -> dict[str, dict]:
    with (ROOT / "docs" / "published_measurements.toml").open("rb") as fh:
        rows = tomllib.load(fh)["measurements"]
    return {r["id"]: r for r in published.compare(rows)}


LOSS = {
    # torchtune rows that state CEWithChunkedOutputLoss / chunked CE
    "torchtune-readme-llama31-8b-qlora-4090": "chunked",
    "torchtune-readme-llama32-3b-full-packed-compile-chunkedce": "chunked",
    "torchtune-readme-llama32-3b-full-packed-ac": "chunked",
    # torchtune rows that state the standard loss, or ran before torchtune had a chunked one
    "torchtune-readme-llama32-3b-full-packed4096": "full",
    "torchtune-tut-llama2-7b-lora-qv-r8": "full",
    # not stated: torchtune's llama3_1 configs at the README's commit
    "torchtune-readme-llama31-8b-full-4090": "chunked",
    # transformers' own loss (HF Trainer, PEFT's run.py, fsdp_qlora's train.py) and LitGPT's whole-batch logits
    "fms-mistral7b-lora-r16-bs4-1gpu": "full",
    "fms-mixtral8x7b-qlora-accel-bnb-bs4-1gpu": "full",
    "peft-mc-llama32-3b-dora-r32-qv": "full",
    "answerai-llama2-7b-lora-bs1-2048-allocated": "full",
    "litgpt-hub-mistral-7b-lora-a10g": "full",
}


@pytest.mark.parametrize("rid,loss", sorted(LOSS.items()))
def test_each_row_is_estimated_with_the_loss_its_stack_computed(recs, rid, loss):
    assert recs[rid]["status"] == "compared"
    assert recs[rid]["loss"] == loss


def test_hub_ids_resolve_to_the_catalog_entry_of_their_architecture(recs):
    assert recs["fms-mixtral8x7b-qlora-accel-bnb-bs8-1gpu"]["catalog_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert recs["torchtune-readme-llama31-70b-lora-8xa100"]["catalog_model"] == "meta-llama/Llama-3.1-70B"
    assert recs["fms-llama2-70b-qlora-bnb-bs2-2gpu-fsdp"]["catalog_model"] == "meta-llama/Llama-2-70b-hf"  # a mirror
    assert recs["litgpt-hub-tinyllama-full-a10g"]["catalog_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def test_activation_offloading_is_compared_parameter_offloading_is_not(recs):
    for rid in ("torchtune-readme-llama32-3b-lora-packed-offload", "torchtune-readme-llama32-3b-qlora-packed-offload"):
        assert recs[rid]["status"] == "compared" and recs[rid]["offload"] is True
    assert recs["answerai-llama2-70b-qlora-cpuoffload-2x3090"]["status"] == "not compared"
    assert recs["torchtune-readme-llama32-3b-full-packed-ac"]["offload"] is False  # mentions offloading rows only


def test_close_stack_rows_and_the_two_known_mismatches(recs):
    close = {rid for rid, r in recs.items() if r.get("close_stack")}
    assert close == {"fms-mistral7b-full-bs4-1gpu", "fms-mistral7b-full-bs2-2gpu-fsdp",
                     "fms-mistral7b-lora-r16-bs4-1gpu", "fms-mistral7b-lora-r16-bs8-1gpu",
                     "fms-mistral7b-qlora-bnb-bs4-1gpu", "fms-llama2-70b-qlora-bnb-bs2-2gpu-fsdp",
                     "fms-mixtral8x7b-qlora-accel-bnb-bs4-1gpu", "fms-mixtral8x7b-qlora-accel-bnb-bs8-1gpu",
                     "fms-mixtral8x7b-qlora-bnb-bs4-1gpu", "fms-mixtral8x7b-qlora-bnb-bs8-1gpu"}
    matched = {rid for rid in close if not recs[rid]["stack_mismatch"]}
    assert matched == {"fms-mistral7b-lora-r16-bs4-1gpu", "fms-mistral7b-lora-r16-bs8-1gpu",
                       "fms-mixtral8x7b-qlora-accel-bnb-bs4-1gpu", "fms-mixtral8x7b-qlora-accel-bnb-bs8-1gpu"}
    for rid in matched:
        assert abs(recs[rid]["error"]) < 0.10, (rid, recs[rid]["error"])
