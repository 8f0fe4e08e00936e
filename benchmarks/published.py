"""peftplan's estimate next to published measured peak-memory figures (docs/published_measurements.toml).

    python benchmarks/published.py [--update-doc]

Writes benchmarks/results/published_comparison.csv (every row, compared or not, with the reason) and
benchmarks/results/published_comparison.md (the markdown section of docs/accuracy.md). With
--update-doc, the section also replaces the text between the `<!-- published:begin -->` and
`<!-- published:end -->` markers of docs/accuracy.md.

Each row is estimated with the Setup of what its stack ran, where the Setup can express it
(benchmarks/published_stacks.py): the model's catalog entry (catalog.match_model), the loss (`full` for
transformers' own loss and LitGPT's, `chunked` where torchtune ran its chunked cross-entropy), attention,
padding, activation offloading. Nothing here tunes the estimator: every setting a source leaves out is
taken from the row's `note` (or the source's config) and written down in the `assumptions` column; where
the measured stack differs from peftplan's runtime in ways the Setup cannot express, the `differences`
column says how. Only the public planner API is used.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tomllib
from pathlib import Path

from docsection import replace_section  # benchmarks/ is on sys.path when a script runs
from published_stacks import (
    ASSUMED,
    attention_of,
    differences,
    dropout_of,
    known_mismatch,
    loss_of,
    offload_of,
    padded_of,
    resolve_model,
    stack_of,
)

from peftplan.planner import AdapterSettings, Geometry, Setup, shape_from_config
from peftplan.planner import assumptions as A
from peftplan.planner.parallel import per_device
from peftplan.planner.shapes import UnsupportedArchitecture

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "published_measurements.toml"
OUT_CSV = ROOT / "benchmarks" / "results" / "published_comparison.csv"
OUT_MD = ROOT / "benchmarks" / "results" / "published_comparison.md"
DOC = ROOT / "docs" / "accuracy.md"
BEGIN, END = "<!-- published:begin -->", "<!-- published:end -->"

METHODS = {"full", "lora", "qlora", "dora", "qdora"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
OPTIMIZERS = {"adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"}
UNITS = {"GB": 1e9, "GiB": 2**30}


class _NotCompared(Exception):
    """A row the estimate is not compared with; the message says why."""


def _stated(row: dict, assumed: dict, notes: list[str], key: str):
    """The row's value for `key`, else the assumed one (noted with why), else None."""
    if key in row:
        return row[key]
    if key in assumed:
        v, why = assumed[key]
        notes.append(f"{key} {v} ({why})")
        return v
    return None


def _catalog_shape(row: dict, notes: list[str]):
    """(catalog entry, ModelShape) of the row's model."""
    cat, how = resolve_model(row["model"])
    if how:
        notes.append(how)
    if cat is None:
        raise _NotCompared(f"model {row['model']} not in the catalog")
    try:
        shape = shape_from_config(cat.config)
    except UnsupportedArchitecture as exc:
        raise _NotCompared(f"architecture not supported: {exc}") from None
    return cat, shape


def _optimizer(row: dict, assumed: dict, notes: list[str]) -> str:
    optimizer = row.get("optimizer")
    if optimizer not in OPTIMIZERS:
        optimizer = assumed["optimizer"][0] if "optimizer" in assumed else None
        if optimizer is None:
            raise _NotCompared(f"optimizer {row.get('optimizer', 'not stated')!r} unknown")
        notes.append(f"optimizer {optimizer} ({assumed['optimizer'][1]})")
    return optimizer


def _unit(row: dict, assumed: dict, notes: list[str]) -> str:
    unit = row["unit"]
    if unit not in UNITS:
        if "unit" not in assumed:
            raise _NotCompared("unit unknown (GB vs GiB)")
        unit, why = assumed["unit"]
        notes.append(f"unit {unit} ({why})")
    return unit


def _adapter(row: dict, assumed: dict, shape, notes: list[str]):
    """(rank, alpha, dropout, target modules: "all-linear" or a tuple of the shape's module names)."""
    rank = int(row.get("rank", 16))
    alpha = float(row.get("alpha", 2 * rank))
    dropout, why = dropout_of(row, assumed)
    if why and row["method"] != "full":
        notes.append(why)
    targets = row.get("target_modules")
    if targets is None:
        target_arg = "all-linear"
        if row["method"] != "full":
            notes.append("target_modules not stated: all-linear")
    else:
        known = [t for t in targets if t in shape.module_names]
        dropped = [t for t in targets if t not in shape.module_names]
        if dropped:
            notes.append(f"{', '.join(dropped)} not a decoder linear: adapter on it not counted")
        target_arg = tuple(known)
    return rank, alpha, dropout, target_arg


def build(row: dict):
    """(status, reason, setup fields, assumptions, estimate) for one row."""
    notes: list[str] = []
    try:
        built = _build(row, notes)
    except _NotCompared as exc:
        return "not compared", str(exc), None, notes
    return "compared", "", built, notes


def _build(row: dict, notes: list[str]):
    """(setup fields, estimate) for one row; _NotCompared says why not."""
    assumed = ASSUMED.get(row["id"], {})
    if row["method"] not in METHODS:
        raise _NotCompared(f"method {row['method']!r} not estimated")
    parallelism = row.get("parallelism", "single")
    devices = int(row.get("num_gpus", 1))
    if parallelism not in ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        raise _NotCompared(f"parallelism {parallelism!r} not modelled")
    if devices > 1:
        notes.append(f"per device under {parallelism} over {devices} GPUs (planner.parallel.shard)")
    offload = offload_of(row)
    if offload == "parameters":
        raise _NotCompared("FSDP CPU offload (parameters and optimizer state live in host memory)")
    cat, shape = _catalog_shape(row, notes)
    seq = _stated(row, assumed, notes, "seq_len")
    if seq is None:
        raise _NotCompared("sequence length not stated (data-dependent)")
    gc = _stated(row, assumed, notes, "gradient_checkpointing")
    if gc is None:
        raise _NotCompared("activation checkpointing not stated")
    optimizer = _optimizer(row, assumed, notes)
    unit = _unit(row, assumed, notes)
    dtype = DTYPES[row["precision"]]
    attention, why = attention_of(row)
    if why:
        notes.append(why)
    padded, why = padded_of(row)
    if why:
        notes.append(why)
    loss, why = loss_of(row, assumed)
    notes.append(why)
    if offload and not gc:
        raise _NotCompared("activation offloading without checkpointing (peftplan offloads checkpointed inputs)")
    if offload:
        notes.append("activation offloading (note: enable_activation_offloading=True)")

    rank, alpha, dropout, target_arg = _adapter(row, assumed, shape, notes)
    setup = Setup(shape, Geometry(int(row["micro_batch_size"]), int(seq), bool(gc), 1, attention, padded),
                  AdapterSettings(rank, alpha, dropout, target_arg), optimizer=optimizer, dtype=dtype,
                  device_kind="cuda", loss=loss, offload=bool(offload))
    est = per_device(row["method"], setup, parallelism, devices)
    adapter = row["method"] != "full"
    fields = dict(catalog_model=cat.id, seq_len=seq, gradient_checkpointing=gc, optimizer=optimizer, dtype=dtype,
                  attention=attention, padded=padded, loss=loss, offload=bool(offload),
                  rank=rank if adapter else "", alpha=alpha if adapter else "", dropout=dropout if adapter else "",
                  target_modules=" ".join(target_arg) if isinstance(target_arg, tuple) else target_arg,
                  unit_used=unit, tokens=setup.geometry.tokens, vocab=shape.vocab_size)
    return fields, est


def compare(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        status, reason, built, notes = build(row)
        stack, kind = stack_of(row)
        rec = {
            "id": row["id"], "source": row["source"], "stack": stack, "model": row["model"], "method": row["method"],
            "micro_batch_size": row.get("micro_batch_size", ""), "seq_len": row.get("seq_len", ""),
            "gradient_checkpointing": row.get("gradient_checkpointing", ""), "optimizer": row.get("optimizer", ""),
            "precision": row.get("precision", ""), "gpu": row.get("gpu", ""), "parallelism": row.get("parallelism", ""),
            "measured": row["measured"], "unit": row["unit"], "published_value": row["value"],
            "status": status, "reason": reason,
        }
        if built is not None:
            fields, est = built
            rec.update(fields)
            scale = UNITS[fields["unit_used"]]
            if row["measured"] == "allocated":
                cw = "peak_allocated_bytes"
            elif row["measured"] in ("reserved", "nvidia-smi"):
                cw = "device_total_bytes"
            else:  # unknown: the allocated estimate, the lower of the two (said in the table)
                cw = "peak_allocated_bytes"
            est_bytes = getattr(est, cw)
            published_bytes = row["value"] * scale
            context = A.CUDA_CONTEXT_BYTES if cw == "device_total_bytes" else 0
            # torch.cuda.max_memory_reserved counts neither the CUDA context nor paged (unified-memory)
            # optimizer state; device_total_bytes counts both.
            reserved_like = est.device_total_bytes - context - est.evictable_bytes
            rec.update({
                "compared_with": cw,
                "published_bytes": int(published_bytes),
                "est_peak_allocated_bytes": est.peak_allocated_bytes,
                "est_device_total_bytes": est.device_total_bytes,
                "est_paged_bytes": est.evictable_bytes,
                "est_phase": est.phase,
                **{f"est_{k}_bytes": v for k, v in est.components().items() if k in BREAKDOWN},
                "estimate_in_unit": round(est_bytes / scale, 2),
                "error": (est_bytes - published_bytes) / published_bytes,
                "error_torch_reserved": ((reserved_like - published_bytes) / published_bytes
                                         if row["measured"] == "reserved" else ""),
                "close_stack": kind == "hf" and row["measured"] == "allocated",
                "stack_mismatch": known_mismatch(row) or "",
            })
            if fields["unit_used"] != row["unit"] and row["unit"] not in UNITS:
                other = "GiB" if fields["unit_used"] == "GB" else "GB"
                alt = row["value"] * UNITS[other]
                notes.append(f"as {other}: error {(est_bytes - alt) / alt:+.1%}")
            rec["differences"] = "; ".join(differences(row, cw, fields["loss"], fields["tokens"], fields["vocab"]))
        rec["assumptions"] = "; ".join(notes)
        out.append(rec)
    return out


# components of the estimated peak kept in the CSV, so that a miss can be traced to a term
BREAKDOWN = ("weights", "quant_constants", "adapter", "gradients", "optimizer", "activations", "logits", "transient")

COLUMNS = ["id", "source", "stack", "model", "catalog_model", "method", "micro_batch_size", "seq_len",
           "gradient_checkpointing", "attention", "padded", "loss", "offload", "optimizer", "precision", "dtype",
           "rank", "alpha",
           "dropout", "target_modules", "gpu", "parallelism", "measured", "unit", "unit_used", "published_value",
           "published_bytes", "status", "reason", "compared_with", "est_peak_allocated_bytes",
           "est_device_total_bytes", "est_paged_bytes", "est_phase", *(f"est_{k}_bytes" for k in BREAKDOWN),
           "estimate_in_unit", "error", "error_torch_reserved", "close_stack", "stack_mismatch", "assumptions",
           "differences"]


def write_csv(recs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in recs:
            w.writerow({k: (f"{r[k]:.4f}" if k.startswith("error") and isinstance(r.get(k), float) else r.get(k, ""))
                        for k in COLUMNS})


def _link(r: dict) -> str:
    src = r["source"]
    host = ("torchtune" if "torchtune" in src else "LitGPT" if "litgpt" in src.lower() else
            "fms-acceleration" if "fms-acceleration" in src else "PEFT" if "huggingface/peft" in src else
            "fsdp_qlora" if "fsdp_qlora" in src else "Qwen" if "QwenLM" in src else "source")
    return f"[{host}]({src})"


def _settings(r: dict) -> str:
    parts = [f"b{r['micro_batch_size']}×{r['seq_len']}", "GC" if r["gradient_checkpointing"] else "no GC",
             r["optimizer"], r["precision"]]
    if r["method"] != "full":
        parts.insert(0, f"r{r['rank']} {r['target_modules'].replace('_proj', '')}")
    if r.get("attention") == "flash_attention_2":
        parts.append("FA2")
    if r.get("padded") is False:
        parts.append("packed/fixed")
    parts.append(f"{r['loss']} loss")
    if r.get("offload"):
        parts.append("activations offloaded")
    return ", ".join(str(p) for p in parts)


def _median_line(name: str, errs: list[float]) -> str:
    if not errs:
        return f"- {name}: no rows"
    a = [abs(e) for e in errs]
    return (f"- {name}: {len(errs)} rows, median |error| **{statistics.median(a):.1%}**, "
            f"worst {max(errs, key=abs):+.1%}")


def markdown(recs: list[dict]) -> str:
    comp = [r for r in recs if r["status"] == "compared"]
    lines = [
        "| source | id | model | method | settings | published | measured | our estimate | error "
        "| differences and assumptions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comp:
        cw = "allocated" if r["compared_with"] == "peak_allocated_bytes" else "device total"
        kind = r["measured"] + (" (treated as allocated)" if r["measured"] == "unknown" else "")
        extra = ""
        if r["error_torch_reserved"] != "":
            extra = f" (w/o context{' + paged' if r['est_paged_bytes'] else ''}: {r['error_torch_reserved']:+.0%})"
        notes = "; ".join(x for x in (r["differences"], r["assumptions"]) if x)
        model = r["model"].split("/")[-1]
        lines.append(
            f"| {_link(r)} | `{r['id']}` | {model} | {r['method']} | {_settings(r)} | "
            f"{r['published_value']} {r['unit_used']}{'' if r['unit'] == r['unit_used'] else ' (assumed)'} | {kind} | "
            f"{r['estimate_in_unit']} {r['unit_used']} ({cw}) | **{r['error']:+.0%}**{extra} | {notes} |")
    close = [r["error"] for r in comp if r["close_stack"]]
    matched = [r["error"] for r in comp if r["close_stack"] and not r["stack_mismatch"]]
    hf_all = [r["error"] for r in comp if stack_of(r)[1] == "hf"]
    tt = [r["error"] for r in comp if stack_of(r)[1] == "torchtune"]
    lit = [r["error"] for r in comp if stack_of(r)[1] == "litgpt"]
    alloc = [r["error"] for r in comp if r["measured"] == "allocated"]
    summary = [
        "",
        _median_line("close stack (HF transformers + peft + bitsandbytes, allocated)", close),
        _median_line("close stack without the two precision mismatches (pure fp16 without AMP; "
                     "prepare_model_for_kbit_training's fp32 upcast)", matched),
        _median_line("all HF transformers rows (allocated and reserved)", hf_all),
        _median_line("torchtune rows", tt),
        _median_line("LitGPT rows", lit),
        _median_line("every row measured as allocated", alloc),
        _median_line("every compared row", [r["error"] for r in comp]),
        "",
        "Rows not compared:",
        "",
        "| id | model | method | why not |",
        "|---|---|---|---|",
    ]
    for r in recs:
        if r["status"] != "compared":
            summary.append(f"| `{r['id']}` | {r['model']} | {r['method']} | {r['reason']} |")
    return "\n".join(lines + summary) + "\n"


def update_doc(section: str, doc: Path) -> bool:
    return replace_section(doc, BEGIN, END, section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=OUT_CSV)
    ap.add_argument("--md", type=Path, default=OUT_MD)
    ap.add_argument("--update-doc", action="store_true", help=f"replace the marked section of {DOC.name}")
    args = ap.parse_args(argv)
    with args.data.open("rb") as fh:
        rows = tomllib.load(fh)["measurements"]
    recs = compare(rows)
    write_csv(recs, args.out)
    section = markdown(recs)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(section)
    comp = [r for r in recs if r["status"] == "compared"]
    for r in comp:
        print(f"{r['id']:55s} {r['published_value']:7.2f} {r['unit_used']:3s} {r['measured']:9s} "
              f"est {r['estimate_in_unit']:7.2f}  {r['error']:+7.1%}  [{r['est_phase']}] {r['loss']}")
    print(f"{len(comp)} compared, {len(recs) - len(comp)} not compared -> {args.out}, {args.md}")
    if args.update_doc:
        print("docs/accuracy.md updated" if update_doc(section, DOC) else "docs/accuracy.md: markers not found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
