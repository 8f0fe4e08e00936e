"""Live check of the estimator: a few real CPU training steps through the runtime's own loading and
method setup, measured with runtime.memprobe, against the closed-form prediction (±10%).

The full table is benchmarks/results/calibration-cpu.csv (benchmarks/calibrate.py --matrix full);
this subset re-measures a few rows on every test run so a runtime change that moves memory is caught.
The committed tables themselves are re-predicted without torch in tests/planner/test_calibration_tables.py
and test_calibration_terms.py.
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
