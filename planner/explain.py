"""The plan's explanations of itself: why the parallelism, what paging costs, why each alternative lost, and
the warnings a fitting plan must still print (planner/caveats.py for the model-dependent ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..schemas import Spec
from . import caveats
from .hyper import Choice
from .report import EstimateReport
from .terms import duration, gib

if TYPE_CHECKING:
    from .choose import Candidate

NOMINAL_EXAMPLES = 1000  # data.num_examples unknown: geometries are still ranked by time for this many


def parallel_reason(chosen: Candidate, all_cands: dict[str, list[Candidate]]) -> str:
    text = (f"{chosen.method} with {chosen.parallelism} over {chosen.devices} devices fits at "
            f"{gib(chosen.needed_bytes)} per device")
    one = [c for cs in all_cands.values() for c in cs if c.fits and c.devices == 1]
    if one:
        alt = min(one, key=lambda c: c.seconds)
        if alt.seconds != float("inf") and chosen.seconds != float("inf"):
            text += f"; {alt.method} on one device would fit but take {alt.seconds / chosen.seconds:.1f}x longer"
    else:
        text += "; no method fits on a single device"
    return text


def paging_reason(c: Candidate, report: EstimateReport) -> str:
    p = c.paging
    total = f", ~{duration(p.total(c.time.tokens / (c.setup.geometry.seq_len * c.effective_batch))[1])} over the run" \
        if c.time else ""
    return (f"fits only by paging: {gib(c.estimate.device_total_bytes)} per device in all, {gib(p.bytes)} of the "
            f"{c.setup.optimizer} state over the {gib(report.usable_bytes)} usable lives in host memory and crosses "
            f"{p.link} twice every optimizer step (~{p.seconds_per_step[1]:.1f} s per step{total}, included in the "
            "time)")


def why_not(c: Candidate, chosen: Candidate, spec: Spec) -> str:
    parts = [f"fits at {gib(c.needed_bytes)}"]
    if c.seconds != float("inf") and chosen.seconds != float("inf"):
        ratio = c.seconds / chosen.seconds
        parts.append(f"{ratio:.1f}x the time of {chosen.method}" if abs(ratio - 1) > 0.05 else "about the same time")
    if c.geometry_text() != chosen.geometry_text():
        parts.append(f"at its own best geometry ({c.geometry_text()})")
    if spec.method.name != "auto":
        parts.append("method.name is set in the spec")
    elif spec.objective.priority in ("memory", "speed", "cost"):
        parts.append(f"objective.priority = {spec.objective.priority}")
    else:
        parts.append(f"{chosen.method} ranks higher under the rules for this situation")
    return "; ".join(parts)


def _spec_key(hyperparameter: str) -> str:
    if hyperparameter in ("rank", "alpha", "dropout", "target_modules"):
        return f"method.{hyperparameter}"
    return "data.eval_fraction" if hyperparameter == "eval_fraction" else f"training.{hyperparameter}"


def warnings_for(spec: Spec, report: EstimateReport, c: Candidate, hyper: dict[str, Choice]) -> list[str]:
    out = [f"{_spec_key(k)}: {v.warning}" for k, v in hyper.items() if v.warning]
    if not spec.data.num_examples:
        out.append("data.num_examples not set: no time, cost or steps per epoch. Geometries are still ranked by "
                   f"throughput (as for {NOMINAL_EXAMPLES:,} examples); the effective batch "
                   f"({hyper['effective_batch_size'].value}), epochs ({hyper['epochs'].value:g}) and held-out split "
                   f"({float(hyper['eval_fraction'].value):.0%}) are defaults — set it to size them")
    if c.paging is not None:
        out.append(f"the optimizer state is paged: {gib(c.paging.bytes)} of it does not fit on the device and moves to "
                   f"host memory and back every optimizer step ({c.paging.link}); the time includes it")
    rounding = caveats.bf16_rounding(c.method, report.resolved.precision, float(hyper["learning_rate"].value),
                                     c.setup.dtype)
    if rounding:
        out.append(rounding)
    return out
