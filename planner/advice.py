"""When nothing fits: the headline, and what would fit — a shorter sequence, a 4-bit base, more devices of
this kind, or a larger device the stack supports well (`rules.advisable`: NVIDIA; see planner/rules.py).

Each suggestion is re-estimated, never extrapolated. Why a mixture-of-experts base's 4-bit plan is nearly as
large as its 16-bit one is among the report's warnings (planner/caveats.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..schemas import Spec
from . import catalog, rules
from .methods import METHODS
from .paging import needed_bytes, usable_bytes
from .parallel import per_device
from .report import EstimateReport
from .terms import gib

if TYPE_CHECKING:
    from .choose import Candidate

SEQ_FLOOR = 128
DEVICE_COUNTS = (2, 4, 8, 16, 32, 64)


def nothing_fits_headline(report: EstimateReport, best: dict[str, Candidate], forced: str) -> str:
    c = min(best.values(), key=lambda c: c.needed_bytes)
    short = c.needed_bytes - report.usable_bytes
    who = f"method.name = {forced!r} does not fit" if forced != "auto" else "nothing fits"
    return (f"{who} on {report.hardware.device.id} ({gib(report.usable_bytes)} usable per device): "
            f"the smallest plan, {c.describe()}, needs {gib(c.needed_bytes)} — {gib(short)} short")


def what_would_fit(spec: Spec, report: EstimateReport, best: dict[str, Candidate]) -> list[str]:
    smallest = min(best.values(), key=lambda c: c.needed_bytes)
    out = [s for s in (_shorter_sequence(report, smallest), _four_bit_base(spec, report, smallest),
                       _more_devices(report, smallest)) if s]
    out.append(_larger_device(smallest))
    return out  # a mixture-of-experts base's caveat is among the report's warnings (planner/caveats.py)


def _fits(report: EstimateReport, est) -> tuple[bool, int]:
    need = needed_bytes(est, report.hardware.device)
    return need <= report.usable_bytes, need


def _shorter_sequence(report: EstimateReport, smallest: Candidate) -> str | None:
    seq = smallest.setup.geometry.seq_len
    while seq > SEQ_FLOOR:
        seq //= 2
        s = replace(smallest.setup, geometry=replace(smallest.setup.geometry, seq_len=seq, micro_batch_size=1,
                                                     gradient_checkpointing=True))
        ok, need = _fits(report, per_device(smallest.method, s, smallest.parallelism, smallest.devices))
        if ok:
            return (f"data.seq_len = {seq} with {smallest.method} (micro-batch 1, gradient checkpointing) fits at "
                    f"{gib(need)}")
    return None


def _four_bit_base(spec: Spec, report: EstimateReport, smallest: Candidate) -> str | None:
    if spec.method.name == "auto" or METHODS[spec.method.name].quantized:
        return None
    q = replace(smallest.setup, geometry=replace(smallest.setup.geometry, micro_batch_size=1,
                                                 gradient_checkpointing=True))
    ok, need = _fits(report, per_device("qlora", q, smallest.parallelism, smallest.devices))
    return f"method.name = \"qlora\" (4-bit base) needs {gib(need)}: {'fits' if ok else 'would not fit either'}"


def _more_devices(report: EstimateReport, smallest: Candidate) -> str | None:
    have = report.devices
    for n in DEVICE_COUNTS:
        if n <= have:
            continue
        ok, need = _fits(report, per_device(smallest.method, smallest.setup, "fsdp", n))
        if ok:
            return (f"hardware.count = {n} (or nodes × count = {n}) {report.hardware.device.id} with FSDP: "
                    f"{smallest.method} needs {gib(need)} per device")
    return None


def _larger_device(smallest: Candidate) -> str:
    need = smallest.estimate.device_total_bytes  # on another device: everything resident, nothing paged
    devices = [d for d in catalog.devices() if rules.advisable(d.vendor)]
    for dev in sorted(devices, key=lambda d: d.memory_bytes):
        if need <= usable_bytes(dev.memory_bytes):
            return (f"a larger device: {dev.id} ({dev.memory_bytes / 2**30:.0f} GiB) holds {smallest.describe()} "
                    f"({gib(need)} with nothing paged)")
    largest = max(devices, key=lambda d: d.memory_bytes)
    n = -(-need // usable_bytes(largest.memory_bytes))
    return (f"no single supported catalog device holds {gib(need)}; sharding across ≥ {n} × {largest.id} "
            "(FSDP / DeepSpeed ZeRO-3) would be needed")
