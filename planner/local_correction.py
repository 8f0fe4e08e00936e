"""Applying the local calibration (planner/local_calibration.py) to an estimate and to a plan, and saying so.

The correction multiplies what the closed form counts as allocated (every term but the CUDA context and paged
optimizer state, which the measured peak does not include; the allocator reserve, proportional to the peak, scales
with it) and divides every duration by the tokens/s factor. Only the closed form is corrected: the ratios were
measured against it (plan.toml's prediction), not against a traced (`--exact`) estimate.

The estimate and the plan apply it where they compute each method's per-device estimate and time
(planner/report.py, planner/choose.py), so the fit decisions, the choice and its time and cost all use the corrected
numbers; plan.toml records the factors, so that a later `peftplan calibrate` compares with the uncorrected prediction.
"""

from __future__ import annotations

from dataclasses import replace

from .local_calibration import Correction, Store
from .terms import Term

NOTE = "local calibration"


def scale_estimate(est, factor: float, note: str = NOTE):
    """A MemoryEstimate whose allocated terms (and the allocator reserve proportional to them) are × `factor`; the
    CUDA context and paged optimizer state stay as they are. Each scaled term's label says so."""

    def scaled(t: Term) -> Term:
        proportional = t.component not in ("overhead", "paged_optimizer") or (
            t.component == "overhead" and "fraction" in t.inputs)
        if not proportional:
            return t
        return replace(t, bytes=int(round(t.bytes * factor)), label=f"{t.label} [×{factor:.4g}: {note}]")

    if factor == 1:
        return est
    phases = {k: int(round(v * factor)) for k, v in getattr(est, "phases", {}).items()}
    return replace(est, terms=tuple(scaled(t) for t in est.terms), phases=phases)


def scale_time(tm, factor: float):
    """A TimeEstimate at `factor` × the predicted tokens/s: every duration ÷ factor."""
    if tm is None or factor == 1:
        return tm
    return replace(tm, seconds=tm.seconds / factor, low_seconds=tm.low_seconds / factor,
                   high_seconds=tm.high_seconds / factor, seconds_per_step=tm.seconds_per_step / factor)


def corrections_for(store: Store | None, device: str, methods) -> dict[str, Correction]:
    """The store's corrections for `device`, by method (none without a store)."""
    if store is None:
        return {}
    return {m: c for m in methods if (c := store.lookup(device, m)) is not None}


def corrected_memory(est, correction: Correction | None):
    """`est` × the correction's memory factor, where it has one."""
    return scale_estimate(est, correction.memory) if correction and correction.memory is not None else est


def corrected_time(tm, correction: Correction | None):
    """`tm` at the correction's tokens/s factor, where it has one."""
    f = correction.tokens_per_second if correction else None
    return scale_time(tm, f) if f is not None else tm


def summary(applied: list[Correction], store: Store) -> list[str]:
    """One line per correction applied, for the terminal."""
    return [f"local calibration: {c.describe()} ({store.path}; --no-local-calibration to leave it out)"
            for c in applied]


def as_json(applied: list[Correction], store: Store) -> dict:
    return {"file": str(store.path),
            "applied": [{"device": c.device, "device_name": c.device_name, "method": c.method, "memory": c.memory,
                         "memory_runs": c.memory_runs, "tokens_per_second": c.tokens_per_second,
                         "time_runs": c.time_runs, "runs": list(c.runs)} for c in applied]}
