"""Plot and summarize the CPU calibration table (benchmarks/calibrate.py output).

    python benchmarks/plot_calibration.py

Reads benchmarks/results/calibration-cpu{,-medium,-loss,-moe}.csv and writes docs/calibration.png (predicted versus
measured peak, one point per run, colored by method, marker by family, y = x and a shaded ±10% band) and
docs/calibration-summary.md (median and worst |error| per method and per family, and the error
distribution). With --update-doc the summary also replaces the text between the
`<!-- calibration:begin -->` and `<!-- calibration:end -->` markers of docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from docsection import replace_section  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "calibration-cpu.csv"
CSV_MEDIUM = ROOT / "benchmarks" / "results" / "calibration-cpu-medium.csv"
CSV_LOSS = ROOT / "benchmarks" / "results" / "calibration-cpu-loss.csv"
CSV_MOE = ROOT / "benchmarks" / "results" / "calibration-cpu-moe.csv"
PNG = ROOT / "docs" / "calibration.png"
SUMMARY = ROOT / "docs" / "calibration-summary.md"
DOC = ROOT / "docs" / "accuracy.md"
BEGIN, END = "<!-- calibration:begin -->", "<!-- calibration:end -->"

METHOD_ORDER = ("full", "lora", "qlora", "dora", "qdora")
FAMILY_ORDER = ("llama", "qwen2", "gemma2", "phi3", "gpt2", "phi", "qwen3", "gemma3_text", "olmo2", "mistral",
                "granite", "smollm3", "phi4mini", "mixtral", "qwen3_moe", "olmoe")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
BINS = ((0.00, 0.01, "< 1%"), (0.01, 0.02, "1–2%"), (0.02, 0.04, "2–4%"), (0.04, 0.06, "4–6%"),
        (0.06, 0.10, "6–10%"), (0.10, float("inf"), "> 10%"))
MIB = 2**20
LOG_RANGE = 5.0  # log-log axes when the largest peak is more than this many times the smallest


def load(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        if not r.get("measured_peak") or not r.get("predicted_peak"):
            continue
        measured, predicted = int(float(r["measured_peak"])), int(float(r["predicted_peak"]))
        err = float(r["error"]) if r.get("error") not in (None, "") else (predicted - measured) / measured
        out.append({"run": r["run"], "family": r["family"], "method": r["method"], "measured": measured,
                    "predicted": predicted, "error": err})
    return out


def _ordered(values, order) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + sorted(v for v in seen if v not in order)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = _ordered((r["method"] for r in rows), METHOD_ORDER)
    families = _ordered((r["family"] for r in rows), FAMILY_ORDER)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    markers = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}

    xs = [r["measured"] / MIB for r in rows]
    ys = [r["predicted"] / MIB for r in rows]
    lo, hi = min(xs + ys), max(xs + ys)
    log = hi / lo > LOG_RANGE
    pad = (hi / lo) ** 0.04 if log else 0.04 * (hi - lo)
    lo, hi = (lo / pad, hi * pad) if log else (max(0.0, lo - pad), hi + pad)

    fig, ax = plt.subplots(figsize=(8.5, 7.5), dpi=130)
    line = [lo, hi]
    ax.fill_between(line, [v * 0.9 for v in line], [v * 1.1 for v in line], color="0.85", alpha=0.6,
                    label="±10%", zorder=0)
    ax.plot(line, line, color="0.3", lw=1.0, ls="--", zorder=1)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.scatter(x, y, s=34, marker=markers[r["family"]], color=colors[r["method"]], edgecolor="black",
                   linewidth=0.4, alpha=0.85, zorder=2)
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (10, 20, 50), not 2×10¹
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("measured peak live tensor bytes (MiB)")
    ax.set_ylabel("peftplan predicted peak_allocated_bytes (MiB)")
    ax.grid(True, which="both", lw=0.3, color="0.8")

    errs = [abs(r["error"]) for r in rows]
    ax.set_title(f"peftplan CPU calibration: {len(rows)} runs, median |error| {statistics.median(errs):.1%}, "
                 f"max |error| {max(errs):.1%}", fontsize=11)

    method_handles = [Line2D([], [], ls="", marker="o", color=colors[m], markeredgecolor="black",
                             markeredgewidth=0.4, label=m) for m in methods]
    family_handles = [Line2D([], [], ls="", marker=markers[f], color="0.55", markeredgecolor="black",
                             markeredgewidth=0.4, label=f) for f in families]
    extra = [Line2D([], [], color="0.3", ls="--", lw=1.0, label="y = x"),
             plt.Rectangle((0, 0), 1, 1, color="0.85", label="±10%")]
    first = ax.legend(handles=method_handles + extra, title="method", loc="upper left", fontsize=8,
                      title_fontsize=9, framealpha=0.9)
    ax.add_artist(first)
    ax.legend(handles=family_handles, title="family", loc="lower right", fontsize=8, title_fontsize=9,
              framealpha=0.9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _group_table(rows: list[dict], key: str, order) -> list[str]:
    out = [f"| {key} | runs | median \\|error\\| | worst \\|error\\| | worst run | mean error (bias) |",
           "|---|---:|---:|---:|---|---:|"]
    for name in _ordered((r[key] for r in rows), order):
        g = [r for r in rows if r[key] == name]
        worst = max(g, key=lambda r: abs(r["error"]))
        out.append(f"| {name} | {len(g)} | {statistics.median(abs(r['error']) for r in g):.1%} | "
                   f"{abs(worst['error']):.1%} ({worst['error']:+.1%}) | `{worst['run']}` | "
                   f"{statistics.fmean(r['error'] for r in g):+.1%} |")
    return out


def summary(rows: list[dict], source: str) -> str:
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    under = sum(1 for r in rows if r["error"] < 0)
    lines = [
        f"Calibration summary: {len(rows)} CPU runs from `{source}`. error = (predicted − measured) / measured; "
        "measured = peak live tensor bytes during a steady-state training step.",
        "",
        f"- all runs: median |error| **{statistics.median(errs):.1%}**, worst **{abs(worst['error']):.1%}** "
        f"(`{worst['run']}`, {worst['error']:+.1%}); mean error {statistics.fmean(r['error'] for r in rows):+.1%}; "
        f"{under} of {len(rows)} runs under-predicted",
        "",
        "Per method:",
        "",
        *_group_table(rows, "method", METHOD_ORDER),
        "",
        "Per family:",
        "",
        *_group_table(rows, "family", FAMILY_ORDER),
        "",
        "Distribution of |error|:",
        "",
        "| \\|error\\| | runs | share |",
        "|---|---:|---:|",
    ]
    for lo, hi, label in BINS:
        n = sum(1 for e in errs if lo <= e < hi)
        lines.append(f"| {label} | {n} | {n / len(errs):.0%} |")
    return "\n".join(lines) + "\n"


def update_doc(text: str, doc: Path) -> bool:
    return replace_section(doc, BEGIN, END, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, action="append",
                    help="calibration tables (default: the small, medium, 128k-vocabulary and MoE CPU tables)")
    ap.add_argument("--png", type=Path, default=PNG)
    ap.add_argument("--summary", type=Path, default=SUMMARY)
    ap.add_argument("--update-doc", action="store_true", help=f"replace the marked section of {DOC.name}")
    args = ap.parse_args(argv)
    paths = args.csv or [p for p in (CSV, CSV_MEDIUM, CSV_LOSS, CSV_MOE) if p.exists()]
    rows = [r for p in paths for r in load(p)]
    if not rows:
        print(f"no rows with measured and predicted peaks in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    plot(rows, args.png)
    names = []
    for p in paths:
        try:
            names.append(str(p.resolve().relative_to(ROOT)))
        except ValueError:
            names.append(str(p))
    text = summary(rows, "` + `".join(names))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(text)
    print(text)
    print(f"wrote {args.png} and {args.summary}")
    if args.update_doc:
        print("docs/accuracy.md updated" if update_doc(text, DOC) else "docs/accuracy.md: markers not found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
