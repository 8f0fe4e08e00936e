"""peftplan's estimate next to published measured peak-memory figures (docs/published_measurements.toml).

    python benchmarks/published.py

Writes benchmarks/results/published_comparison.csv (every row, compared or not, with the reason) and
benchmarks/results/published_comparison.md (the markdown section of docs/accuracy.md). With
--update-doc, the section also replaces the text between the `<!-- published:begin -->` and
`<!-- published:end -->` markers of docs/accuracy.md.

Nothing here tunes the estimator: every setting a source leaves out is taken from the row's `note`
(or the source's config) and written down in the `assumptions` column; where the measured stack
differs from peftplan's runtime (transformers + peft + bitsandbytes under autocast) the
`differences` column says how. Only the public planner API is used.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import tomllib
from pathlib import Path

from peftplan.planner.parallel import shard
from peftplan.planner import AdapterSettings, Geometry, Setup, estimate, shape_from_config
from peftplan.planner import assumptions as A
from peftplan.planner.catalog import find_model
from peftplan.planner.shapes import UnsupportedArchitecture
from docsection import replace_section  # benchmarks/ is on sys.path when a script runs

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

# Same architecture (identical config.json shapes) under another hub id: instruct/chat fine-tunes and
# re-uploads of a catalog model. Used only when find_model() does not know the id itself.
SAME_ARCHITECTURE = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "NousResearch/Llama-2-70b-hf": "meta-llama/Llama-2-70b-hf",
}

# Settings a row leaves out, read from its `note` (or the source's config), with the reason.
# key: row id -> {field: (value, why)}
ASSUMED: dict[str, dict[str, tuple]] = {}
_ALPACA_512 = (512, "Alpaca truncated at max_seq_len 512 (note: assumed default of that era); batches are "
                    "padded to the longest sample, so 512 is an upper bound")
for _id in ("torchtune-tut-llama2-7b-lora-qv-r8", "torchtune-tut-llama2-7b-lora-all-r8",
            "torchtune-tut-llama2-7b-lora-all-r64", "torchtune-tut-llama2-7b-qlora",
            "torchtune-readme-2024-04-llama2-7b-lora-single", "torchtune-readme-2024-04-llama2-7b-full-lowmem"):
    ASSUMED[_id] = {"seq_len": _ALPACA_512}
ASSUMED["torchtune-pr961-llama2-7b-full-lowmem-bs4-2048"] = {
    "optimizer": ("paged_adamw_32bit", "note: 7B_full_low_memory used bitsandbytes PagedAdamW (32-bit) + "
                                       "optimizer_in_bwd"),
    "unit": ("GB", "unit not stated: GB (1e9) assumed, torchtune's logger of May 2024 divided by 1e9"),
}
ASSUMED["torchtune-readme-llama31-8b-lora-a6000"] = {
    "gradient_checkpointing": (False, "note: activation checkpointing OFF on the A6000 (assumed by the note)"),
}
ASSUMED["torchtune-readme-llama32-3b-full-packed-ac-optinbwd"] = {
    "optimizer": ("adamw_torch", "note: torch AdamW with bf16 states, step fused into backward"),
}
ASSUMED["fms-mistral7b-qlora-bnb-bs4-1gpu"] = {
    "dropout": (0.0, "lora_dropout 0.0 in the scenario's CSV row (quote)"),
}
ASSUMED["fms-mistral7b-lora-r16-bs8-1gpu"] = {
    "dropout": (0.0, "same standard-peft scenario as the batch-4 row, whose note gives dropout 0.0"),
}
for _id in ("peft-mc-llama32-3b-lora-r32-qv", "peft-mc-llama32-3b-dora-r32-qv"):
    ASSUMED[_id] = {"dropout": (0.0, "lora_dropout 0.0 in the experiment's adapter_config.json")}

# The stack each source measured, by id prefix, and whether it is peftplan's own (HF transformers +
# peft + bitsandbytes). Only "hf" rows with allocated memory count as "close stack".
STACKS = {
    "torchtune-": ("torchtune", "torchtune"),
    "litgpt-": ("LitGPT", "litgpt"),
    "fms-": ("HF Trainer + peft (fms-hf-tuning)", "hf"),
    "peft-mc-": ("HF transformers + peft (PEFT method_comparison)", "hf"),
    "peft-readme-": ("HF transformers + peft (PEFT examples)", "hf"),
    "answerai-": ("Answer.AI fsdp_qlora (HF model + peft/bnb, custom loop)", "hf-custom"),
    "qwen1-": ("Qwen finetune.py (HF Trainer + peft; GPTQ for Q-LoRA)", "hf"),
}


# Row-specific facts from the notes that bear on the comparison.
EXTRA_DIFFERENCES = {
    "torchtune-tut-llama2-7b-qlora": [
        "reserved was already 9.13 GB at model init (the note): a load-time peak the caching allocator keeps; "
        "peftplan estimates the training step only"],
    "torchtune-readme-2024-04-llama2-7b-lora-single": [
        "same nominal config as the tutorial's 15.57 GB row, measured by another torchtune revision"],
}


def stack_of(row: dict) -> tuple[str, str]:
    for prefix, val in STACKS.items():
        if row["id"].startswith(prefix):
            return val
    return ("unknown", "unknown")


def _dropout(row: dict, assumed: dict) -> tuple[float, str | None]:
    if "dropout" in assumed:
        v, why = assumed["dropout"]
        return v, f"dropout {v} ({why})"
    m = re.search(r"(?:lora_)?dropout[\s=:]*([0-9]*\.[0-9]+|[01])\b", row.get("note", ""))
    if m:
        return float(m.group(1)), None  # stated in the note
    return 0.05, "dropout not stated: 0.05 assumed (peftplan's default)"


def _attention(row: dict) -> tuple[str, str | None]:
    note = row.get("note", "").lower()
    if row["id"].startswith("fms-"):
        return "flash_attention_2", "attention flash_attention_2 (fms defaults.yaml: use_flash_attn True)"
    if "flash-attn" in note or "flash attention" in note or "flash_attention" in note or "flash-attention" in note:
        return "flash_attention_2", "attention flash_attention_2 (note says flash attention)"
    return "sdpa", None


def _padded(row: dict) -> tuple[bool, str | None]:
    note = row.get("note", "").lower()
    if "not packed" in note:
        return True, None
    if re.search(r"\bpacked\b", note) or "dummy" in note or "exactly" in note or "fixed length" in note:
        return False, "no padding mask (packed / fixed-length data)"
    return True, None


def _offload(row: dict) -> bool:
    note = row.get("note", "")
    # the notes flag offloaded runs in capitals or by the flag itself (a mere mention of other rows that
    # offload does not count)
    return bool(re.search(r"WITH CPU ACTIVATION OFFLOADING|USES FSDP CPU OFFLOAD|enable_activation_offloading=True|"
                          r"use_cpu_offload [Tt]rue", note))


def differences(row: dict, compared_with: str) -> list[str]:
    """How the measured stack differs from peftplan's runtime, in ways that matter for memory."""
    note, rid, method = row.get("note", ""), row["id"], row["method"]
    out: list[str] = []
    stack, kind = stack_of(row)
    adapter = method in ("lora", "qlora", "dora", "qdora")
    if kind == "torchtune":
        out.append("torchtune, not transformers: own attention/MLP modules and loss")
        if adapter:
            out.append("pure bf16 LoRA weights/grads/AdamW states (peftplan: fp32 adapters, autocast)")
        if method == "qlora":
            out.append("torchao NF4 (only LoRA-targeted linears quantized)")
        if re.search(r"chunked CE|CEWithChunkedOutputLoss|chunked cross", note, re.I):
            out.append("chunked cross-entropy (no full fp32 logits; peftplan counts 12 B x tokens x vocab)")
        elif "0031bfb" in row["source"]:
            out.append("loss not stated (torchtune's llama3_1 configs use chunked cross-entropy)")
        if re.search(r"\bcompile", note, re.I) and not re.search(r"no (torch\.)?compile", note, re.I):
            out.append("torch.compile (fused activations)")
        if re.search(r"optimizer_in_bwd(?! ?=? ?False)|fused into backward|step fused", note, re.I):
            out.append("optimizer step fused into backward (no full gradient buffer)")
    elif kind == "litgpt":
        out.append("LitGPT, not transformers: fused qkv, own loss")
        if adapter:
            out.append("bf16-true: pure bf16 LoRA weights/grads/AdamW states (peftplan: fp32 adapters)")
        if method == "qlora":
            if "nf4-dq" in note or "WITH double quantization" in note:
                out.append("bnb NF4 with double quantization")
            else:
                out.append("bnb NF4 without double quantization (+~4 bits/64 weights of fp32 absmax)")
        if "validation" in note or "generation" in note:
            out.append("peak includes validation/generation (KV cache)")
        if rid.startswith("litgpt-hub-"):  # Alpaca2k truncated at 512, padded to the longest in the batch
            out.append("seq_len is a truncation cap: most batches are shorter")
    elif kind == "hf":
        if rid.startswith("fms-"):
            if method == "full":
                out.append("pure fp16 weights/grads/AdamW states, no AMP (peftplan: fp32 master weights "
                           "under fp16 autocast)")
            elif method == "lora":
                out.append("fp16 base without AMP: adapters created in fp16 (peftplan: fp32 adapters, autocast)")
            elif method == "qlora":
                out.append("baseline scenario: SFTTrainer prepares the 4-bit model with peft's "
                           "prepare_model_for_kbit_training, which upcasts embeddings, lm_head and norms to "
                           "fp32 (likely; fms-acceleration's own plugin avoids it)")
            out.append("~4096 tokens/sample derived from throughput, not stated")
        if rid.startswith("peft-mc-"):
            out.append("bf16 base without autocast")
            out.append("max over the whole run incl. eval generation (batch 50); seq_len 768 is a cap")
    out += EXTRA_DIFFERENCES.get(rid, [])
    if compared_with == "device_total_bytes" and row["measured"] == "reserved":
        out.append("max_memory_reserved excludes the CUDA context (512 MiB in device_total_bytes)")
    if "paged" in row.get("optimizer", "") or "paged" in note.lower():
        if row["measured"] in ("reserved", "allocated", "unknown"):
            out.append("paged optimizer state is outside torch's allocator")
    return out


def build(row: dict):
    """(status, reason, setup fields, assumptions, estimate) for one row."""
    assumed = ASSUMED.get(row["id"], {})
    notes: list[str] = []
    if row["method"] not in METHODS:
        return "not compared", f"method {row['method']!r} not estimated", None, notes
    parallelism = row.get("parallelism", "single")
    devices = int(row.get("num_gpus", 1))
    if parallelism not in ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        return "not compared", f"parallelism {parallelism!r} not modelled", None, notes
    if devices > 1:
        notes.append(f"per device under {parallelism} over {devices} GPUs (planner.parallel.shard)")
    if _offload(row):
        return "not compared", "CPU offload (activations or parameters live in host memory)", None, notes
    cat = find_model(row["model"])
    if cat is None and row["model"] in SAME_ARCHITECTURE:
        cat = find_model(SAME_ARCHITECTURE[row["model"]])
        if cat is not None:
            notes.append(f"model: catalog entry {cat.id} (same architecture)")
    if cat is None:
        return "not compared", f"model {row['model']} not in the catalog", None, notes
    try:
        shape = shape_from_config(cat.config)
    except UnsupportedArchitecture as exc:
        return "not compared", f"architecture not supported: {exc}", None, notes

    def pick(key):
        if key in row:
            return row[key]
        if key in assumed:
            v, why = assumed[key]
            notes.append(f"{key} {v} ({why})")
            return v
        return None

    seq = pick("seq_len")
    if seq is None:
        return "not compared", "sequence length not stated (data-dependent)", None, notes
    gc = pick("gradient_checkpointing")
    if gc is None:
        return "not compared", "activation checkpointing not stated", None, notes
    optimizer = row.get("optimizer")
    if optimizer not in OPTIMIZERS:
        optimizer = assumed["optimizer"][0] if "optimizer" in assumed else None
        if optimizer is None:
            return "not compared", f"optimizer {row.get('optimizer', 'not stated')!r} unknown", None, notes
        notes.append(f"optimizer {optimizer} ({assumed['optimizer'][1]})")
    unit = row["unit"]
    if unit not in UNITS:
        if "unit" not in assumed:
            return "not compared", "unit unknown (GB vs GiB)", None, notes
        unit, why = assumed["unit"]
        notes.append(f"unit {unit} ({why})")
    dtype = DTYPES[row["precision"]]
    attention, why = _attention(row)
    if why:
        notes.append(why)
    padded, why = _padded(row)
    if why:
        notes.append(why)

    rank = int(row.get("rank", 16))
    alpha = float(row.get("alpha", 2 * rank))
    dropout, why = _dropout(row, assumed)
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

    setup = Setup(shape, Geometry(int(row["micro_batch_size"]), int(seq), bool(gc), 1, attention, padded),
                  AdapterSettings(rank, alpha, dropout, target_arg), optimizer, dtype, "cuda")
    est = estimate(row["method"], setup)
    if devices > 1 and parallelism != "single":
        est = shard(est, setup, parallelism, devices, row["method"] in ("qlora", "qdora"))
    fields = dict(catalog_model=cat.id, seq_len=seq, gradient_checkpointing=gc, optimizer=optimizer, dtype=dtype,
                  attention=attention, padded=padded, rank=rank if row["method"] != "full" else "",
                  alpha=alpha if row["method"] != "full" else "", dropout=dropout if row["method"] != "full" else "",
                  target_modules=" ".join(target_arg) if isinstance(target_arg, tuple) else target_arg,
                  unit_used=unit)
    return "compared", "", (fields, est), notes


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
            })
            if fields["unit_used"] != row["unit"] and row["unit"] not in UNITS:
                other = "GiB" if fields["unit_used"] == "GB" else "GB"
                alt = row["value"] * UNITS[other]
                notes.append(f"as {other}: error {(est_bytes - alt) / alt:+.1%}")
            rec["differences"] = "; ".join(differences(row, cw))
        rec["assumptions"] = "; ".join(notes)
        out.append(rec)
    return out


# components of the estimated peak kept in the CSV, so that a miss can be traced to a term
BREAKDOWN = ("weights", "quant_constants", "adapter", "gradients", "optimizer", "activations", "logits", "transient")

COLUMNS = ["id", "source", "stack", "model", "catalog_model", "method", "micro_batch_size", "seq_len",
           "gradient_checkpointing", "attention", "padded", "optimizer", "precision", "dtype", "rank", "alpha",
           "dropout", "target_modules", "gpu", "parallelism", "measured", "unit", "unit_used", "published_value",
           "published_bytes", "status", "reason", "compared_with", "est_peak_allocated_bytes",
           "est_device_total_bytes", "est_paged_bytes", "est_phase", *(f"est_{k}_bytes" for k in BREAKDOWN),
           "estimate_in_unit", "error", "error_torch_reserved", "close_stack", "assumptions", "differences"]


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
    hf_all = [r["error"] for r in comp if stack_of(r)[1] == "hf"]
    tt = [r["error"] for r in comp if stack_of(r)[1] == "torchtune"]
    lit = [r["error"] for r in comp if stack_of(r)[1] == "litgpt"]
    alloc = [r["error"] for r in comp if r["measured"] == "allocated"]
    summary = [
        "",
        _median_line("close stack (HF transformers + peft + bitsandbytes, allocated)", close),
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
              f"est {r['estimate_in_unit']:7.2f}  {r['error']:+7.1%}  [{r['est_phase']}]")
    print(f"{len(comp)} compared, {len(recs) - len(comp)} not compared -> {args.out}, {args.md}")
    if args.update_doc:
        print("docs/accuracy.md updated" if update_doc(section, DOC) else "docs/accuracy.md: markers not found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
