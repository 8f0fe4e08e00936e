"""Present a plan: the CONTRACT.md JSON, and a rich summary a colleague can read."""

from __future__ import annotations

from . import assumptions as A
from .choose import Candidate, PlanResult
from .report import breakdown_bar, COLORS
from .terms import COMPONENTS, duration, gib


def _method_json(result: PlanResult, c: Candidate) -> dict:
    g = c.setup.geometry
    est = c.estimate
    return {
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "device_total_bytes": est.device_total_bytes,
        "fits": c.fits,
        "headroom_bytes": result.report.usable_bytes - c.needed_bytes,
        "evictable_bytes": est.evictable_bytes,
        "trainable_parameters": est.trainable_parameters,
        "peak_phase": est.phase,
        "components": est.components(),
        "geometry": {"micro_batch_size": g.micro_batch_size, "seq_len": g.seq_len,
                     "gradient_checkpointing": g.gradient_checkpointing,
                     "gradient_accumulation_steps": c.accumulation, "optimizer": c.setup.optimizer},
        "parallelism": c.parallelism,
        "devices": c.devices,
        "time": c.time.as_dict() if c.time else None,
        "cost_usd": round(c.cost_usd, 2) if c.cost_usd is not None else None,
        "terms": [t.as_dict() for t in est.terms],
    }


def plan_json(result: PlanResult) -> dict:
    out = result.report.to_json()
    out["methods"] = {m: _method_json(result, c) for m, c in result.best.items()}
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
                         "optimizer": c.setup.optimizer, "attention": g.attention},
            "parallelism": c.parallelism,
            "devices": c.devices,
            "precision": result.report.resolved.precision,
            "estimate": {"peak_allocated_bytes": c.estimate.peak_allocated_bytes,
                         "device_total_bytes": c.estimate.device_total_bytes},
            "time": ({"tokens": c.time.tokens, "seconds": round(c.time.seconds, 1),
                      "low_seconds": round(c.time.low_seconds, 1), "high_seconds": round(c.time.high_seconds, 1),
                      "assumptions": list(c.time.assumptions)} if c.time else None),
            "cost_usd": round(c.cost_usd, 2) if c.cost_usd is not None else None,
            "steps_per_epoch": result.steps_per_epoch,
        }
    else:
        out["chosen"] = None
        out["suggestions"] = result.suggestions
    out["rejected"] = result.rejected
    return out


_gib, _dur = gib, duration


def render_plan(result: PlanResult, console) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    rep = result.report
    dev = rep.hardware.device
    c = result.chosen
    head = f"[bold]{rep.model.name}[/] on {rep.hardware.count * rep.hardware.nodes} × [bold]{dev.name}[/] " \
           f"({_gib(dev.memory_bytes)} each, {A.FIT_HEADROOM_FRACTION:.0%} kept free)"
    if c is not None:
        g = c.setup.geometry
        par = f" with {c.parallelism.upper()} over {c.devices} devices" if c.devices > 1 else ""
        lines = [head, "",
                 f"[bold green]{c.method.upper()}[/]{par}  — {result.reasons[0] if result.reasons else ''}",
                 f"memory   {_gib(c.needed_bytes)} of {_gib(rep.usable_bytes)} usable per device "
                 f"(peak allocated {_gib(c.estimate.peak_allocated_bytes)}, at the {c.estimate.phase} phase)",
                 f"batch    micro-batch {g.micro_batch_size} × {g.seq_len} tokens, accumulation {c.accumulation}, "
                 f"gradient checkpointing {'on' if g.gradient_checkpointing else 'off'}, {c.setup.optimizer}, "
                 f"{rep.resolved.precision}, {g.attention}"]
        if c.time:
            cost = f", ~${c.cost_usd:,.2f} at ${dev.price_usd_per_hour}/h ({dev.price_date})" if c.cost_usd is not None else ""
            lines.append(f"time     ~{_dur(c.time.seconds)} (range {_dur(c.time.low_seconds)}–{_dur(c.time.high_seconds)}) "
                         f"for {c.time.tokens / 1e6:,.1f}M tokens{cost}")
        if result.steps_per_epoch:
            lines.append(f"steps    {result.steps_per_epoch} optimizer steps per epoch")
        console.print(Panel("\n".join(lines), title="peftplan plan", title_align="left"))
        hp = Table(title="Hyperparameters", title_justify="left", show_header=True)
        hp.add_column("key")
        hp.add_column("value", justify="right")
        hp.add_column("why")
        for k, v in result.hyperparameters.items():
            hp.add_row(k, str(v.value), "[bright_black]set in the spec[/]" if v.user_set else v.why)
        console.print(hp)
    else:
        console.print(Panel(head + "\n\n[bold red]Nothing fits.[/]", title="peftplan plan", title_align="left"))

    table = Table(title="All methods (each at its best geometry)", title_justify="left")
    for col in ("method", "fits", "needs", "headroom", "geometry", "time", "cost", "breakdown"):
        table.add_column(col, justify="right" if col in ("needs", "headroom", "time", "cost") else "left")
    scale = max(rep.memory_bytes, *(x.estimate.device_total_bytes for x in result.best.values()))
    for m, x in result.best.items():
        g = x.setup.geometry
        mark = Text("✓", style="green") if x.fits else Text("✗", style="red")
        if c is not None and m == c.method:
            mark = Text("★", style="bold green")
        head_bytes = rep.usable_bytes - x.needed_bytes
        table.add_row(m, mark, _gib(x.needed_bytes), Text(_gib(head_bytes), style="green" if head_bytes >= 0 else "red"),
                      f"mb {g.micro_batch_size}, gc {'on' if g.gradient_checkpointing else 'off'}, {x.setup.optimizer}"
                      + (f", {x.parallelism}×{x.devices}" if x.devices > 1 else ""),
                      _dur(x.seconds) if x.time else "?",
                      f"${x.cost_usd:,.0f}" if x.cost_usd is not None else "?",
                      breakdown_bar(x.estimate.components(), scale, width=30))
    console.print(table)
    legend = Text("  ")
    for name in COMPONENTS:
        legend.append("█ ", style=COLORS[name]).append(name + "  ")
    console.print(legend)
    if result.reasons[1:]:
        console.print("[bold]Why[/]")
        for r in result.reasons[1:]:
            console.print(f"  • {r}")
    if result.rejected:
        console.print("[bold]Alternatives[/]")
        for r in result.rejected:
            console.print(f"  • {r['method']}: {r['why']}")
    if result.suggestions:
        console.print("[bold]What would fit[/]")
        for s in result.suggestions:
            console.print(f"  • {s}")
    if c is not None and c.time:
        console.print("[bright_black]assumptions: " + "; ".join(c.time.assumptions) + "[/]")
    for line in [*rep.hardware.notes, *rep.resolved.notes]:
        if "not set" not in line:
            console.print(f"[bright_black]note: {line}[/]")
    for p in rep.resolved.warnings:
        console.print(f"[yellow]warning: {p.render()}[/]")
