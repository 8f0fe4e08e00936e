"""Per-device memory under DDP and FSDP against planner.parallel.shard, on two CPU processes (gloo).

The full table is benchmarks/results/calibration-cpu-parallel.csv (benchmarks/calibrate_parallel.py):
each row was measured by launching two ranks through `accelerate launch` with the generated projects'
accelerate_config.yaml (FSDP2, bf16 mixed precision). The table test re-predicts every committed row with
the current estimator; the live test re-measures one FSDP row, so a change in accelerate's wrapping (which
units it gathers when, what it upcasts) that moves memory is caught.
"""

import csv
import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the [train] extra (torch, accelerate, peft, bitsandbytes)")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("calibrate_parallel", ROOT / "benchmarks" / "calibrate_parallel.py")
calibrate_parallel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(calibrate_parallel)


def rows():
    return list(csv.DictReader((ROOT / "benchmarks" / "results" / "calibration-cpu-parallel.csv").open()))


run_of = calibrate_parallel.run_of


def test_committed_parallel_table_within_bounds():
    table = rows()
    assert len(table) >= 40
    assert {r["parallelism"] for r in table} == {"ddp", "fsdp"}
    assert {r["method"] for r in table if r["parallelism"] == "fsdp"} == {"full", "lora", "qlora", "dora", "qdora"}
    errors = []
    for r in table:
        assert r["distributed_type"] == ("DistributedType.FSDP" if r["parallelism"] == "fsdp"
                                         else "DistributedType.MULTI_CPU")
        if r["parallelism"] == "fsdp":  # really sharded: each rank held about half of every parameter
            assert float(r["parameters_held_locally"]) == pytest.approx(0.5, abs=0.02)
        measured = int(r["measured_peak"])
        err = (calibrate_parallel.predict(run_of(r), r["parallelism"])["predicted_peak"] - measured) / measured
        assert abs(err) <= 0.10, f"{r['key']}: {err:+.1%}"
        errors.append(abs(err))
    assert statistics.median(errors) <= 0.03


@pytest.mark.slow
def test_fsdp_qlora_measured_live(tmp_path):
    """QLoRA under FSDP (4-bit weights stored in bf16 so they shard) with gradient checkpointing."""
    r = next(r for r in rows() if r["key"].startswith("fsdp2-llama-m-qlora-b2s256-gc1"))
    run = run_of(r)
    got = calibrate_parallel.measure(run, "fsdp", tmp_path)
    assert got["distributed_type"] == "DistributedType.FSDP"
    assert got["parameters_held_locally"] == pytest.approx(0.5, abs=0.02)
    predicted = calibrate_parallel.predict(run, "fsdp")["predicted_peak"]
    err = (predicted - got["measured_peak"]) / got["measured_peak"]
    assert abs(err) <= 0.10, f"predicted {predicted:,} measured {got['measured_peak']:,} ({err:+.1%})"
