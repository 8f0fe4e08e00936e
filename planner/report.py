"""`peftplan estimate`: resolve a spec, estimate every method, and present it (JSON or rich)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..schemas import Problem, Spec, SpecError
from . import assumptions as A
from .memory import MemoryEstimate, estimate_all
from .parallel import shard
from .resolve import ResolvedHardware, ResolvedModel, resolve_hardware, resolve_model
from .setup import Resolved, build_setup
from .terms import COMPONENTS


@dataclass(frozen=True)
class EstimateReport:
    model: ResolvedModel
    hardware: ResolvedHardware
    resolved: Resolved
    estimates: dict[str, MemoryEstimate]  # per device, under parallelism[name]
    parallelism: dict[str, str] = field(default_factory=dict)
    requested_parallelism: str = "single"

    @property
    def devices(self) -> int:
        return self.hardware.count * self.hardware.nodes

    @property
    def memory_bytes(self) -> int:
        return self.hardware.device.memory_bytes

    @property
    def usable_bytes(self) -> int:
        """Device memory minus the planner's safety headroom."""
        return int(self.memory_bytes * (1 - A.FIT_HEADROOM_FRACTION))

    def fits(self, est: MemoryEstimate) -> bool:
        """Paged optimizer state may spill to host memory, so it does not count against the device."""
        return est.device_total_bytes - est.evictable_bytes <= self.usable_bytes

    def to_json(self) -> dict:
        g = self.resolved.setup.geometry
        dev = self.hardware.device
        return {
            "model": {"name": self.model.name, "parameters": self.model.shape.parameters,
                      "source": self.model.source, "location": self.model.location,
                      "model_type": self.model.shape.model_type},
            "hardware": {"name": dev.id, "memory_bytes": dev.memory_bytes, "count": self.hardware.count,
                         "nodes": self.hardware.nodes, "usable_bytes": self.usable_bytes,
                         "headroom_fraction": A.FIT_HEADROOM_FRACTION},
            "geometry": {"micro_batch_size": g.micro_batch_size, "seq_len": g.seq_len,
                         "gradient_checkpointing": g.gradient_checkpointing,
                         "gradient_accumulation_steps": g.gradient_accumulation_steps,
                         "attention": g.attention, "padded": g.padded},
            "precision": self.resolved.precision,
            "optimizer": self.resolved.setup.optimizer,
            "parallelism": self.requested_parallelism,
            "methods": {name: self._method_json(name, est) for name, est in self.estimates.items()},
            "notes": list(self.hardware.notes) + list(self.resolved.notes),
            "warnings": [p.render() for p in self.resolved.warnings],
        }

    def _method_json(self, name: str, est: MemoryEstimate) -> dict:
        par = self.parallelism.get(name, "single")
        return {
            "parallelism": par,
            "devices": 1 if par == "single" else self.devices,
            "peak_allocated_bytes": est.peak_allocated_bytes,
            "device_total_bytes": est.device_total_bytes,
            "fits": self.fits(est),
            "headroom_bytes": self.usable_bytes - (est.device_total_bytes - est.evictable_bytes),
            "evictable_bytes": est.evictable_bytes,
            "trainable_parameters": est.trainable_parameters,
            "peak_phase": est.phase,
            "components": est.components(),
            "terms": [t.as_dict() for t in est.terms],
        }


def estimate_spec(spec: Spec, *, base_dir: Path | None = None) -> EstimateReport:
    """Resolve and estimate. Raises SpecError (exit 2) for problems in the user's input."""
    problems: list[Problem] = []
    model = hardware = None
    try:
        model = resolve_model(spec.model.name, base_dir=base_dir)
    except SpecError as exc:
        problems += exc.problems
    try:
        hardware = resolve_hardware(spec)
    except SpecError as exc:
        problems += exc.problems
    if problems:
        raise SpecError(problems)
    resolved = build_setup(spec, model, hardware.device)
    errors = [p for p in resolved.warnings if p.severity == "error"]
    if errors:
        raise SpecError(errors)
    singles = estimate_all(resolved.setup)
    devices = hardware.count * hardware.nodes
    requested = spec.training.parallelism if devices > 1 else "single"
    report = EstimateReport(model, hardware, resolved, singles, {name: "single" for name in singles},
                            "single" if devices == 1 else requested)
    if devices == 1:
        return report
    # Several devices: per-device numbers under the spec's parallelism; with "auto", plain data
    # parallelism where it fits, FSDP (which accelerate runs on GPUs and, over gloo, on CPUs) where not.
    options = [requested] if requested != "auto" else ["ddp", "fsdp"]
    estimates, chosen = {}, {}
    for name, single in singles.items():
        for par in options:
            est = shard(single, resolved.setup, par, devices, name in ("qlora", "qdora"))
            if report.fits(est) or par == options[-1]:
                estimates[name], chosen[name] = est, par
                break
    return replace(report, estimates=estimates, parallelism=chosen)


# --- rich rendering --------------------------------------------------------------------------------
COLORS = {
    "weights": "blue", "quant_constants": "cyan", "adapter": "magenta", "gradients": "yellow",
    "optimizer": "red", "paged_optimizer": "bright_red", "activations": "green", "logits": "bright_green", "transient": "white",
    "overhead": "bright_black",
}


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def breakdown_bar(components: dict[str, int], scale: int, width: int = 36):
    from rich.text import Text

    bar = Text()
    used = 0
    for name in COMPONENTS:
        n = components.get(name, 0)
        cells = round(width * n / scale) if scale else 0
        cells = min(cells, width - used)
        if cells > 0:
            bar.append("█" * cells, style=COLORS[name])
            used += cells
    if used < width:
        bar.append("·" * (width - used), style="bright_black")
    return bar


def render(report: EstimateReport, console, explain: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    dev, g = report.hardware.device, report.resolved.setup.geometry
    sh = report.model.shape
    console.print(
        f"[bold]{report.model.name}[/] ({sh.model_type}, {_count(sh.parameters)} parameters, from {report.model.source})"
        f" on [bold]{f'{report.devices} × ' if report.devices > 1 else ''}{dev.name}[/] ({_gib(dev.memory_bytes)} GiB"
        f"{' each' if report.devices > 1 else ''}, usable {_gib(report.usable_bytes)} GiB "
        f"after {A.FIT_HEADROOM_FRACTION:.0%} headroom)"
    )
    console.print(
        f"batch {g.micro_batch_size} × {g.seq_len} tokens, gradient checkpointing {'on' if g.gradient_checkpointing else 'off'},"
        f" {g.attention} attention, {report.resolved.precision}, optimizer {report.resolved.setup.optimizer}"
    )
    scale = max(report.memory_bytes, *(e.device_total_bytes for e in report.estimates.values()))
    table = Table(title="Peak memory per device (GiB)", title_justify="left")
    table.add_column("method", style="bold")
    table.add_column("peak alloc", justify="right")
    table.add_column("device total", justify="right")
    table.add_column("fits", justify="center")
    table.add_column("headroom", justify="right")
    table.add_column("trainable", justify="right")
    several = report.devices > 1
    if several:
        table.add_column("parallelism")
    table.add_column("breakdown (bar = device memory)")
    for name, est in report.estimates.items():
        fits = report.fits(est)
        head = report.usable_bytes - (est.device_total_bytes - est.evictable_bytes)
        table.add_row(
            name, _gib(est.peak_allocated_bytes), _gib(est.device_total_bytes),
            Text("✓", style="green") if fits else Text("✗", style="red"),
            Text(_gib(head), style="green" if head >= 0 else "red"),
            _count(est.trainable_parameters),
            *([_parallelism_cell(report.parallelism.get(name, "single"), report.devices)] if several else []),
            breakdown_bar(est.components(), scale),
        )
    console.print(table)
    legend = Text("  ")
    for name in COMPONENTS:
        legend.append("█ ", style=COLORS[name]).append(name + "  ")
    console.print(legend)
    if explain:
        for name, est in report.estimates.items():
            render_terms(est, console)
    for line in [*report.hardware.notes, *report.resolved.notes]:
        console.print(f"[bright_black]note: {line}[/]")
    for p in report.resolved.warnings:
        console.print(f"[yellow]warning: {p.render()}[/]")


def _parallelism_cell(parallelism: str, devices: int) -> str:
    return "one device" if parallelism == "single" else f"{parallelism} ×{devices}"


def render_terms(est: MemoryEstimate, console) -> None:
    from rich.table import Table

    t = Table(title=f"{est.method}: terms at the peak ({est.phase})", title_justify="left")
    for col in ("component", "term", "GiB", "formula"):
        t.add_column(col, justify="right" if col == "GiB" else "left")
    for term in est.terms:
        t.add_row(term.component, term.label, f"{term.bytes / 2**30:.3f}", term.formula)
    console.print(t)
