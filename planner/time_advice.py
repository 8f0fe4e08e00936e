"""When plans fit in memory but not in `objective.max_hours` / `objective.budget_usd`: what would meet the cap.

Memory is not the problem here, so the advice is about time and cost, each option re-estimated with the time model
(never extrapolated): packing (when the examples' lengths are known and it is off), fewer epochs, more devices of
this kind (data parallel: the replica already fits), and the catalog device with the lowest cost for this run that
holds the same geometry. The headline names the fastest plan and by how much it misses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..schemas import Spec
from . import catalog, rules
from .memory import estimate
from .paging import needed_bytes, usable_bytes
from .report import EstimateReport
from .terms import duration
from .throughput import estimate_time, full_rows

if TYPE_CHECKING:
    from .choose import Candidate
    from .tokens import Lengths

COUNTS = (2, 4, 8, 16, 32, 64)


def limit_seconds(spec: Spec, c: Candidate) -> float | None:
    """The time the objective allows this candidate: max_hours, or the budget at its price and devices."""
    o, price = spec.objective, c.cost_usd
    limits = []
    if o.max_hours:
        limits.append(o.max_hours * 3600)
    if o.budget_usd and price is not None and c.time and c.time.seconds > 0:
        limits.append(o.budget_usd / (price / c.time.seconds))
    return min(limits) if limits else None


def _best_bet(spec: Spec, considered: dict[str, Candidate]) -> Candidate:
    """The plan closest to the caps: the cheapest under a budget alone, else the fastest."""
    if spec.objective.budget_usd and not spec.objective.max_hours and \
            all(c.cost_usd is not None for c in considered.values()):
        return min(considered.values(), key=lambda c: c.cost_usd)
    return min(considered.values(), key=lambda c: c.seconds)


def caps_headline(spec: Spec, considered: dict[str, Candidate]) -> str:
    c = _best_bet(spec, considered)
    parts = []
    o = spec.objective
    if o.max_hours:
        parts.append(f"objective.max_hours = {o.max_hours:g}")
    if o.budget_usd:
        parts.append(f"objective.budget_usd = {o.budget_usd:g}")
    cost = f", ~${c.cost_usd:,.0f}" if c.cost_usd is not None else ""
    which = "the cheapest" if c is not min(considered.values(), key=lambda x: x.seconds) else "the fastest"
    fit = (f"{', '.join(considered)} fit in memory, but none meets" if len(considered) > 1 else
           f"{c.method} fits in memory, but does not meet")
    return (f"{fit} {' and '.join(parts)}: {which}, {c.describe()}, "
            f"takes ~{duration(c.seconds)}{cost}")


def _time(c: Candidate, report: EstimateReport, spec: Spec, lengths, *, epochs: float, device=None,
          devices: int | None = None, packing: bool | None = None):
    """The candidate's time model re-estimated with one thing changed (the bare model: no communication, paging or
    offloading, which `c.time` includes; compare like with like)."""
    return estimate_time(c.method, c.setup, device or report.hardware.device, report.resolved.precision,
                         num_examples=c.time.count.num_examples, epochs=epochs,
                         packing=c.packing if packing is None else packing,
                         lengths=lengths or full_rows(c.setup.geometry.seq_len), devices=devices or c.devices,
                         tflops=spec.hardware.tflops if device is None else None)


def meet_the_caps(spec: Spec, report: EstimateReport, considered: dict[str, Candidate],
                  lengths: Lengths | None, epochs: float) -> list[str]:
    """Ways to meet the objective's caps, each re-estimated; an empty list when the time is unknown."""
    c = _best_bet(spec, considered)
    if c.time is None or c.time.count is None:
        return []
    limit = limit_seconds(spec, c)
    if limit is None:
        return []
    out = []
    price = report.hardware.device.price_usd_per_hour
    if not c.packing and spec.data.packing is not True and lengths is not None:
        packed = _time(c, report, spec, lengths, packing=True, epochs=epochs)
        padded = _time(c, report, spec, lengths, packing=False, epochs=epochs)
        if packed is not None and padded is not None and packed.seconds < padded.seconds * 0.95:
            total = c.time.seconds - (padded.seconds - packed.seconds)  # what packing saves, on the whole plan
            verdict = "meets the cap" if total <= limit else "not enough alone"
            out.append(f"data.packing = true: ~{duration(total)} ({verdict})")
    fewer = epochs * limit / c.seconds
    if fewer >= 0.1:
        out.append(f"training.epochs = {max(0.1, int(fewer * 10) / 10):g} instead of {epochs:g}: within the cap "
                   f"(~{duration(c.seconds * max(0.1, int(fewer * 10) / 10) / epochs)})")
    if spec.objective.max_hours:
        for n in COUNTS:
            if n <= c.devices:
                continue
            more = _time(c, report, spec, lengths, devices=n, epochs=epochs)
            if more is not None and more.seconds <= limit:
                cost = f", ~${more.seconds / 3600 * price * n:,.0f}" if price is not None else ""
                out.append(f"hardware.count = {n} {report.hardware.device.id} (data parallel: the same plan on each): "
                           f"~{duration(more.seconds)}{cost}, before communication")
                break
    best = _cheapest_device(spec, report, c, lengths, epochs)
    if best:
        out.append(best)
    return out


def _cheapest_device(spec: Spec, report: EstimateReport, c: Candidate, lengths, epochs: float) -> str | None:
    """The catalog device (one, advisable) that holds this geometry and finishes it within the caps at the lowest
    cost."""
    o = spec.objective
    options = []
    est = estimate(c.method, replace(c.setup, device_kind="cuda"))  # the same on every device
    for dev in catalog.devices():
        if dev.id == report.hardware.device.id or dev.price_usd_per_hour is None or not rules.advisable(dev.vendor):
            continue
        if needed_bytes(est, dev) > usable_bytes(dev.memory_bytes):
            continue
        t = _time(c, report, spec, lengths, device=dev, devices=1, epochs=epochs)
        if t is None:
            continue
        cost = t.seconds / 3600 * dev.price_usd_per_hour
        if (o.max_hours and t.seconds > o.max_hours * 3600) or (o.budget_usd and cost > o.budget_usd):
            continue
        options.append((cost, t.seconds, dev))
    if not options:
        return None
    cost, seconds, dev = min(options, key=lambda x: (x[0], x[1]))
    return (f"a device with a lower cost for this run: {dev.id} at ${dev.price_usd_per_hour:.2f}/h ({dev.price_date}): "
            f"~{duration(seconds)}, ~${cost:,.0f} (same geometry, {c.method})")

