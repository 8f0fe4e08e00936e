"""Live check of the estimator: a few real CPU training steps through the runtime's own loading and
method setup, measured with runtime.memprobe, against the closed-form prediction (±10%).

The full table is benchmarks/results/calibration-cpu.csv (benchmarks/calibrate.py --matrix full);
this subset re-measures a few rows on every test run so a runtime change that moves memory is caught.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the [train] extra (torch, transformers, peft, bitsandbytes)")
pytest.importorskip("bitsandbytes", reason="needs the [train] extra")

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("calibrate", ROOT / "benchmarks" / "calibrate.py")
calibrate = importlib.util.module_from_spec(spec)
sys.modules["calibrate"] = calibrate
spec.loader.exec_module(calibrate)

RUNS = [
    calibrate.Run("llama", "lora"),
    calibrate.Run("llama", "qlora", gc=True),
    calibrate.Run("qwen2", "dora", batch=1, seq=256),
    calibrate.Run("gpt2", "full"),
    calibrate.Run("gemma2", "qdora", gc=True),
    calibrate.Run("llama", "lora", dropout=0.1),
]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=[r.key() for r in RUNS])
def test_measured_peak_within_10_percent(run, models_dir):
    predicted = calibrate.predict(run)["predicted_peak"]
    measured = calibrate.measure(run, models_dir)["measured_peak"]
    error = (predicted - measured) / measured
    assert abs(error) <= 0.10, f"{run.key()}: predicted {predicted:,} measured {measured:,} ({error:+.1%})"


@pytest.mark.slow
def test_committed_calibration_table_within_bounds():
    """Every committed CPU calibration row (tiny models of 13 families, 19-34M-parameter ones, and a 128k-vocabulary
    model at long sequences with both losses) re-predicted by the current estimator: each within ±10%, median
    |error| ≤ 1%."""
    import csv
    import statistics

    rows = []
    for name in ("calibration-cpu.csv", "calibration-cpu-medium.csv", "calibration-cpu-loss.csv"):
        rows += list(csv.DictReader((ROOT / "benchmarks" / "results" / name).open()))
    assert len(rows) >= 400
    families = {r["family"] for r in rows}
    assert {"llama", "qwen2", "gpt2", "qwen3", "gemma3_text", "olmo2", "phi3"} <= families
    assert {r["loss"] for r in rows} == {"chunked", "full"}
    errors = []
    for r in rows:
        run = calibrate.run_of(r)
        measured = int(r["measured_peak"])
        err = (calibrate.predict(run)["predicted_peak"] - measured) / measured  # the current estimator
        assert abs(err) <= 0.10, f"{r['run']}: {err:+.1%}"
        errors.append(abs(err))
    assert statistics.median(errors) <= 0.01


@pytest.mark.slow
def test_chunked_loss_holds_a_fraction_of_the_full_loss_at_a_128k_vocabulary():
    """The committed 128k-vocabulary rows: at 2 × 2048 tokens the chunked loss's whole step peaks at under a tenth
    of the full loss's (which holds 12 bytes × tokens × vocabulary ≈ 6 GiB)."""
    import csv

    rows = list(csv.DictReader((ROOT / "benchmarks" / "results" / "calibration-cpu-loss.csv").open()))
    by = {(r["method"], r["batch"], r["seq"], r["gradient_checkpointing"], r["loss"]): int(r["measured_peak"])
          for r in rows}
    for method in ("lora", "qlora", "full"):
        for gc in ("True", "False"):
            chunked, full = by[(method, "2", "2048", gc, "chunked")], by[(method, "2", "2048", gc, "full")]
            assert full - chunked >= 12 * 4096 * 128_256 * 0.95, (method, gc, chunked, full)
            assert chunked < full / 10, (method, gc, chunked, full)


@pytest.mark.slow
def test_committed_moe_calibration_table_within_bounds():
    """The committed mixture-of-experts rows (tiny Mixtral, Qwen3-MoE and OLMoE; QLoRA/QDoRA with NF4 experts, LoRA
    and full; benchmarks/calibrate_moe.py) re-predicted by the current estimator: each within ±10%, median ≤ 2%."""
    import csv
    import statistics

    spec_moe = importlib.util.spec_from_file_location("calibrate_moe", ROOT / "benchmarks" / "calibrate_moe.py")
    calibrate_moe = importlib.util.module_from_spec(spec_moe)
    spec_moe.loader.exec_module(calibrate_moe)
    rows = list(csv.DictReader((ROOT / "benchmarks" / "results" / "calibration-cpu-moe.csv").open()))
    assert {r["family"] for r in rows} == {"mixtral", "qwen3_moe", "olmoe"}
    assert {r["method"] for r in rows} == {"full", "lora", "qlora", "qdora"}
    errors = []
    for r in rows:
        measured = int(r["measured_peak"])
        run = calibrate.run_of(r, calibrate_moe.MoERun)
        err = (calibrate_moe.predict(run)["predicted_peak"] - measured) / measured
        assert abs(err) <= 0.10, f"{r['run']}: {err:+.1%}"
        errors.append(abs(err))
    assert statistics.median(errors) <= 0.02
