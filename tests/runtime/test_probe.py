"""`peftplan run DIR --probe` (runtime/probe.py): one measured step at the plan's worst-case shape, on the CPU.

The verdict's thresholds are checked on hand-written numbers; the probe itself runs for real on a tiny Llama-style
model: it must write one record, measure what the plan predicts for full rows (not a shorter batch), leave no
adapter or checkpoint, take the run lock, and stop with exit 5 and advice when the plan's device memory is tiny.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import OFFLINE_ENV, RunLockHolder, cpu_spec

from peftplan.runtime.probe import EXIT_NOFIT, EXIT_TIGHT, DeviceMemory, judge

MiB = 2**20


def _record(**kw) -> dict:
    base = {"out_of_memory": False, "micro_batch_size": 4, "seq_len": 64, "gradient_accumulation_steps": 2,
            "world_size": 1}
    return {**base, **kw}


PREDICTION = {"peak_allocated_bytes": 100 * MiB, "device_total_bytes": 110 * MiB, "tokens_per_second": 512.0}


@pytest.mark.parametrize("measured, total, verdict, code", [
    # CPU: needed = measured + the plan's slack (110 − 100 MiB); usable = 95% of the device memory
    (90 * MiB, 1000 * MiB, "fits", 0),          # 100 MiB needed of 950 usable
    (90 * MiB, 104 * MiB, "within the headroom", EXIT_TIGHT),  # 100 needed: over 98.8 usable, under 104
    (90 * MiB, 99 * MiB, "does not fit", EXIT_NOFIT),           # 100 needed > 99
])
def test_verdict_thresholds_on_the_cpu(measured, total, verdict, code):
    rec = _record(measured_peak_allocated_bytes=measured)
    assert judge(rec, PREDICTION, DeviceMemory(total, "test", 0.05)) == code
    assert rec["verdict"] == verdict and rec["exit_code"] == code
    assert rec["needed_bytes"] == 100 * MiB
    assert rec["fits"] is (code != EXIT_NOFIT)
    assert rec["error"] == pytest.approx((100 - 90) / 90, abs=1e-4)
    # the predicted optimizer step: 2 accumulation × 4 rows × 64 tokens at 512 tokens/s
    assert rec["predicted_seconds_per_optimizer_step"] == pytest.approx(1.0)


def test_verdict_on_cuda_uses_the_memory_in_use_and_out_of_memory_is_no_fit():
    rec = _record(measured_peak_allocated_bytes=50 * MiB, measured_device_used_bytes=970 * MiB)
    assert judge(rec, PREDICTION, DeviceMemory(1000 * MiB, "test", 0.05)) == EXIT_TIGHT  # 970 > 950 usable
    oom = _record(out_of_memory=True)
    assert judge(oom, PREDICTION, DeviceMemory(1000 * MiB, "test", 0.05)) == EXIT_NOFIT
    assert oom["verdict"] == "out of memory" and oom["fits"] is False


# --- the real probe ------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch", reason="the probe runs the training stack")
pytest.importorskip("peft", reason="the probe runs the training stack")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("probe")
    build_tiny_model(root / "model", family="llama", hidden_size=64, intermediate_size=128)
    write_dataset(root / "data.jsonl", "chat", 32)
    spec = root / "spec.toml"
    spec.write_text(cpu_spec(num_examples=32, seq_len=64, gradient_accumulation_steps=2))
    out = root / "proj"
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(out)],
                          capture_output=True, text=True, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stderr
    return out


def _peftplan(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, text=True, env=OFFLINE_ENV,
                          cwd=cwd)


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _records(project: Path) -> list[dict]:
    return [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_probe_that_fits_writes_one_record_and_leaves_nothing_else(project):
    before = _listing(project)
    proc = _peftplan("run", str(project), "--probe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probe: fits" in proc.stdout
    # what the probe adds: the run lock (any run's) and the metrics file; no adapter, checkpoint or tracker folder
    assert _listing(project) - before == {"outputs", "outputs/.peftplan-run.lock", "outputs/metrics.jsonl"}
    assert before - _listing(project) == set()
    (rec,) = _records(project)
    plan = tomllib.loads((project / "plan.toml").read_text())
    assert rec["kind"] == "probe" and rec["verdict"] == "fits" and rec["exit_code"] == 0
    assert (rec["micro_batch_size"], rec["seq_len"], rec["gradient_accumulation_steps"]) == (4, 64, 2)
    assert rec["micro_batches_per_step"] == 2  # the second forward runs with the first one's gradients held
    assert rec["method"] == "lora" and rec["device"] == "cpu" and rec["planned_device"] == "cpu"
    assert rec["predicted_peak_allocated_bytes"] == plan["prediction"]["peak_allocated_bytes"]
    # it measured the plan's worst case: within the calibration band of the full-row prediction, which at rows of
    # a quarter of seq_len is far lower
    measured = rec["measured_peak_allocated_bytes"]
    assert 0.8 <= measured / rec["predicted_peak_allocated_bytes"] <= 1.25, rec
    quarter = dict(plan["prediction"]["peak_by_row_length"])[16]
    assert measured > 1.25 * quarter, (measured, quarter)
    assert rec["step_seconds"] > 0 and rec["tokens_per_second"] == pytest.approx(2 * 4 * 64 / rec["step_seconds"],
                                                                                   rel=0.01)
    # the project is still a peftplan project: regenerating it after a probe works
    spec = project.parent / "spec.toml"
    regen = _peftplan("generate", str(spec), "-o", str(project), "--force")
    assert regen.returncode == 0, regen.stderr


def _tiny_device(plan: Path, memory_bytes: int) -> None:
    """The plan's device memory (plan.toml prediction.device_memory_bytes) set to `memory_bytes`."""
    text = plan.read_text()
    line = f"device_memory_bytes = {memory_bytes}"
    if re.search(r"^device_memory_bytes = ", text, flags=re.M):
        text = re.sub(r"^device_memory_bytes = .*$", line, text, flags=re.M)
    else:
        text = text.replace("[prediction]", f"[prediction]\n{line}", 1)
    plan.write_text(text)


@pytest.mark.slow
def test_probe_that_does_not_fit_exits_5_with_advice(project, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(project, small, ignore=shutil.ignore_patterns("outputs"))
    _tiny_device(small / "plan.toml", MiB)  # the tiny model's step needs ~4 MiB (predicted and measured)
    proc = _peftplan("run", str(small), "--probe")
    assert proc.returncode == EXIT_NOFIT, proc.stderr[-3000:]
    assert "does not fit" in proc.stderr
    assert "training.micro_batch_size = 2" in proc.stderr  # advice naming the spec key, halved from 4
    assert "Traceback" not in proc.stderr
    (rec,) = _records(small)
    assert rec["verdict"] == "does not fit" and rec["fits"] is False and rec["exit_code"] == EXIT_NOFIT
    assert rec["device_memory_bytes"] == MiB and rec["needed_bytes"] > MiB
    assert not (small / "outputs" / "final").exists()


@pytest.mark.slow
def test_probe_takes_the_run_lock_and_refuses_training_options(project):
    with RunLockHolder(project):
        proc = _peftplan("run", str(project), "--probe")
    assert proc.returncode == 2 and "another run" in proc.stderr, proc.stderr[-2000:]
    proc = _peftplan("run", str(project), "--probe", "--resume")
    assert proc.returncode == 2 and "--probe" in proc.stderr
    proc = _peftplan("run", str(project), "--probe", "--no-probe")
    assert proc.returncode == 2  # argparse: not allowed with each other
