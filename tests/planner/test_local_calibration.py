"""`peftplan calibrate` and the local correction `estimate` and `plan` apply (planner/local_calibration.py,
planner/local_correction.py), from run folders written by hand with known ratios. The config folder is always a
temporary one (PEFTPLAN_CONFIG_DIR; HOME points into the temporary folder too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftplan.cli import main
from peftplan.planner import local_calibration as lc

L4 = {"device": "NVIDIA L4", "planned_device": "L4"}  # what CUDA calls it / the catalog id the plan names
SPEC = """
[model]
name = "Qwen/Qwen2.5-0.5B"
[data]
num_examples = 2000
seq_len = 1024
avg_tokens = 400
[hardware]
gpu = "L4"
[method]
name = "lora"
[training]
micro_batch_size = 2
gradient_checkpointing = true
"""


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    cfg = tmp_path / "config"
    monkeypatch.setenv(lc.CONFIG_ENV, str(cfg))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return cfg


def run_dir(root: Path, name: str, lines: list, method: str = "lora", device: str = "L4") -> Path:
    d = root / name
    (d / "outputs").mkdir(parents=True)
    (d / "plan.toml").write_text(f'[method]\nname = "{method}"\n\n[prediction]\ndevice = "{device}"\n')
    (d / "outputs" / "metrics.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return d


def probe(measured: int, predicted: int, **kw) -> dict:
    return {"event": "probe", "kind": "probe", "method": "lora", "out_of_memory": False, **L4,
            "measured_peak_allocated_bytes": measured, "predicted_peak_allocated_bytes": predicted, **kw}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """Memory ratios 1.03, 1.06, 0.99 (median 1.03); tokens/s ratios 0.9, 0.8 (median 0.85); plus records that
    must not count."""
    a = run_dir(tmp_path, "a", [probe(1030, 1000)])
    b = run_dir(tmp_path, "b", [
        {"event": "start", "method": "lora", **L4},
        {"step": 1, "loss": 2.0, "tokens_per_second": 50.0, "predicted_tokens_per_second": 100.0},
        {"step": 2, "loss": 1.9, "tokens_per_second": 80.0, "predicted_tokens_per_second": 100.0},
        {"event": "peak_memory", "device": "NVIDIA L4", "measured_peak_allocated_bytes": 1060,
         "predicted_for_measured_shape": 1000, "predicted_peak_allocated_bytes": 1200},
        {"step": 4, "loss": 1.8, "tokens_per_second": 90.0, "predicted_tokens_per_second": 100.0},  # the last: 0.9
    ])
    # an older run: no start record; method and planned device from plan.toml, the device from its peak record
    c = run_dir(tmp_path, "c", [
        {"step": 3, "loss": 2.0, "tokens_per_second": 80.0, "predicted_tokens_per_second": 100.0},
        {"event": "peak_memory", "device": "NVIDIA L4", "measured_peak_allocated_bytes": 990,
         "predicted_for_measured_shape": 1000},
    ])
    absurd = run_dir(tmp_path, "absurd", [probe(5000, 1000), "{not json", probe(10, 1000, out_of_memory=True)])
    other = run_dir(tmp_path, "other", [probe(1000, 1000, device="NVIDIA A100-SXM4-80GB")])
    return [a, b, c, absurd, other]


def test_calibrate_fits_the_median_and_refuses_what_does_not_belong(runs, config, tmp_path, capsys):
    assert main(["calibrate", *map(str, runs)]) == 0
    out, err = capsys.readouterr()
    store = lc.load()
    (c,) = store.corrections.values()
    assert (c.device, c.method) == ("L4", "lora")
    assert c.memory == pytest.approx(1.03) and c.memory_runs == 3
    assert c.tokens_per_second == pytest.approx(0.85) and c.time_runs == 2
    assert set(c.runs) == {str(p.resolve()) for p in runs[:3]}
    assert "lora: memory +3.0% from 3 runs, tokens/s -15.0% from 2 runs on NVIDIA L4" in out
    metrics = runs[3] / "outputs" / "metrics.jsonl"
    assert f"refused: {metrics}, line 1: probe memory measured 5,000 vs predicted 1,000 (×5)" in err
    assert "outside the sane band [0.8, 1.25]" in err
    assert f"skipped: {metrics}, line 2: not JSON" in err
    assert f"refused: {metrics}, line 3: the probe ran out of memory" in err
    assert "ran on NVIDIA A100-SXM4-80GB, but its plan was made for L4" in err
    assert (config / lc.FILE_NAME).is_file()
    assert not (tmp_path / "home" / ".config").exists()  # never the real (here: fake) home


def test_calibrating_a_folder_again_replaces_its_records(runs, config):
    main(["calibrate", *map(str, runs)])
    lines = (runs[0] / "outputs" / "metrics.jsonl").read_text()
    (runs[0] / "outputs" / "metrics.jsonl").write_text(lines + json.dumps(probe(1100, 1000)) + "\n")
    assert main(["calibrate", str(runs[0])]) == 0
    (c,) = lc.load().corrections.values()
    assert c.memory == pytest.approx(1.045) and c.memory_runs == 4  # median of 0.99, 1.03, 1.06, 1.10


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    code = main(list(argv))
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_and_plan_apply_it_and_say_so(runs, config, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    raw = _json(capsys, "estimate", str(spec), "--json", "--no-local-calibration")
    assert "local_calibration" not in raw
    main(["calibrate", *map(str, runs)])
    got = _json(capsys, "estimate", str(spec), "--json")
    lora, raw_lora = got["methods"]["lora"], raw["methods"]["lora"]
    terms = len(raw_lora["terms"])  # each scaled term rounds to a whole byte
    assert abs(lora["peak_allocated_bytes"] - 1.03 * raw_lora["peak_allocated_bytes"]) <= terms
    # the reserve scales with the peak; the CUDA context (512 MiB) does not
    context = 512 * 2**20
    assert abs(lora["device_total_bytes"] - context - 1.03 * (raw_lora["device_total_bytes"] - context)) <= terms
    assert got["methods"]["qlora"]["peak_allocated_bytes"] == raw["methods"]["qlora"]["peak_allocated_bytes"]
    assert got["local_calibration"]["applied"][0]["memory"] == pytest.approx(1.03)

    assert main(["estimate", str(spec)]) == 0
    assert "local calibration: lora: memory +3.0% from 3 runs" in capsys.readouterr().out

    raw_plan = _json(capsys, "plan", str(spec), "--json", "--no-local-calibration")
    plan = _json(capsys, "plan", str(spec), "--json")
    assert plan["chosen"]["method"] == raw_plan["chosen"]["method"] == "lora"
    assert abs(plan["chosen"]["estimate"]["peak_allocated_bytes"]
               - 1.03 * raw_plan["chosen"]["estimate"]["peak_allocated_bytes"]) <= terms
    assert plan["chosen"]["time"]["seconds"] == pytest.approx(raw_plan["chosen"]["time"]["seconds"] / 0.85, abs=0.2)
    assert main(["plan", str(spec)]) == 0
    assert "tokens/s -15.0% from 2 runs on NVIDIA L4" in capsys.readouterr().out


def test_a_stored_file_edited_into_nonsense_is_ignored_with_a_warning(config, tmp_path, capsys):
    config.mkdir()
    sample = {"run": "/x", "line": 1, "source": "probe", "quantity": "memory", "device": "L4",
              "device_name": "NVIDIA L4", "method": "lora", "measured": 3000.0, "predicted": 1000.0}
    (config / lc.FILE_NAME).write_text(json.dumps({"format": lc.FORMAT, "samples": [sample]}))
    store = lc.load()
    assert store.corrections == {}
    assert any("outside the sane band" in w for w in store.warnings)
    (config / lc.FILE_NAME).write_text("{broken")
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    assert main(["estimate", str(spec)]) == 0
    out, err = capsys.readouterr()
    assert "not a calibration peftplan wrote" in err and "local calibration: lora" not in out


def test_calibrate_errors_show_and_clear(tmp_path, config, runs, capsys):
    assert main(["calibrate", str(tmp_path / "nowhere")]) == 2
    assert "not a project folder" in capsys.readouterr().err
    only_absurd = [runs[3]]
    assert main(["calibrate", *map(str, only_absurd)]) == 2
    assert "unchanged" in capsys.readouterr().err and not (config / lc.FILE_NAME).exists()
    main(["calibrate", *map(str, runs)])
    capsys.readouterr()
    assert main(["calibrate"]) == 0
    assert "lora: memory +3.0%" in capsys.readouterr().out
    assert main(["calibrate", "--clear"]) == 0
    assert not (config / lc.FILE_NAME).exists()


def test_config_folder_follows_xdg_without_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv(lc.CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert lc.store_path() == tmp_path / "xdg" / "peftplan" / "calibration.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lc.store_path() == tmp_path / "home" / ".config" / "peftplan" / "calibration.json"


def test_the_fit_decisions_use_the_corrected_memory(tmp_path):
    """A correction is applied before the choice: a micro-batch that fits uncorrected but not × 1.2 is not chosen,
    and plan.toml records the factor so that calibrating again compares with the uncorrected prediction."""
    from peftplan.planner.choose import plan_spec
    from peftplan.schemas import spec_from_dict

    def spec(memory_gib: float):
        return spec_from_dict({"model": {"name": "Qwen/Qwen2.5-0.5B"},
                               "data": {"num_examples": 2000, "seq_len": 1024, "avg_tokens": 1024},
                               "hardware": {"gpu": "L4", "memory_gib": memory_gib}, "method": {"name": "lora"},
                               "training": {"gradient_checkpointing": False, "optimizer": "adamw_torch"}})
    plain = plan_spec(spec(24)).chosen
    # memory that the uncorrected choice fills to 92% of the usable (5% headroom): × 1.2 it cannot fit any more
    memory_gib = plain.needed_bytes / 0.92 / (1 - 0.05) / 2**30
    store = lc.Store(tmp_path / "c.json", corrections={
        (lc.device_key("L4"), "lora"): lc.Correction("L4", "NVIDIA L4", "lora", memory=1.2, memory_runs=3)})
    assert store.lookup("L4", "lora") is not None
    before = plan_spec(spec(memory_gib)).chosen
    after = plan_spec(spec(memory_gib), calibration=store).chosen
    usable = int(memory_gib * 2**30 * 0.95)
    assert before.needed_bytes <= usable and after.needed_bytes <= usable
    assert after.micro_batch < before.micro_batch  # the corrected need of the old choice is over the usable memory
    # the corrected estimate is 1.2 × the closed form's for the same geometry (the CUDA context, 512 MiB, unscaled)
    same = plan_spec(spec_from_dict({**spec(memory_gib).model_dump(exclude_none=True), "training": {
        "gradient_checkpointing": False, "optimizer": "adamw_torch", "micro_batch_size": after.micro_batch,
        "gradient_accumulation_steps": after.accumulation}})).chosen
    assert after.estimate.peak_allocated_bytes == pytest.approx(1.2 * same.estimate.peak_allocated_bytes, rel=1e-6)


def test_a_plan_made_with_a_correction_is_calibrated_against_the_uncorrected_prediction(tmp_path, config):
    """plan.toml of a corrected plan says memory_correction = 1.1; the run measured exactly the corrected
    prediction (1100 of 1100), so measured ÷ uncorrected is 1100 ÷ 1000 = 1.1, not 1.0 (which would undo it)."""
    d = run_dir(tmp_path, "corrected", [probe(1100, 1100)])
    plan = d / "plan.toml"
    plan.write_text(plan.read_text() + "memory_correction = 1.1\n")
    assert main(["calibrate", str(d)]) == 0
    (c,) = lc.load().corrections.values()
    assert c.memory == pytest.approx(1.1)
