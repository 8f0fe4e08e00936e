"""`peftplan estimate`: resolve a spec, estimate every method, and present it (JSON or rich)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..schemas import Problem, Spec, SpecError
from . import assumptions as A
from . import caveats
from .local_correction import corrected_memory, corrections_for
from .memory import MemoryEstimate, estimate
from .methods import METHODS
from .paging import evictable_bytes, needed_bytes, usable_bytes
from .parallel import per_device
from .resolve import ResolvedHardware, ResolvedModel, resolve_hardware, resolve_model
from .setup import Resolved, build_setup, method_adapter
from .terms import COMPONENTS, Setup


@dataclass(frozen=True)
class EstimateReport:
    model: ResolvedModel
    hardware: ResolvedHardware
    resolved: Resolved
    estimates: dict[str, MemoryEstimate]  # per device, under parallelism[name]
    parallelism: dict[str, str] = field(default_factory=dict)
    requested_parallelism: str = "single"
    method_setups: dict[str, Setup] = field(default_factory=dict)
    corrections: dict = field(default_factory=dict)  # method -> the local calibration's Correction on this device

    @property
    def devices(self) -> int:
        return self.hardware.devices

    @property
    def memory_bytes(self) -> int:
        return self.hardware.device.memory_bytes

    @property
    def usable_bytes(self) -> int:
        """Device memory minus the planner's safety headroom."""
        return usable_bytes(self.memory_bytes)

    def needed_bytes(self, est: MemoryEstimate) -> int:
        """What must stay on the device: paged optimizer state may move to host memory (at a cost the plan
        counts, planner/paging.py); on the CPU there is no host to move it to."""
        return needed_bytes(est, self.hardware.device)

    def fits(self, est: MemoryEstimate) -> bool:
        return self.needed_bytes(est) <= self.usable_bytes

    def paged(self, est: MemoryEstimate) -> int:
        """Bytes of paged optimizer state that fit only by living in host memory (moved every step)."""
        return max(0, est.device_total_bytes - self.usable_bytes) if self.fits(est) else 0

    @property
    def nothing_fits(self) -> bool:
        """No method fits the device at this geometry: `peftplan estimate` exits 3, as `plan` does."""
        return not any(self.fits(e) for e in self.estimates.values())

    def setup_for(self, method: str) -> Setup:
        """The setup a method was estimated with (its recipe's adapter; planner/setup.py)."""
        return self.method_setups.get(method, self.resolved.setup)

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
            "nothing_fits": self.nothing_fits,
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
            "headroom_bytes": self.usable_bytes - self.needed_bytes(est),
            "evictable_bytes": evictable_bytes(est, self.hardware.device),
            "paged_to_host_bytes": self.paged(est),
            "trainable_parameters": est.trainable_parameters,
            "peak_phase": est.phase,
            "components": est.components(),
            "terms": [t.as_dict() for t in est.terms],
        }


def estimate_spec(spec: Spec, *, base_dir: Path | None = None, calibration=None) -> EstimateReport:
    """Resolve and estimate. Raises SpecError (exit 2) for problems in the user's input. `calibration`: the user's
    local calibration (planner/local_calibration.Store), applied to each method's per-device estimate."""
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
    setups = {name: replace(resolved.setup, adapter=method_adapter(spec, name, model.shape.parameters,
                                                                   resolved.setup.adapter)) for name in METHODS}
    singles = {name: estimate(name, s) for name, s in setups.items()}
    moe = [Problem("model.name", text, severity="warning")
           for text in caveats.moe(model.name, model.shape, setups["qlora"], singles)]
    resolved = replace(resolved, warnings=resolved.warnings + tuple(moe))
    devices = hardware.devices
    requested = spec.training.parallelism if devices > 1 else "single"
    corrections = corrections_for(calibration, hardware.device.id, METHODS)
    report = EstimateReport(model, hardware, resolved,
                            {name: corrected_memory(est, corrections.get(name)) for name, est in singles.items()},
                            {name: "single" for name in singles}, "single" if devices == 1 else requested, setups,
                            corrections)
    if devices == 1:
        return report
    # Several devices: per-device numbers under the spec's parallelism; with "auto", plain data
    # parallelism where it fits, FSDP (which accelerate runs on GPUs and, over gloo, on CPUs) where not.
    options = [requested] if requested != "auto" else ["ddp", "fsdp"]
    estimates, chosen = {}, {}
    for name, _single in singles.items():
        for par in options:
            est = corrected_memory(per_device(name, setups[name], par, devices), corrections.get(name))
            if report.fits(est) or par == options[-1]:
                estimates[name], chosen[name] = est, par
                break
    return replace(report, estimates=estimates, parallelism=chosen)


# --- rich rendering --------------------------------------------------------------------------------
COLORS = {
    "weights": "blue", "quant_constants": "cyan", "adapter": "magenta", "gradients": "yellow",
    "optimizer": "red", "paged_optimizer": "bright_red", "activations": "green", "logits": "bright_green",
    "transient": "white", "overhead": "bright_black",
}


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# One glyph per component, so that the bar reads without colour too (NO_COLOR, pipes, screen readers' text).
GLYPHS = {
    "weights": "█", "quant_constants": "▓", "adapter": "▒", "gradients": "░", "optimizer": "#",
    "paged_optimizer": "%", "activations": "=", "logits": "~", "transient": "+", "overhead": ":",
}
FREE, OVER = "·", "»"


def breakdown_bar(components: dict[str, int], device_bytes: int, width: int = 36):
    """The components drawn to the device's scale: the full width is the device's memory; what does not fit
    ends in » (the numbers beside the bar say how much)."""
    from rich.text import Text

    bar = Text()
    total = sum(components.values())
    over = total > device_bytes
    room = width - 1 if over else width
    used = running = 0
    for name in COMPONENTS:
        running += components.get(name, 0)
        cells = min(round(width * running / device_bytes) if device_bytes else 0, room) - used
        if cells > 0:
            bar.append(GLYPHS[name] * cells, style=COLORS[name])
            used += cells
    if over:
        bar.append(OVER, style="bold red")
    elif used < width:
        bar.append(FREE * (width - used), style="bright_black")
    return bar


def legend():
    from rich.text import Text

    text = Text("  ")
    for name in COMPONENTS:
        text.append(f"{GLYPHS[name]} ", style=COLORS[name]).append(name + "  ")
    text.append(f"{FREE} ", style="bright_black").append("free  ")
    text.append(f"{OVER} ", style="bold red").append("more than the device")
    return text


def render(report: EstimateReport, console, explain: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    dev, g = report.hardware.device, report.resolved.setup.geometry
    sh = report.model.shape
    from ..console import styled

    each = " each" if report.devices > 1 else ""
    console.print(styled(
        (report.model.name, "bold"),
        f" ({sh.model_type}, {_count(sh.parameters)} parameters, from {report.model.source})"
        " on ", (f"{f'{report.devices} × ' if report.devices > 1 else ''}{dev.name}", "bold"),
        f" ({_gib(dev.memory_bytes)} GiB{each}, usable {_gib(report.usable_bytes)} GiB "
        f"after {A.FIT_HEADROOM_FRACTION:.0%} headroom)"))
    console.print(
        f"batch {g.micro_batch_size} × {g.seq_len} tokens, "
        f"gradient checkpointing {'on' if g.gradient_checkpointing else 'off'},"
        f" {g.attention} attention, {report.resolved.precision}, optimizer {report.resolved.setup.optimizer}"
    )
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
        head = report.usable_bytes - report.needed_bytes(est)
        table.add_row(
            name, _gib(est.peak_allocated_bytes), _gib(est.device_total_bytes),
            (Text("✓ paged", style="yellow") if report.paged(est) else Text("✓", style="green")) if fits
            else Text("✗", style="red"),
            Text(_gib(head), style="green" if head >= 0 else "red"),
            _count(est.trainable_parameters),
            *([_parallelism_cell(report.parallelism.get(name, "single"), report.devices)] if several else []),
            breakdown_bar(est.components(), report.memory_bytes),
        )
    console.print(table)
    console.print(legend())
    if explain:
        for _name, est in report.estimates.items():
            render_terms(est, console)
    for line in [*report.hardware.notes, *report.resolved.notes]:
        console.print(styled((f"note: {line}", "bright_black")))
    for p in report.resolved.warnings:
        console.print(styled((warning_line(p.render()), "yellow")))
    paged = [name for name, est in report.estimates.items() if report.paged(est)]
    if paged:
        console.print(styled((f"warning: {', '.join(paged)} fit only by paging optimizer state to host memory every "
                              "step (slow; `peftplan plan` counts the time)", "yellow")))
    if report.nothing_fits:
        console.print(styled(("Nothing fits at this geometry: `peftplan plan` searches the other geometries and "
                              "says what would fit", "bold red")))


def warning_line(text: str) -> str:
    """One `warning: …` prefix, whether or not the message carries its own."""
    return text if text.startswith("warning:") else f"warning: {text}"


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
