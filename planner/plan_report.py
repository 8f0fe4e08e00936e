"""Present a plan: the JSON every script reads, and a rich summary a colleague can read.

The notes of a plan are the plan's own: a key the spec left out is reported with the value the plan
chose for it (not the estimate's placeholder), and every warning — the spec's, the model's, the plan's —
is printed once.
"""

from __future__ import annotations

from ..console import styled
from . import assumptions as A
from .choose import Candidate, PlanResult
from .report import breakdown_bar, legend, warning_line
from .terms import duration, gib

# hyperparameter -> the spec key it fills
SPEC_KEYS = {
    "rank": "method.rank", "alpha": "method.alpha", "dropout": "method.dropout",
    "target_modules": "method.target_modules", "learning_rate": "training.learning_rate",
    "lr_scheduler": "training.lr_scheduler", "warmup_ratio": "training.warmup_ratio", "epochs": "training.epochs",
    "eval_fraction": "data.eval_fraction",
}
# keys the estimate notes with a placeholder the plan replaces by its own choice
PLANNED = ("training.micro_batch_size", "training.gradient_accumulation_steps", "training.gradient_checkpointing",
           "training.optimizer", "method.rank", "method.alpha", "method.dropout", "method.target_modules",
           "method.rank/", "method.alpha/", "method.dropout/")


def plan_notes(result: PlanResult) -> list[str]:
    """The notes of the plan: the estimate's own notes, with every key the plan chose stated as chosen."""
    rep = result.report
    kept = [n for n in [*rep.hardware.notes, *rep.resolved.notes] if not n.startswith(PLANNED)]
    c = result.chosen
    if c is None:
        return kept
    out = list(kept)
    for key, value, why in _geometry_choices(result, c):
        out.append(f"{key} not set: {value!r} ({why})")
    for k, v in result.hyperparameters.items():
        if k in SPEC_KEYS and not v.user_set:
            out.append(f"{SPEC_KEYS[k]} not set: {v.value!r} ({v.why})")
    return out


def _geometry_choices(result: PlanResult, c: Candidate) -> list[tuple[str, object, str]]:
    """(key, value, why) for the geometry keys the spec left out."""
    g = c.setup.geometry
    given = result.given
    out = []
    if "training.micro_batch_size" not in given:
        out.append(("training.micro_batch_size", g.micro_batch_size, "the fastest geometry that fits"))
    if "training.gradient_accumulation_steps" not in given:
        out.append(("training.gradient_accumulation_steps", c.accumulation,
                    f"effective batch {c.effective_batch} over {c.devices} device(s)"))
    if "training.gradient_checkpointing" not in given:
        out.append(("training.gradient_checkpointing", g.gradient_checkpointing,
                    "needed to fit or faster overall" if g.gradient_checkpointing else "not needed: no recomputation"))
    if "training.optimizer" not in given:
        out.append(("training.optimizer", c.setup.optimizer, "32-bit AdamW unless memory needs 8-bit or paged state"))
    return out


def plan_warnings(result: PlanResult) -> list[str]:
    return [warning_line(p.render()) for p in result.report.resolved.warnings] + \
        [f"warning: {w}" for w in result.warnings]


def _method_json(result: PlanResult, c: Candidate) -> dict:
    g = c.setup.geometry
    est = c.estimate
    return {
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "device_total_bytes": est.device_total_bytes,
        "fits": c.fits,
        "headroom_bytes": result.report.usable_bytes - c.needed_bytes,
        "evictable_bytes": est.device_total_bytes - c.needed_bytes,
        "paged_to_host_bytes": c.paging.bytes if c.paging else 0,
        "trainable_parameters": est.trainable_parameters,
        "peak_phase": est.phase,
        "components": est.components(),
        "geometry": {"micro_batch_size": g.micro_batch_size, "seq_len": g.seq_len,
                     "gradient_checkpointing": g.gradient_checkpointing,
                     "gradient_accumulation_steps": c.accumulation, "optimizer": c.setup.optimizer,
                     "dropout": c.setup.adapter.dropout},
        "parallelism": c.parallelism,
        "devices": c.devices,
        "time": c.time.as_dict() if c.time else None,
        "cost_usd": round(c.cost_usd, 2) if c.cost_usd is not None else None,
        "terms": [t.as_dict() for t in est.terms],
    }


def plan_json(result: PlanResult) -> dict:
    out = result.report.to_json()
    out["methods"] = {m: _method_json(result, c) for m, c in result.best.items()}
    out["notes"] = plan_notes(result)
    out["warnings"] = plan_warnings(result)  # one "warning: …" line each, as `estimate --json` writes them
    c = result.chosen
    if c is not None:
        g = c.setup.geometry
        out["geometry"].update(micro_batch_size=g.micro_batch_size, gradient_checkpointing=g.gradient_checkpointing,
                               gradient_accumulation_steps=c.accumulation)
        out["optimizer"] = c.setup.optimizer
        out["chosen"] = {
            "method": c.method,
            "reasons": result.reasons,
            "hyperparameters": {k: v.value for k, v in result.hyperparameters.items()},
            "rationale": {k: ("set in the spec" if v.user_set else v.why) for k, v in result.hyperparameters.items()},
            "geometry": {"micro_batch_size": g.micro_batch_size, "gradient_accumulation_steps": c.accumulation,
                         "gradient_checkpointing": g.gradient_checkpointing, "seq_len": g.seq_len,
                         "optimizer": c.setup.optimizer, "attention": g.attention,
                         "effective_batch_size": c.effective_batch, "packing": c.packing},
            "parallelism": c.parallelism,
            "devices": c.devices,
            "precision": result.report.resolved.precision,
            "estimate": {"peak_allocated_bytes": c.estimate.peak_allocated_bytes,
                         "device_total_bytes": c.estimate.device_total_bytes,
                         "paged_to_host_bytes": c.paging.bytes if c.paging else 0},
            "time": ({"tokens": c.time.tokens, "useful_tokens": c.time.useful_tokens,
                      "optimizer_steps": c.time.optimizer_steps, "seconds": round(c.time.seconds, 1),
                      "low_seconds": round(c.time.low_seconds, 1), "high_seconds": round(c.time.high_seconds, 1),
                      "tokens_per_second": round(c.time.useful_tokens / c.time.seconds, 1) if c.time.seconds else None,
                      "assumptions": list(c.time.assumptions)} if c.time else None),
            "cost_usd": round(c.cost_usd, 2) if c.cost_usd is not None else None,
            "steps_per_epoch": result.steps_per_epoch,
        }
    else:
        out["chosen"] = None
        out["suggestions"] = result.suggestions
        out["suggestions_for"] = result.suggestions_for  # memory (nothing fits) | caps (max_hours, budget_usd)
    out["rejected"] = result.rejected
    return out


def _memory_line(result: PlanResult, c: Candidate) -> str:
    rep = result.report
    text = (f"memory   {gib(c.needed_bytes)} of {gib(rep.usable_bytes)} usable per device "
            f"(peak allocated {gib(c.estimate.peak_allocated_bytes)}, at the {c.estimate.phase} phase)")
    if c.paging:
        text += (f" + {gib(c.paging.bytes)} of optimizer state paged to host memory every step "
                 f"({gib(c.estimate.device_total_bytes)} in all)")
    return text


def render_plan(result: PlanResult, console) -> None:
    """The plan as rich output: the chosen plan (or why nothing is), every method's best, why, notes, warnings."""
    from rich.panel import Panel
    from rich.text import Text

    rep, c = result.report, result.chosen
    dev = rep.hardware.device
    head = styled((rep.model.name, "bold"), f" on {rep.hardware.devices} × ", (dev.name, "bold"),
                  f" ({gib(dev.memory_bytes)} each, {A.FIT_HEADROOM_FRACTION:.0%} kept free)")
    if c is not None:
        lines = [head, "", *_chosen_lines(result, c)]
        console.print(Panel(Text("\n").join(styled(x) for x in lines), title="peftplan plan", title_align="left"))
        console.print(_hyperparameter_table(result))
    else:
        verdict = "Nothing fits." if result.suggestions_for == "memory" else "Every method fits, none within the caps."
        console.print(Panel(Text("\n").join([head, Text(""), styled((verdict, "bold red"))]),
                            title="peftplan plan", title_align="left"))
    console.print(_methods_table(result))
    console.print(legend())
    advice = "What would fit" if result.suggestions_for == "memory" else "What would meet the caps"
    for title, items in (("Why", result.reasons[1:]),
                         ("Alternatives", [f"{r['method']}: {r['why']}" for r in result.rejected]),
                         (advice, result.suggestions)):
        if items:
            console.print(styled((title, "bold")))
            for item in items:
                console.print(styled(f"  • {item}"))
    if c is not None and c.time:
        console.print(styled(("assumptions: " + "; ".join(c.time.assumptions), "bright_black")))
    for line in [*rep.hardware.notes, *rep.resolved.notes]:
        if "not set" not in line:
            console.print(styled((f"note: {line}", "bright_black")))
    for w in plan_warnings(result):
        console.print(styled((w, "yellow")))


def _chosen_lines(result: PlanResult, c) -> list:
    """The chosen plan: method and why, memory, batch geometry, time and cost, steps per epoch."""
    rep, dev, g = result.report, result.report.hardware.device, c.setup.geometry
    par = f" with {c.parallelism.upper()} over {c.devices} devices" if c.devices > 1 else ""
    lines = [styled((c.method.upper(), "bold green"), f"{par}  — {result.reasons[0] if result.reasons else ''}"),
             _memory_line(result, c),
             f"batch    micro-batch {g.micro_batch_size} × {g.seq_len} tokens{' (packed)' if c.packing else ''}, "
             f"accumulation {c.accumulation} "
             f"(effective batch {c.effective_batch}), gradient checkpointing "
             f"{'on' if g.gradient_checkpointing else 'off'}, {c.setup.optimizer}, {rep.resolved.precision}, "
             f"{g.attention} attention"]
    if c.time:
        cost = (f", ~${c.cost_usd:,.2f} at ${dev.price_usd_per_hour}/h ({dev.price_date})"
                if c.cost_usd is not None else "")
        lines.append(f"time     ~{duration(c.time.seconds)} (range {duration(c.time.low_seconds)}–"
                     f"{duration(c.time.high_seconds)}) for {c.time.tokens / 1e6:,.1f}M tokens{cost}")
    else:
        lines.append("time     unknown: set data.num_examples (and data.avg_tokens) for time and cost")
    if result.steps_per_epoch:
        held = float(result.hyperparameters["eval_fraction"].value)
        split = f", {held:.1%} of the examples held out for evaluation" if held else ", no held-out split"
        lines.append(f"steps    {result.steps_per_epoch} optimizer steps per epoch{split}")
    return lines


def _hyperparameter_table(result: PlanResult):
    from rich.table import Table

    hp = Table(title="Hyperparameters", title_justify="left", show_header=True)
    hp.add_column("key")
    hp.add_column("value", justify="right")
    hp.add_column("why")
    for k, v in result.hyperparameters.items():
        hp.add_row(k, str(v.value), styled(("set in the spec", "bright_black")) if v.user_set else v.why)
    return hp


def _fit_mark(x, chosen: bool):
    from rich.text import Text

    if chosen:
        return Text("★ paged" if x.paging else "★", style="bold green")
    if not x.fits:
        return Text("✗", style="red")
    return Text("✓ paged", style="yellow") if x.paging else Text("✓", style="green")


def _methods_table(result: PlanResult):
    """Every method at its own best geometry: fit, memory, headroom, geometry, time, cost, a breakdown bar."""
    from rich.table import Table
    from rich.text import Text

    rep, c = result.report, result.chosen
    table = Table(title="All methods (each at its own best geometry)", title_justify="left")
    for col in ("method", "fits", "needs", "headroom", "geometry", "time", "cost", "breakdown (bar = device memory)"):
        table.add_column(col, justify="right" if col in ("needs", "headroom", "time", "cost") else "left")
    for m, x in result.best.items():
        g = x.setup.geometry
        head_bytes = rep.usable_bytes - x.needed_bytes
        table.add_row(m, _fit_mark(x, c is not None and m == c.method), gib(x.needed_bytes),
                      Text(gib(head_bytes), style="green" if head_bytes >= 0 else "red"),
                      f"mb {g.micro_batch_size}, gc {'on' if g.gradient_checkpointing else 'off'}, {x.setup.optimizer}"
                      + (f", {x.parallelism}×{x.devices}" if x.devices > 1 else ""),
                      duration(x.time.seconds) if x.time else "?",
                      f"${x.cost_usd:,.0f}" if x.cost_usd is not None else "?",
                      breakdown_bar(x.estimate.components(), rep.memory_bytes, width=30))
    return table
