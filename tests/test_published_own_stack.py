"""Published peak-memory measurements of peftplan's own stack (HF transformers + peft, bitsandbytes for 4-bit)
against the estimate, with bounds that say what the planner relies on.

test_published_comparison.py checks how each published row is modelled and holds the four close-stack rows within
10%. This file tightens what peftplan's fit decision needs (docs/accuracy.md §2 lists the rows and their errors):

- Rows measured as *allocated* on the HF model + peft with none of the known precision mismatches: within 5%.
  The planner keeps 5% of the device free (FIT_HEADROOM_FRACTION); an estimate of its own stack that is short by
  more than that turns a plan that "fits" into an out-of-memory crash. Measured today: worst −2.3%.
- The activation slope: the same run at micro-batch 4 and 8 (4 × 4,096 more tokens) measured +10.99 GB for
  Mistral-7B LoRA and for Mixtral-8x7B QLoRA alike. The difference cancels every static term (weights, adapter,
  optimizer state), so it checks the per-token terms on their own: within 5%, as above (today: −1.2%).
- Rows measured as *reserved* (PEFT's method comparison on an L40S, HF transformers + peft): within 10% of
  device_total_bytes. A reserved figure includes the caching allocator's fragmentation, which the estimate covers
  with a flat 10% of the peak (ALLOCATOR_RESERVE_FRACTION) where torch's notes and published runs show 5-25%: the
  estimate cannot claim more than that reserve's own size. Measured today: +3.2%, −0.0%, +8.4%.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import published  # noqa: E402

ALLOCATED = ["fms-mistral7b-lora-r16-bs4-1gpu", "fms-mistral7b-lora-r16-bs8-1gpu",
             "fms-mixtral8x7b-qlora-accel-bnb-bs4-1gpu", "fms-mixtral8x7b-qlora-accel-bnb-bs8-1gpu",
             # Answer.AI's fsdp_qlora: the HF model and peft adapters in its own training loop, measured allocated
             "answerai-llama2-7b-lora-bs1-512-allocated", "answerai-llama2-7b-lora-bs1-2048-allocated"]
RESERVED = ["peft-mc-llama32-3b-lora-r32-qv", "peft-mc-llama32-3b-dora-r32-qv", "peft-mc-llama32-3b-full"]
SLOPES = [("fms-mistral7b-lora-r16-bs4-1gpu", "fms-mistral7b-lora-r16-bs8-1gpu"),
          ("fms-mixtral8x7b-qlora-accel-bnb-bs4-1gpu", "fms-mixtral8x7b-qlora-accel-bnb-bs8-1gpu")]


@pytest.fixture(scope="module")
def recs() -> dict[str, dict]:
    with (ROOT / "docs" / "published_measurements.toml").open("rb") as fh:
        rows = [r for r in tomllib.load(fh)["measurements"] if r["id"] in set(ALLOCATED + RESERVED)]
    out = {r["id"]: r for r in published.compare(rows)}
    assert set(out) == set(ALLOCATED + RESERVED)  # every row named here is still in the data
    return out


@pytest.mark.parametrize("rid", ALLOCATED)
def test_own_stack_allocated_rows_within_the_fit_headroom(recs, rid):
    r = recs[rid]
    assert r["status"] == "compared" and r["compared_with"] == "peak_allocated_bytes"
    assert not r["stack_mismatch"]
    assert abs(r["error"]) <= 0.05, (rid, r["error"])


@pytest.mark.parametrize("small,large", SLOPES)
def test_activation_slope_from_batch_4_to_8(recs, small, large):
    a, b = recs[small], recs[large]
    assert (a["micro_batch_size"], b["micro_batch_size"], a["seq_len"], b["seq_len"]) == (4, 8, 4096, 4096)
    measured = b["published_bytes"] - a["published_bytes"]  # 37.10 − 26.11 GB, 47.21 − 36.22 GB
    assert measured == pytest.approx(10.99e9, rel=1e-3)
    estimated = b["est_peak_allocated_bytes"] - a["est_peak_allocated_bytes"]
    assert abs(estimated - measured) / measured <= 0.05, (small, estimated, measured)


@pytest.mark.parametrize("rid", RESERVED)
def test_own_stack_reserved_rows_within_the_allocator_reserve(recs, rid):
    r = recs[rid]
    assert r["status"] == "compared" and r["compared_with"] == "device_total_bytes"
    assert abs(r["error"]) <= 0.10, (rid, r["error"])
