"""A candidate's run time: the fitted time model (planner/throughput.py) on the examples that train, with the local
calibration, plus what the plan adds — communication between devices, paged optimizer state, activation offloading."""

from __future__ import annotations

from dataclasses import replace

from ..schemas import Spec
from .explain import NOMINAL_EXAMPLES
from .local_correction import corrected_time
from .memory import MemoryEstimate
from .paging import PagingCost, host_link_gbps
from .parallel import COMM_OVERLAP, ENGINES, comm_seconds_per_step, fsdp_upcast
from .report import EstimateReport
from .terms import Setup, duration, gib
from .throughput import TimeEstimate, estimate_time, full_rows
from .tokens import Lengths


def training_examples(num_examples: int, eval_fraction: float) -> int:
    """The examples that train: the held-out share (at least one when there is one) is not trained on."""
    held = max(1, round(num_examples * eval_fraction)) if eval_fraction > 0 else 0
    return max(1, num_examples - held)


def run_time(spec: Spec, report: EstimateReport, method: str, s: Setup, single: MemoryEstimate, par: str, used: int,
          paged: PagingCost | None, topo, epochs: float, eval_fraction: float, packing: bool,
          lengths: Lengths | None) -> tuple[TimeEstimate | None, float, float]:
    """(the time to show, or None without num_examples; the time to rank by; offloading's share of it): the fitted
    time model (planner/throughput.py) plus what the plan adds: communication, paging, activation offloading."""
    dev, d = report.hardware.device, spec.data
    n = training_examples(d.num_examples or NOMINAL_EXAMPLES, eval_fraction)
    sharded = par in ENGINES and ENGINES[par].shards_states  # each device steps the optimizer over its shard
    upcast = 4 if fsdp_upcast(s, method, par) != 1 else None  # FSDP2 keeps trainable 16-bit weights in fp32
    tm = estimate_time(method, s, dev, report.resolved.precision, num_examples=n, epochs=epochs, packing=packing,
                       lengths=lengths or full_rows(s.geometry.seq_len), devices=used,
                       shards=used if sharded else 1, tflops=spec.hardware.tflops, trainable_bytes=upcast)
    if tm is None:
        return None, float("inf"), 0.0
    tm = corrected_time(tm, report.corrections.get(method))
    steps = tm.optimizer_steps
    notes = list(tm.assumptions)
    extra = [0.0, 0.0, 0.0]  # best, middle, worst
    comm = steps * comm_seconds_per_step(single, s, par, topo) * (1 - COMM_OVERLAP)
    if comm:
        extra = [x + comm for x in extra]
        notes.append(f"{par}: ~{duration(comm)} of communication not hidden by compute over "
                     f"{topo.ring_gbps:g} GB/s links ({COMM_OVERLAP:.0%} overlap assumed)")
    if paged is not None:
        low, mid, high = paged.total(steps)
        extra = [extra[0] + low, extra[1] + mid, extra[2] + high]
        notes.append(f"paging: {gib(paged.bytes)} of optimizer state to host memory and back every optimizer step over "
                     f"{paged.link}, ~{duration(mid)} in all (range {duration(low)}–{duration(high)})")
    moved = 0.0
    if s.offload:
        moved, note = offload_seconds(s, dev, tm)
        extra = [x + moved for x in extra]
        notes.append(note)
    tm = replace(tm, seconds=tm.seconds + extra[1], low_seconds=tm.low_seconds + extra[0],
                 high_seconds=tm.high_seconds + extra[2], assumptions=tuple(notes))
    return (tm if d.num_examples else None), tm.seconds, moved


def offload_seconds(s: Setup, dev, tm: TimeEstimate) -> tuple[float, str]:
    """Activation offloading's time over the run: each micro-step copies every checkpointed layer input to the host
    and back (2·L·X bytes over PCIe, X = e·T·h); the copies run on a side stream while the layers compute, so only
    what exceeds the micro-step's own time shows (runtime/offload.py's docstring)."""
    sh, g = s.shape, s.geometry
    x = s.compute_bytes * g.tokens * sh.hidden_size
    gbps, link = host_link_gbps(dev)
    transfer = 2 * sh.num_layers * x / (gbps * 1e9)
    micro_steps = tm.optimizer_steps * g.gradient_accumulation_steps
    per_micro = tm.seconds / max(micro_steps, 1)
    extra = max(0.0, transfer - per_micro) * micro_steps
    return extra, (f"activation offloading: {sh.num_layers} × {x / 2**20:,.0f} MiB of layer inputs to host memory "
                   f"and back every micro-step over {link} ({gbps:g} GB/s), {transfer:.3f} s against "
                   f"{per_micro:.3f} s of "
                   f"compute: ~{duration(extra)} not hidden")
