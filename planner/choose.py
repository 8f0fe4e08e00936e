"""`peftplan plan`: candidates, fit, choice with reasons, and what would fit when nothing does.

Candidates are method × micro-batch × gradient checkpointing × optimizer (32-bit, 8-bit, paged) at the
device's precision; keys the user set are fixed. Within a method the fastest fitting geometry wins
(ties: less memory). Across methods, `rules.preference` orders them and the numbers decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..schemas import Spec
from . import assumptions as A
from . import catalog, rules
from .hyper import Choice, accumulation_for, choose_hyperparameters, steps_per_epoch
from .memory import MemoryEstimate, estimate
from .methods import METHODS
from .report import EstimateReport, estimate_spec
from .terms import AdapterSettings, Setup, duration, gib
from .parallel import COMM_OVERLAP, PARALLELISMS, comm_seconds_per_step, shard, topology
from .throughput import TimeEstimate, estimate_time

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")  # 32-bit, 8-bit, paged
GOOD_TOKENS_PER_MICRO_BATCH = 4096  # below this a GPU is under-used; time scales by (T/4096)^0.25


class NothingFits(Exception):
    """A valid spec that no candidate satisfies (exit 3). The message says what would."""

    def __init__(self, message: str, plan: "PlanResult"):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Candidate:
    method: str
    setup: Setup
    estimate: MemoryEstimate
    fits: bool
    accumulation: int
    time: TimeEstimate | None
    cost_usd: float | None
    parallelism: str = "single"
    devices: int = 1  # devices this candidate uses

    @property
    def micro_batch(self) -> int:
        return self.setup.geometry.micro_batch_size

    @property
    def seconds(self) -> float:
        return self.time.seconds if self.time else float("inf")

    @property
    def needed_bytes(self) -> int:
        return self.estimate.device_total_bytes - self.estimate.evictable_bytes

    def describe(self) -> str:
        g = self.setup.geometry
        where = f", {self.parallelism} over {self.devices} devices" if self.devices > 1 else ""
        return (f"{self.method}: micro-batch {g.micro_batch_size} × {g.seq_len}, gradient checkpointing "
                f"{'on' if g.gradient_checkpointing else 'off'}, {self.setup.optimizer}{where}")


@dataclass
class PlanResult:
    report: EstimateReport
    best: dict[str, Candidate]  # each method's best candidate (fitting if any)
    chosen: Candidate | None
    hyperparameters: dict[str, Choice] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    steps_per_epoch: int | None = None


def _utilization_factor(tokens_per_micro_batch: int) -> float:
    return min(1.0, tokens_per_micro_batch / GOOD_TOKENS_PER_MICRO_BATCH) ** 0.25


def _candidates(spec: Spec, report: EstimateReport, method: str, hyper: dict[str, Choice]) -> list[Candidate]:
    base = report.resolved.setup
    dev = report.hardware.device
    devices = report.hardware.count * report.hardware.nodes
    t = spec.training
    adapter = AdapterSettings(
        rank=int(hyper["rank"].value) if "rank" in hyper else base.adapter.rank,
        alpha=float(hyper["alpha"].value) if "alpha" in hyper else base.adapter.alpha,
        dropout=float(hyper["dropout"].value) if "dropout" in hyper else base.adapter.dropout,
        target_modules=base.adapter.target_modules,
    )
    effective = int(hyper["effective_batch_size"].value)
    mbs = [t.micro_batch_size] if t.micro_batch_size else [m for m in MICRO_BATCHES if m <= max(effective, 1)]
    gcs = [t.gradient_checkpointing] if t.gradient_checkpointing is not None else [False, True]
    opts = [t.optimizer] if t.optimizer else list(OPTIMIZERS)
    if devices == 1:
        pars = ["single"]
    elif t.parallelism != "auto":
        pars = [t.parallelism]
    elif dev.is_cpu:  # gloo runs DDP and FSDP (runtime/cpu_fsdp.py); DeepSpeed needs an accelerator
        pars = ["single", "ddp", "fsdp"]
    else:
        pars = list(PARALLELISMS)
    topo = topology(dev, report.hardware.count, report.hardware.nodes, spec.hardware.network_gbps)
    epochs = float(hyper["epochs"].value)
    quantized = method in ("qlora", "qdora")
    out = []
    for mb in mbs:
        for gc in gcs:
            for opt in opts:
                for par in pars:
                    used = 1 if par == "single" else devices
                    if not t.micro_batch_size and mb > 1 and mb * used > effective:
                        continue  # the global batch would exceed the effective batch size
                    accumulation = t.gradient_accumulation_steps or accumulation_for(effective, mb, used)
                    geometry = replace(base.geometry, micro_batch_size=mb, gradient_checkpointing=gc,
                                       gradient_accumulation_steps=accumulation)
                    s = replace(base, geometry=geometry, optimizer=opt, adapter=adapter)
                    est = shard(estimate(method, s), s, par, used, quantized)
                    fits = est.device_total_bytes - est.evictable_bytes <= report.usable_bytes
                    tm = None
                    if spec.data.num_examples:
                        tm = estimate_time(method, s, dev, report.resolved.precision,
                                           num_examples=spec.data.num_examples, avg_tokens=spec.data.avg_tokens,
                                           epochs=epochs, packing=bool(spec.data.packing), micro_batch=mb, devices=used)
                        if tm is not None:
                            f = _utilization_factor(mb * geometry.seq_len)
                            steps = tm.tokens / (geometry.seq_len * mb * accumulation * used)
                            comm = steps * comm_seconds_per_step(estimate(method, s), s, par, topo, quantized) \
                                * (1 - COMM_OVERLAP)
                            notes = tm.assumptions
                            if comm:
                                notes += (f"{par}: ~{duration(comm)} of communication not hidden by compute over "
                                          f"{topo.ring_gbps:g} GB/s links ({COMM_OVERLAP:.0%} overlap assumed)",)
                            tm = replace(tm, seconds=tm.seconds / f + comm, low_seconds=tm.low_seconds / f + comm,
                                         high_seconds=tm.high_seconds / f + comm, assumptions=notes)
                    price = dev.price_usd_per_hour
                    cost = (tm.seconds / 3600 * price * used) if (tm and price is not None) else None
                    out.append(Candidate(method, s, est, fits, accumulation, tm, cost, par, used))
    return out


def _best(cands: list[Candidate], priority: str) -> Candidate:
    fitting = [c for c in cands if c.fits]
    if fitting and priority == "memory":
        return min(fitting, key=lambda c: (c.needed_bytes, c.seconds))
    if fitting:
        # fastest; then 32-bit before 8-bit before paged (exact optimizer state), then less memory
        order = {o: i for i, o in enumerate(OPTIMIZERS)}
        simpler = {p: i for i, p in enumerate(PARALLELISMS)}  # PyTorch-native before DeepSpeed, less sharding first
        return min(fitting, key=lambda c: (round(c.seconds, 3), order.get(c.setup.optimizer, 9), c.devices,
                                           simpler[c.parallelism], c.needed_bytes))
    return min(cands, key=lambda c: c.needed_bytes)


_gib, _hours = gib, duration


def plan_spec(spec: Spec, *, base_dir: Path | None = None) -> PlanResult:
    report = estimate_spec(spec, base_dir=base_dir)
    n_params = report.model.shape.parameters
    methods = list(METHODS)  # all five are shown; a method set in the spec is the only one chosen from
    hypers = {m: choose_hyperparameters(m, n_params, spec.data.num_examples, spec.method, spec.training,
                                        spec.objective.priority) for m in methods}
    all_cands = {m: _candidates(spec, report, m, hypers[m]) for m in methods}
    best = {m: _best(all_cands[m], spec.objective.priority) for m in methods}
    allowed = [spec.method.name] if spec.method.name != "auto" else methods
    result = PlanResult(report=report, best=best, chosen=None)
    o = spec.objective

    def over_limits(c: Candidate) -> str | None:
        if o.max_hours and c.time and c.time.seconds > o.max_hours * 3600:
            return f"takes ~{_hours(c.time.seconds)}, over objective.max_hours = {o.max_hours:g}"
        if o.budget_usd and c.cost_usd is not None and c.cost_usd > o.budget_usd:
            return f"costs ~${c.cost_usd:,.0f}, over objective.budget_usd = {o.budget_usd:g}"
        return None

    viable = {m: c for m, c in best.items() if m in allowed and c.fits and not over_limits(c)}
    for m, c in best.items():
        if m not in allowed:
            verdict = "fits" if c.fits else "does not fit"
            result.rejected.append({"method": m, "why": f"method.name = {spec.method.name!r} is set in the spec "
                                                        f"({m} {verdict} at {_gib(c.needed_bytes)})"})
        elif not c.fits:
            short = c.needed_bytes - report.usable_bytes
            result.rejected.append({"method": m, "why": (
                f"needs {_gib(c.needed_bytes)} per device at best ({c.describe()}): {_gib(short)} over the "
                f"{_gib(report.usable_bytes)} usable on {report.hardware.device.id}")})
        elif (why := over_limits(c)):
            result.rejected.append({"method": m, "why": why})

    if not viable:
        considered = {m: c for m, c in best.items() if m in allowed}
        result.suggestions = what_would_fit(spec, report, considered, base_dir)
        result.chosen = None
        limits = [r["why"] for r in result.rejected if "over objective" in r["why"]]
        head = ("no method fits the objective's limits: " + "; ".join(limits)) if limits and all(
            c.fits for c in considered.values()) else _nothing_fits_headline(report, considered, spec.method.name)
        raise NothingFits(head, result)

    chosen, reasons = _choose(spec, viable, best, report.usable_bytes)
    if chosen.devices > 1:
        reasons.append(_parallel_reason(chosen, all_cands))
    result.chosen = chosen
    result.hyperparameters = hypers[chosen.method]
    result.reasons = reasons
    for m, c in viable.items():
        if m != chosen.method:
            result.rejected.append({"method": m, "why": _why_not(c, chosen, spec)})
    result.rejected = [r for r in result.rejected if r["method"] != chosen.method]
    order = {m: i for i, m in enumerate(METHODS)}
    result.rejected.sort(key=lambda r: order[r["method"]])
    result.steps_per_epoch = steps_per_epoch(spec.data.num_examples, chosen.micro_batch, chosen.accumulation,
                                             chosen.devices)
    return result


def _choose(spec: Spec, viable: dict[str, Candidate], best: dict[str, Candidate],
            usable: int) -> tuple[Candidate, list[str]]:
    prio = spec.objective.priority
    if spec.method.name != "auto":
        c = viable[spec.method.name]
        return c, [f"method.name = {spec.method.name!r} is set in the spec, and it fits"]
    if prio == "memory":
        c = min(viable.values(), key=lambda c: c.needed_bytes)
        return c, [f"objective.priority = memory: {c.method} needs the least memory ({_gib(c.needed_bytes)})"]
    if prio in ("speed", "cost"):
        key = (lambda c: c.seconds) if prio == "speed" else (lambda c: c.cost_usd if c.cost_usd is not None else c.seconds)
        c = min(viable.values(), key=key)
        what = f"~{_hours(c.seconds)}" if prio == "speed" else (f"~${c.cost_usd:,.2f}" if c.cost_usd is not None else f"~{_hours(c.seconds)}")
        return c, [f"objective.priority = {prio}: {c.method} is the {'fastest' if prio == 'speed' else 'cheapest'} that fits ({what})"]
    situation = rules.Situation(priority=prio, num_examples=spec.data.num_examples)
    reasons: list[str] = []
    sibling = {"dora": "lora", "qdora": "qlora"}  # DoRA's cost is judged against LoRA on the same base
    for method, why in rules.preference(situation):
        c = viable.get(method)
        if c is None:
            if method in best and not best[method].fits:
                reasons.append(f"{method} was preferred here ({why}) but does not fit")
            continue
        if method == "full":
            spare = 1 - c.needed_bytes / usable
            if spare < rules.FULL_FT_MIN_HEADROOM:
                reasons.append(f"full fine-tuning fits but leaves only {spare:.0%} of the device free "
                               f"(wants ≥ {rules.FULL_FT_MIN_HEADROOM:.0%}): not plentiful")
                continue
        plain = viable.get(sibling.get(method, ""))
        if plain is not None and c.time and plain.time and c.seconds > rules.DORA_MAX_SLOWDOWN * plain.seconds:
            reasons.append(f"{method} would take {c.seconds / plain.seconds:.1f}x {plain.method}'s time "
                           f"(limit {rules.DORA_MAX_SLOWDOWN}x): not worth it here")
            continue
        reasons.insert(0, why)
        reasons.append(f"fits: {_gib(c.needed_bytes)} of {_gib(usable)} usable per device")
        return c, reasons
    c = min(viable.values(), key=lambda c: c.seconds)
    return c, reasons + [f"{c.method}: the fastest remaining option"]


def _parallel_reason(chosen: Candidate, all_cands: dict[str, list[Candidate]]) -> str:
    text = (f"{chosen.method} with {chosen.parallelism} over {chosen.devices} devices fits at "
            f"{_gib(chosen.needed_bytes)} per device")
    one = [c for cs in all_cands.values() for c in cs if c.fits and c.devices == 1]
    if one:
        alt = min(one, key=lambda c: c.seconds)
        if alt.time and chosen.time:
            text += f"; {alt.method} on one device would fit but take {alt.seconds / chosen.seconds:.1f}x longer"
    else:
        text += "; no method fits on a single device"
    return text


def _why_not(c: Candidate, chosen: Candidate, spec: Spec) -> str:
    parts = [f"fits at {_gib(c.needed_bytes)}"]
    if c.time and chosen.time:
        ratio = c.seconds / chosen.seconds
        parts.append(f"{ratio:.1f}x the time of {chosen.method}" if abs(ratio - 1) > 0.05 else "about the same time")
    if spec.method.name != "auto":
        parts.append("method.name is set in the spec")
    elif spec.objective.priority in ("memory", "speed", "cost"):
        parts.append(f"objective.priority = {spec.objective.priority}")
    else:
        parts.append(f"{chosen.method} ranks higher under the rules for this situation")
    return "; ".join(parts)


def _nothing_fits_headline(report: EstimateReport, best: dict[str, Candidate], forced: str) -> str:
    c = min(best.values(), key=lambda c: c.needed_bytes)
    short = c.needed_bytes - report.usable_bytes
    who = f"method.name = {forced!r} does not fit" if forced != "auto" else "nothing fits"
    return (f"{who} on {report.hardware.device.id} ({_gib(report.usable_bytes)} usable per device): "
            f"the smallest plan, {c.describe()}, needs {_gib(c.needed_bytes)} — {_gib(short)} short")


def what_would_fit(spec: Spec, report: EstimateReport, best: dict[str, Candidate], base_dir) -> list[str]:
    out: list[str] = []
    smallest = min(best.values(), key=lambda c: c.needed_bytes)
    # 1. a shorter sequence with the same method
    seq = smallest.setup.geometry.seq_len
    while seq > 128:
        seq //= 2
        s = replace(smallest.setup, geometry=replace(smallest.setup.geometry, seq_len=seq, micro_batch_size=1,
                                                     gradient_checkpointing=True))
        e = estimate(smallest.method, s)
        if e.device_total_bytes - e.evictable_bytes <= report.usable_bytes:
            out.append(f"data.seq_len = {seq} with {smallest.method} (micro-batch 1, gradient checkpointing) fits at "
                       f"{_gib(e.device_total_bytes - e.evictable_bytes)}")
            break
    # 2. QLoRA when another method was forced
    if spec.method.name not in ("auto", "qlora", "qdora"):
        q = replace(smallest.setup, geometry=replace(smallest.setup.geometry, micro_batch_size=1, gradient_checkpointing=True))
        e = estimate("qlora", q)
        verdict = "fits" if e.device_total_bytes - e.evictable_bytes <= report.usable_bytes else "would not fit either"
        out.append(f"method.name = \"qlora\" (4-bit base) needs {_gib(e.device_total_bytes - e.evictable_bytes)}: {verdict}")
    # 3. more devices of this kind, sharded with FSDP
    quantized = smallest.method in ("qlora", "qdora")
    single = estimate(smallest.method, smallest.setup)
    for n in (2, 4, 8, 16, 32, 64):
        if n <= report.hardware.count * report.hardware.nodes:
            continue
        e = shard(single, smallest.setup, "fsdp", n, quantized)
        if e.device_total_bytes - e.evictable_bytes <= report.usable_bytes:
            out.append(f"hardware.count = {n} (or nodes × count = {n}) {report.hardware.device.id} with FSDP: "
                       f"{smallest.method} needs {_gib(e.device_total_bytes - e.evictable_bytes)} per device")
            break
    # 4. the smallest catalog device on which the smallest plan fits
    need = smallest.needed_bytes
    for dev in sorted(catalog.devices(), key=lambda d: d.memory_bytes):
        if need <= dev.memory_bytes * (1 - A.FIT_HEADROOM_FRACTION):
            out.append(f"a larger device: {dev.id} ({dev.memory_bytes / 2**30:.0f} GiB) holds {smallest.describe()} "
                       f"({_gib(need)})")
            break
    else:
        largest = max(catalog.devices(), key=lambda d: d.memory_bytes)
        n = -(-need // int(largest.memory_bytes * (1 - A.FIT_HEADROOM_FRACTION)))
        out.append(f"no single catalog device holds {_gib(need)}; sharding across ≥ {n} × {largest.id} "
                   "(FSDP / DeepSpeed ZeRO-3) would be needed")
    return out
