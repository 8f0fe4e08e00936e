"""The held-out split of the dense CPU calibration tables, and the only code that fits a memory constant to them.

    python benchmarks/calibrate_fit.py           # errors of the current estimator: fit / held-out / new rows
    python benchmarks/calibrate_fit.py --fit     # refit the backward working bytes on the "fit" rows only
    python benchmarks/calibrate_fit.py --mark    # (re)write the split column of the tables measured before the fit

The split (calibrate.split_of, the `split` column of every dense table): a row measured before the constants were
fitted is "held-out" when the first byte of the SHA-256 of its run id is below 77 (30.1% of the ids), else "fit";
rows measured afterwards (`calibrate.py --matrix holdout`: gradient accumulation, the de-quantized weight as the
largest transient, 12-16 layers) are "new". The rule depends on the run id only, never on a row's error.

What is fitted: planner/assumptions.py's BACKWARD_WORKING_BYTES and BACKWARD_WORKING_EXTRA, one layer's backward
working memory in bytes per token per MLP feature, each "fitted as the median |error|" (2026-11-30). `fit` redoes
that on the "fit" rows alone, one constant at a time: the integer 0-8 with the lowest median |error| over the rows
the constant moves (those whose prediction differs for some value in 0-8). `fit_rows` is the one door into the fit: it
drops every held-out and new row, and refuses a table without the split column. Everything else in the estimator
is counted from shapes and from reading the libraries' source, not fitted. The MoE and two-rank tables are not part
of the split (their own scripts; BACKWARD_WORKING_BYTES["adapter_fsdp"] was set from calibrate_parallel.py's table).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE_FIT = ("calibration-cpu.csv", "calibration-cpu-medium.csv", "calibration-cpu-loss.csv")
AFTER_FIT = ("calibration-cpu-holdout.csv",)
TABLES = BEFORE_FIT + AFTER_FIT
CONSTANTS = (("BACKWARD_WORKING_BYTES", "adapter"), ("BACKWARD_WORKING_BYTES", "adapter_plain_mlp"),
             ("BACKWARD_WORKING_BYTES", "full"), ("BACKWARD_WORKING_EXTRA", "gated_gelu"))
CANDIDATES = range(0, 9)


def load(names=TABLES, root: Path = RESULTS) -> list[dict]:
    """Every row of the dense tables, with the table's name under `_table` (not a column of the files)."""
    rows = []
    for name in names:
        with (root / name).open(newline="") as fh:
            rows += [{**r, "_table": name} for r in csv.DictReader(fh)]
    return rows


def fit_rows(rows: list[dict]) -> list[dict]:
    """The rows a fit may use: split "fit" only. A row without a known split stops the fit."""
    unknown = [r["run"] for r in rows if r.get("split") not in calibrate.SPLITS]
    if unknown:
        raise ValueError(f"{len(unknown)} rows without a split column value in {calibrate.SPLITS} (first: "
                         f"{unknown[0]}): run `python benchmarks/calibrate_fit.py --mark` first")
    return [r for r in rows if r["split"] == "fit"]


def predicted(row: dict) -> int:
    """The current estimator's peak for a row (no torch: the planner only)."""
    from peftplan.planner import estimate

    run = calibrate.run_of(row)
    return estimate(run.method, calibrate.setup_of(run, row.get("device") or "cpu")).peak_allocated_bytes


def error(row: dict) -> float:
    measured = int(row["measured_peak"])
    return (predicted(row) - measured) / measured


def fit(rows: list[dict]) -> dict:
    """Refit each constant of CONSTANTS on fit_rows(rows), the others at their committed values. Returns
    {"NAME[key]": {"committed", "fitted", "rows", "median_committed", "median_fitted"}}. The constants are set
    in memory while scanning and restored afterwards; planner/assumptions.py is never written."""
    from peftplan.planner import assumptions as A

    rows = fit_rows(rows)
    out = {}
    for name, key in CONSTANTS:
        table = getattr(A, name)
        committed = table[key]
        peaks = {}
        try:
            for value in CANDIDATES:
                table[key] = value
                peaks[value] = [predicted(r) for r in rows]
        finally:
            table[key] = committed
        moved = [i for i in range(len(rows)) if len({peaks[v][i] for v in CANDIDATES}) > 1]
        measured = [int(r["measured_peak"]) for r in rows]
        medians = {v: statistics.median(abs(peaks[v][i] - measured[i]) / measured[i] for i in moved) if moved else 0.0
                   for v in CANDIDATES}
        best = min(CANDIDATES, key=lambda v: (round(medians[v], 6), v))
        out[f"{name}[{key}]"] = {"committed": committed, "fitted": best, "rows": len(moved),
                                 "median_committed": medians[committed], "median_fitted": medians[best]}
    return out


@contextmanager
def applied(fitted: dict):
    """The estimator with the constants of a `fit` result in place of the committed ones (in memory only)."""
    from peftplan.planner import assumptions as A

    saved = {(name, key): getattr(A, name)[key] for name, key in CONSTANTS}
    try:
        for name, key in CONSTANTS:
            getattr(A, name)[key] = fitted[f"{name}[{key}]"]["fitted"]
        yield
    finally:
        for (name, key), value in saved.items():
            getattr(A, name)[key] = value


def summary(rows: list[dict]) -> dict:
    """Per split: runs, median |error|, worst |error| (and its run), median signed error."""
    out = {}
    for split in calibrate.SPLITS:
        sel = [(error(r), r["run"]) for r in rows if r.get("split") == split]
        if not sel:
            continue
        worst = max(sel, key=lambda e: abs(e[0]))
        out[split] = {"runs": len(sel), "median_abs": statistics.median(abs(e) for e, _ in sel),
                      "worst": worst[0], "worst_run": worst[1], "median": statistics.median(e for e, _ in sel)}
    return out


def mark(names=BEFORE_FIT, root: Path = RESULTS) -> int:
    """Write the split column (after `run`) of the tables measured before the fit; other columns untouched."""
    changed = 0
    for name in names:
        path = root / name
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        marked = []
        for r in rows:
            split = r.get("split") if r.get("split") == "new" else calibrate.split_of(r["run"])
            changed += r.get("split") != split
            rest = {k: v for k, v in r.items() if k not in ("run", "split")}
            marked.append({"run": r["run"], "split": split, **rest})
        calibrate.write_rows(path, marked)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="refit the backward working bytes on the fit rows only")
    ap.add_argument("--mark", action="store_true", help="write the split column of " + ", ".join(BEFORE_FIT))
    args = ap.parse_args(argv)
    if args.mark:
        print(f"{mark()} rows marked")
    rows = load()
    for split, s in summary(rows).items():
        print(f"{split:9s} {s['runs']:4d} runs: median |error| {s['median_abs']:.2%}, median {s['median']:+.2%}, "
              f"worst {s['worst']:+.2%} ({s['worst_run']})")
    if args.fit:
        fitted = fit(rows)
        for name, f in fitted.items():
            print(f"{name}: committed {f['committed']}, fitted on {f['rows']} fit rows {f['fitted']} "
                  f"(median |error| {f['median_committed']:.2%} committed, {f['median_fitted']:.2%} fitted)")
        with applied(fitted):  # the held-out rows against constants that never saw them
            for split, s in summary(rows).items():
                print(f"refit: {split:9s} {s['runs']:4d} runs: median |error| {s['median_abs']:.2%}, "
                      f"median {s['median']:+.2%}, worst {s['worst']:+.2%} ({s['worst_run']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
