"""The committed CPU calibration tables re-predicted by the current estimator — the planner only, no torch.

The tables (benchmarks/results/calibration-cpu*.csv) hold real measurements: peak live tensor bytes of CPU training
steps (benchmarks/calibrate.py, calibrate_moe.py); nothing here measures, so these tests run without the [train]
extra. Each dense row carries a `split`: "fit" (the only rows any fitting code may read, benchmarks/calibrate_fit.py),
"held-out" (SHA-256 of the run id below 77/256, decided by the id alone) or "new" (measured after the constants were
fitted: gradient accumulation, the de-quantized weight as the largest transient, 12-16 layers). Errors are reported
and bounded per split.

Bounds, from the distribution measured when the split was made (current estimator, 2026-12):
- fit (293 rows): median |error| 0.90%, 95th percentile 5.0%, worst 7.7%; held-out (123 rows): 0.92%, 5.1%, 7.4%.
  Every row within ±10% (the bound since the tables began); in-sample median ≤ 1%; the held-out median no higher
  than the 99th percentile of the medians of random held-out-sized subsets of the fit rows (1.18%) — a held-out part
  predicted worse than the fitted one would exceed it — and ≤ 1.25% in any case.
- median signed error per method and split within ±2% (largest now +1.19%, QDoRA fit rows): a whole missing term
  moves a method's median by more (LoRA's optimizer state: -5.4%; DoRA's: -3.6%), while a ±10% row bound does not
  see it (DoRA without its optimizer state: worst row 9.75%).
- new rows, per category (see test_new_rows_per_category).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import statistics
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("full", "lora", "qlora", "dora", "qdora")


def _module(name: str):
    """benchmarks/<name>.py (stdlib imports only at module level: no torch)."""
    mod = sys.modules.get(name)
    if mod is None or not hasattr(mod, "__file__") or Path(mod.__file__).parent != ROOT / "benchmarks":
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


calibrate = _module("calibrate")
calibrate_fit = _module("calibrate_fit")


@cache
def rows() -> tuple[dict, ...]:
    return tuple(calibrate_fit.load())


@cache
def errors() -> dict[str, float]:
    """run id -> (current prediction - measured) / measured."""
    return {r["run"]: calibrate_fit.error(r) for r in rows()}


def _split(name: str) -> list[dict]:
    return [r for r in rows() if r["split"] == name]


def test_the_split_is_the_documented_hash_rule():
    before = [r for r in rows() if r["_table"] in calibrate_fit.BEFORE_FIT]
    after = [r for r in rows() if r["_table"] in calibrate_fit.AFTER_FIT]
    assert len(before) == 416 and len(after) >= 40
    assert len({r["run"] for r in rows()}) == len(rows()), "a run id appears twice"
    for r in before:  # the rule, written out here: the first byte of the run id's SHA-256 below 77
        expected = "held-out" if hashlib.sha256(r["run"].encode()).digest()[0] < 77 else "fit"
        assert r["split"] == expected, r["run"]
    share = sum(r["split"] == "held-out" for r in before) / len(before)
    assert 0.25 <= share <= 0.35, share
    assert {r["split"] for r in after} == {"new"}
    for r in after:  # what the new rows are for: accumulation, a de-quantized weight as the largest transient, depth
        assert int(r["accumulation"]) > 1 or "-wide-" in r["run"] or "-deep" in r["run"], r["run"]
        assert r["device"] == "cpu" and int(r["measured_peak"]) > 0


def test_the_fit_reads_no_held_out_or_new_row():
    """Poisoning every held-out and new row's measurement changes nothing the fit returns; a row without a split
    stops it."""
    clean = list(rows())
    poisoned = [{**r, "measured_peak": str(int(r["measured_peak"]) * 10)} if r["split"] != "fit" else r for r in clean]
    only_fit = [r for r in clean if r["split"] == "fit"]
    result = calibrate_fit.fit(poisoned)
    assert result == calibrate_fit.fit(only_fit)
    assert set(result) == {"BACKWARD_WORKING_BYTES[adapter]", "BACKWARD_WORKING_BYTES[adapter_plain_mlp]",
                           "BACKWARD_WORKING_BYTES[full]", "BACKWARD_WORKING_EXTRA[gated_gelu]"}
    assert all(f["rows"] > 20 for f in result.values())
    with pytest.raises(ValueError, match="split"):
        calibrate_fit.fit_rows([{k: v for k, v in only_fit[0].items() if k != "split"}])
    # the scan restores the committed constants
    from peftplan.planner import assumptions as A

    assert {k: f["committed"] for k, f in result.items()} == {
        f"{n}[{k}]": getattr(A, n)[k] for n, k in calibrate_fit.CONSTANTS}


def test_in_sample_and_held_out_errors_separately():
    fit = [abs(errors()[r["run"]]) for r in _split("fit")]
    held = [abs(errors()[r["run"]]) for r in _split("held-out")]
    for r in _split("fit") + _split("held-out"):
        assert abs(errors()[r["run"]]) <= 0.10, f"{r['run']} ({r['split']}): {errors()[r['run']]:+.1%}"
    assert statistics.median(fit) <= 0.01, statistics.median(fit)
    rnd = random.Random(0)
    subset_medians = sorted(statistics.median(rnd.sample(fit, len(held))) for _ in range(1000))
    p99 = subset_medians[989]
    assert statistics.median(held) <= min(p99, 0.0125), (statistics.median(held), p99)


def test_held_out_rows_against_constants_fitted_without_them():
    """The constants refitted on the fit rows alone (in memory): the held-out rows never saw them."""
    fitted = calibrate_fit.fit(list(rows()))
    with calibrate_fit.applied(fitted):
        held = [calibrate_fit.error(r) for r in _split("held-out")]
        fit = [calibrate_fit.error(r) for r in _split("fit")]
    assert max(abs(e) for e in held) <= 0.10
    assert statistics.median(abs(e) for e in held) <= 0.0125
    assert statistics.median(abs(e) for e in held) <= statistics.median(abs(e) for e in fit) + 0.003
    assert calibrate_fit.error(_split("held-out")[0]) == errors()[_split("held-out")[0]["run"]]  # restored


@pytest.mark.parametrize("split", ["fit", "held-out"])
@pytest.mark.parametrize("method", METHODS)
def test_median_signed_error_per_method(split, method):
    """A whole missing term shifts every row of a method the same way: the median moves, however small the rows'
    own spread."""
    errs = [errors()[r["run"]] for r in _split(split) if r["method"] == method]
    assert len(errs) >= 15
    assert abs(statistics.median(errs)) <= 0.02, f"{method} ({split}): median {statistics.median(errs):+.2%}"


def _category(r: dict) -> str:
    if int(r.get("accumulation") or 1) > 1:
        return "accumulation"
    return "dequant" if "-wide-" in r["run"] else "deep"


def test_new_rows_per_category():
    """Rows measured after the fit. Gradient accumulation (18 rows, worst -2.7%): each within ±3%. The de-quantized
    weight as the largest transient (7 rows): each within ±7% — QLoRA's 5 rows are under-predicted by 4.2-5.7%
    (measured: the weight coexists with one layer's backward gradients; the estimator counts the larger of the
    two). Depth (20 rows): over-prediction, the safe side, up to +11% (gpt2-deep12 QLoRA with checkpointing
    +10.1%, the GPT-2 per-layer over-count growing with depth; 16-layer Llama with checkpointing +2.6-7.3%);
    under-prediction, which runs out of memory, at most -5% (worst now -1.5%)."""
    by: dict[str, list[tuple[str, float]]] = {}
    for r in _split("new"):
        by.setdefault(_category(r), []).append((r["run"], errors()[r["run"]]))
    assert {k: len(v) >= 7 for k, v in by.items()} == {"accumulation": True, "dequant": True, "deep": True}
    bounds = {"accumulation": (-0.03, 0.03), "dequant": (-0.07, 0.07), "deep": (-0.05, 0.11)}
    for cat, errs in by.items():
        lo, hi = bounds[cat]
        for run, e in errs:
            assert lo <= e <= hi, f"{cat}: {run} {e:+.1%}"
    acc = [abs(e) for _, e in by["accumulation"]]
    assert statistics.median(acc) <= 0.015, statistics.median(acc)


# --- moved from tests/runtime/test_memory_live.py (they read the tables only) ---------------------------------------

def test_committed_calibration_tables_cover_the_families_and_losses():
    names = ("calibration-cpu.csv", "calibration-cpu-medium.csv", "calibration-cpu-loss.csv")
    before = [r for r in rows() if r["_table"] in names]
    assert len(before) >= 400
    assert {"llama", "qwen2", "gpt2", "qwen3", "gemma3_text", "olmo2", "phi3"} <= {r["family"] for r in before}
    assert {r["loss"] for r in before} == {"chunked", "full"}


def test_chunked_loss_holds_a_fraction_of_the_full_loss_at_a_128k_vocabulary():
    """The committed 128k-vocabulary rows: at 2 × 2048 tokens the chunked loss's whole step peaks at under a tenth
    of the full loss's (which holds 12 bytes × tokens × vocabulary ≈ 6 GiB)."""
    table = list(csv.DictReader((RESULTS / "calibration-cpu-loss.csv").open()))
    by = {(r["method"], r["batch"], r["seq"], r["gradient_checkpointing"], r["loss"]): int(r["measured_peak"])
          for r in table}
    for method in ("lora", "qlora", "full"):
        for gc in ("True", "False"):
            chunked, full = by[(method, "2", "2048", gc, "chunked")], by[(method, "2", "2048", gc, "full")]
            assert full - chunked >= 12 * 4096 * 128_256 * 0.95, (method, gc, chunked, full)
            assert chunked < full / 10, (method, gc, chunked, full)


def test_committed_moe_calibration_table_within_bounds():
    """The committed mixture-of-experts rows (tiny Mixtral, Qwen3-MoE and OLMoE; QLoRA/QDoRA with NF4 experts, LoRA
    and full; benchmarks/calibrate_moe.py) re-predicted by the current estimator: each within ±10%, median ≤ 2%.
    Not part of the split: no constant was fitted on them."""
    calibrate_moe = _module("calibrate_moe")
    table = list(csv.DictReader((RESULTS / "calibration-cpu-moe.csv").open()))
    assert {r["family"] for r in table} == {"mixtral", "qwen3_moe", "olmoe"}
    assert {r["method"] for r in table} == {"full", "lora", "qlora", "qdora"}
    errs = []
    for r in table:
        measured = int(r["measured_peak"])
        run = calibrate.run_of(r, calibrate_moe.MoERun)
        err = (calibrate_moe.predict(run)["predicted_peak"] - measured) / measured
        assert abs(err) <= 0.10, f"{r['run']}: {err:+.1%}"
        errs.append(abs(err))
    assert statistics.median(errs) <= 0.02


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import json, calibrate_fit, calibrate_moe, calibrate, csv
rows = calibrate_fit.load()
errs = {r["run"]: calibrate_fit.error(r) for r in rows}
moe = [calibrate_moe.predict(calibrate.run_of(r, calibrate_moe.MoERun))["predicted_peak"]
       for r in csv.DictReader(open(sys.argv[2]))]
print(json.dumps({"errors": errs, "moe": len(moe), "torch": "torch" in sys.modules}))
"""


def test_re_prediction_needs_no_torch():
    """The same re-prediction in a fresh interpreter that cannot import torch, transformers, peft, bitsandbytes or
    accelerate: the same errors, row for row."""
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(ROOT / "benchmarks"),
                          str(RESULTS / "calibration-cpu-moe.csv")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["torch"] and got["moe"] == 48
    assert got["errors"] == pytest.approx(errors(), abs=0)
