"""`peftplan plan`: candidates, fit, choice with reasons.

Candidates are method × adapter variant × micro-batch × gradient checkpointing × optimizer (32-bit, 8-bit,
paged) × parallelism × packing × activation offloading at the device's precision; keys the user set are fixed.
Within a method the fastest fitting candidate wins (ties: exact optimizer state, fewer devices, simpler
parallelism, less memory; then rules.with_margin). Across methods, `rules.preference` orders them and the numbers
decide. One function per concern:

- `_adapter_variants`  the adapter settings a method is tried with (DoRA without its dropout; the fallback rank)
- `_geometries`        micro-batch × checkpointing × optimizer × parallelism × packing × offloading
- `_candidate`         one candidate: sharded memory, fit, paging, time and cost
- `_time`              the fitted time model (planner/throughput.py) plus what the plan adds: communication,
                       paging, activation offloading
- `_best`, `_bests`    a method's best candidate (and DoRA's without dropout)
- `_choose`            across methods: rules.preference, then the numbers

Nothing fits: planner/advice.py; caps missed: planner/time_advice.py. The plan's explanations and warnings:
planner/explain.py, planner/caveats.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from itertools import product
from pathlib import Path

from ..schemas import Spec
from . import rules
from .advice import nothing_fits_headline, what_would_fit
from .explain import paging_reason, parallel_reason, warnings_for, why_not
from .hyper import Choice, accumulation_for, choose_hyperparameters, steps_per_epoch
from .local_correction import corrected_memory
from .memory import MemoryEstimate, estimate
from .methods import METHODS
from .paging import PagingCost, needed_bytes, paging_cost
from .parallel import (
    PARALLELISMS,
    engine_setup,
    shard,
    topology,
)
from .report import EstimateReport, estimate_spec
from .run_time import run_time
from .terms import AdapterSettings, Setup, duration, gib
from .throughput import TimeEstimate, lengths_for_mean
from .time_advice import caps_headline, meet_the_caps
from .tokens import Lengths, packing_pays

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")  # 32-bit, 8-bit, paged


class NothingFits(Exception):
    """A valid spec that no candidate satisfies (exit 3). The message says what would."""

    def __init__(self, message: str, plan: PlanResult):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Candidate:
    method: str
    setup: Setup
    estimate: MemoryEstimate
    fits: bool
    accumulation: int
    time: TimeEstimate | None  # None when data.num_examples or the device's throughput is unknown
    cost_usd: float | None
    parallelism: str = "single"
    devices: int = 1  # devices this candidate uses
    needed_bytes: int = 0  # what must stay on each device (paged optimizer state may move to the host)
    paging: PagingCost | None = None  # paged state that does not fit: moved to the host and back every step
    rank_seconds: float = float("inf")  # the time the candidates are ranked by (nominal without num_examples)
    packing: bool = False  # examples packed into full seq_len rows (the runtime's pack()) instead of padded
    offload_seconds: float = 0.0  # activation offloading's transfer time not hidden by compute, over the run

    @property
    def micro_batch(self) -> int:
        return self.setup.geometry.micro_batch_size

    @property
    def seconds(self) -> float:
        return self.rank_seconds

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.devices

    def geometry_text(self) -> str:
        g = self.setup.geometry
        where = f", {self.parallelism} over {self.devices} devices" if self.devices > 1 else ""
        drop = f", dropout {self.setup.adapter.dropout:g}" if METHODS[self.method].adapter else ""
        pack = (", packed" if self.packing else "") + (", activations offloaded" if self.setup.offload else "")
        return (f"micro-batch {g.micro_batch_size} × {g.seq_len}{pack}, gradient checkpointing "
                f"{'on' if g.gradient_checkpointing else 'off'}, {self.setup.optimizer}{drop}{where}")

    def describe(self) -> str:
        return f"{self.method}: {self.geometry_text()}"


@dataclass
class PlanResult:
    report: EstimateReport
    best: dict[str, Candidate]  # each method's best candidate (fitting if any)
    chosen: Candidate | None
    hyperparameters: dict[str, Choice] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    suggestions_for: str = "memory"  # what the suggestions fix: "memory" (nothing fits) or "caps" (time, cost)
    steps_per_epoch: int | None = None
    warnings: list[str] = field(default_factory=list)  # what the plan must say although it fits
    given: frozenset[str] = frozenset()  # the geometry keys the spec set ("training.micro_batch_size", ...)
    lengths: Lengths | None = None  # the examples' token lengths the time model used (measured or assumed)


# --- candidates ------------------------------------------------------------------------------------
def _adapter_variants(report: EstimateReport, method: str, hyper: dict[str, Choice]) -> list[AdapterSettings]:
    """The adapter settings to try: the chosen ones; for DoRA with a dropout the user did not set, also none."""
    base = report.resolved.setup.adapter
    if not METHODS[method].adapter:
        return [base]
    chosen = AdapterSettings(rank=int(hyper["rank"].value), alpha=float(hyper["alpha"].value),
                             dropout=float(hyper["dropout"].value), target_modules=base.target_modules)
    variants = [chosen]
    if METHODS[method].dora and chosen.dropout > 0 and not hyper["dropout"].user_set:
        variants.append(replace(chosen, dropout=0.0))
    # tried only where the recipe's rank does not fit
    if not hyper["rank"].user_set and chosen.rank > rules.FALLBACK_RANK:
        low = rules.FALLBACK_RANK
        alpha = chosen.alpha if hyper["alpha"].user_set else chosen.alpha * low / chosen.rank  # the same α/r
        variants += [replace(v, rank=low, alpha=alpha) for v in variants]
    return variants


def _parallelisms(spec: Spec, report: EstimateReport) -> list[str]:
    if report.devices == 1:
        return ["single"]
    if spec.training.parallelism != "auto":
        return [spec.training.parallelism]
    if report.hardware.device.is_cpu:  # gloo runs DDP and FSDP (runtime/cpu_fsdp.py); DeepSpeed needs an accelerator
        return ["single", "ddp", "fsdp"]
    return list(PARALLELISMS)


def _packings(spec: Spec, lengths: Lengths | None) -> list[bool]:
    """Packing as the spec sets it; left out, both when the examples' lengths are known (the times decide)."""
    if spec.data.packing is not None:
        return [spec.data.packing]
    return [False, True] if lengths is not None else [False]


def _offloads(spec: Spec, report: EstimateReport, gc: bool) -> list[bool]:
    """Activation offloading as the spec sets it; left out, also tried on a GPU with gradient checkpointing (what
    it offloads are the checkpointed layer inputs); `_best` keeps it only where it pays."""
    if spec.training.activation_offloading is not None:
        return [spec.training.activation_offloading and not report.hardware.device.is_cpu]
    return [False, True] if gc and not report.hardware.device.is_cpu else [False]


def _checkpointing(spec: Spec, report: EstimateReport) -> list[bool]:
    t = spec.training
    if t.gradient_checkpointing is not None:
        return [t.gradient_checkpointing]
    if t.activation_offloading and not report.hardware.device.is_cpu:
        return [True]  # what offloading moves are the checkpointed layer inputs
    return [False, True]


def _geometries(spec: Spec, report: EstimateReport, effective: int, packings: list[bool]):
    """(micro-batch, checkpointing, optimizer, parallelism, devices used, packing, offloading); the global batch
    stays within the effective batch unless the user fixed the micro-batch. Packed rows under flash_attention_2 need
    one row per micro-batch: transformers 5 runs plain causal attention over each packed row otherwise (examples
    would attend to each other), so those geometries are not candidates."""
    t = spec.training
    flash = report.resolved.setup.geometry.attention == "flash_attention_2"
    mbs = [t.micro_batch_size] if t.micro_batch_size else [m for m in MICRO_BATCHES if m <= max(effective, 1)]
    exact = not (t.micro_batch_size or t.gradient_accumulation_steps)  # micro-batch × accumulation = the share
    opts = [t.optimizer] if t.optimizer else list(OPTIMIZERS)
    for mb, gc, opt, par, packing in product(mbs, _checkpointing(spec, report), opts, _parallelisms(spec, report),
                                             packings):
        used = 1 if par == "single" else report.devices
        over_batch = not t.micro_batch_size and mb > 1 and mb * used > effective
        # the effective batch exactly, where it is whole sequences per device: a micro-batch that divides the share
        uneven = exact and effective % used == 0 and (effective // used) % mb != 0
        if over_batch or uneven or (packing and flash and mb > 1):
            continue
        for offload in _offloads(spec, report, gc):
            yield mb, gc, opt, par, used, packing, offload


def _candidates(spec: Spec, report: EstimateReport, method: str, hyper: dict[str, Choice],
                lengths: Lengths | None) -> list[Candidate]:
    effective = int(hyper["effective_batch_size"].value)
    topo = topology(report.hardware.device, report.hardware.count, report.hardware.nodes, spec.hardware.network_gbps)
    return [_candidate(spec, report, method, hyper, adapter, geometry, topo, lengths)
            for adapter in _adapter_variants(report, method, hyper)
            for geometry in _geometries(spec, report, effective, _packings(spec, lengths))]


def _candidate(spec: Spec, report: EstimateReport, method: str, hyper: dict[str, Choice], adapter: AdapterSettings,
               geometry: tuple, topo, lengths: Lengths | None) -> Candidate:
    mb, gc, opt, par, used, packing, offload = geometry
    base = report.resolved.setup
    dev = report.hardware.device
    accumulation = spec.training.gradient_accumulation_steps or accumulation_for(
        int(hyper["effective_batch_size"].value), mb, used)
    # a mask comes with every batch but packed rows under flash-attention (padding, or the block-diagonal mask
    # transformers builds from the packed rows' position_ids under sdpa / eager)
    masked = not (packing and base.geometry.attention == "flash_attention_2")
    g = replace(base.geometry, micro_batch_size=mb, gradient_checkpointing=gc, gradient_accumulation_steps=accumulation,
                padded=masked)
    s = engine_setup(replace(base, geometry=g, optimizer=opt, adapter=adapter, offload=offload), method, par, used)
    single = estimate(method, s)
    est = corrected_memory(shard(single, s, par, used), report.corrections.get(method))
    need = needed_bytes(est, dev)
    fits = need <= report.usable_bytes
    paged = paging_cost(est, dev, report.usable_bytes) if fits else None
    tm, rank, moved = run_time(spec, report, method, s, single, par, used, paged, topo, float(hyper["epochs"].value),
                            float(hyper["eval_fraction"].value), packing, lengths)
    price = dev.price_usd_per_hour
    cost = tm.seconds / 3600 * price * used if (tm is not None and price is not None) else None
    return Candidate(method, s, est, fits, accumulation, tm, cost, par, used, need, paged, rank, packing, moved)


def _best(cands: list[Candidate], priority: str, usable: int | None = None) -> Candidate:
    fitting = _offload_where_it_pays([c for c in cands if c.fits])
    if fitting and priority == "memory":
        return min(fitting, key=lambda c: (c.needed_bytes, c.seconds))
    if fitting:
        # fastest (times within 1% are a tie: the model is not that exact); then 32-bit before 8-bit before paged
        # (exact optimizer state), fewer devices, simpler parallelism, less memory; then rules.with_margin
        order = {o: i for i, o in enumerate(OPTIMIZERS)}
        simpler = {p: i for i, p in enumerate(PARALLELISMS)}  # PyTorch-native before DeepSpeed, less sharding first
        quickest = min(c.seconds for c in fitting)
        close = [c for c in fitting if c.seconds <= quickest * 1.01]
        fastest = min(close, key=lambda c: (order.get(c.setup.optimizer, 9), c.devices, simpler[c.parallelism],
                                            c.needed_bytes, c.seconds))
        if usable is None:
            return fastest
        return rules.with_margin(fastest, fitting, usable)[0]
    return min(cands, key=lambda c: c.needed_bytes)


def _offload_where_it_pays(fitting: list[Candidate]) -> list[Candidate]:
    """Offloaded candidates stay only where offloading pays (rules.OFFLOAD_BATCH_GAIN): nothing fits without it,
    or it allows a micro-batch that many times larger than any without it, and is faster."""
    plain = [c for c in fitting if not c.setup.offload]
    if not plain:
        return fitting
    largest = max(c.micro_batch for c in plain)
    quickest = min(c.seconds for c in plain)
    return plain + [c for c in fitting if c.setup.offload and c.micro_batch >= rules.OFFLOAD_BATCH_GAIN * largest
                    and c.seconds < quickest]


def _bests(cands: dict[str, list[Candidate]], hypers: dict[str, dict[str, Choice]],
           priority: str, usable: int) -> tuple[dict[str, Candidate], dict[str, Candidate]]:
    """Each method's best candidate with its chosen adapter settings, and DoRA's best without dropout."""
    best, without = {}, {}
    for m, cs in cands.items():
        if METHODS[m].adapter and "rank" in hypers[m]:  # the recipe's rank where anything fits with it
            recipe = [c for c in cs if c.setup.adapter.rank == int(hypers[m]["rank"].value)]
            cs = recipe if any(c.fits for c in recipe) else cs
        if not METHODS[m].dora or "dropout" not in hypers[m]:
            best[m] = _best(cs, priority, usable)
            continue
        p = float(hypers[m]["dropout"].value)
        best[m] = _best([c for c in cs if c.setup.adapter.dropout == p], priority, usable)
        zero = [c for c in cs if c.setup.adapter.dropout == 0.0] if p > 0 else []
        if zero:
            without[m] = _best(zero, priority, usable)
            if not best[m].fits and without[m].fits:  # the dropout's weight copies do not fit: without it
                best[m] = without[m]
    return best, without


def _rank_choice(hyper: dict[str, Choice], c: Candidate) -> dict[str, Choice]:
    """The hyperparameters with the rank (and α) the chosen candidate really uses: the fallback rank when the
    recipe's does not fit (rules.FALLBACK_RANK)."""
    if "rank" not in hyper or int(hyper["rank"].value) == c.setup.adapter.rank:
        return hyper
    why = (f"{c.setup.adapter.rank}: the recipe's r={hyper['rank'].value} does not fit on this device; a lower rank "
           "needs less adapter, gradient and optimizer memory (LoRA's quality is close across ranks: "
           "Hu et al. 2021 §7.2)")
    out = {**hyper, "rank": Choice(c.setup.adapter.rank, why)}
    if not hyper["alpha"].user_set:
        out["alpha"] = Choice(c.setup.adapter.alpha, f"the recipe's α/r at r={c.setup.adapter.rank}")
    return out


def _dropout_choice(hyper: dict[str, Choice], c: Candidate, why: str) -> dict[str, Choice]:
    """The hyperparameters with the dropout the chosen candidate really uses."""
    if "dropout" not in hyper or float(hyper["dropout"].value) == c.setup.adapter.dropout:
        return hyper
    return {**hyper, "dropout": Choice(c.setup.adapter.dropout, why)}


# --- the plan --------------------------------------------------------------------------------------
def _lengths(spec: Spec, seq_len: int, histogram: dict | None) -> Lengths | None:
    """The examples' token lengths: measured (the data check's histogram), assumed around data.avg_tokens, or
    unknown (None: every example fills its row, and packing is not weighed)."""
    if histogram:
        counts = {int(k): int(v) for k, v in histogram.items() if int(v) > 0 and int(k) > 0}
        if counts:
            return Lengths.from_histogram(counts, seq_len)
    if spec.data.avg_tokens:
        return lengths_for_mean(float(spec.data.avg_tokens), seq_len)
    return None


def plan_spec(spec: Spec, *, base_dir: Path | None = None, lengths: dict | None = None,
              calibration=None) -> PlanResult:
    """Plan `spec`. `lengths`: the data's token-length histogram {tokens: examples} when the data was read;
    `calibration`: the user's local calibration (planner/local_calibration.Store), applied before any decision.

    Each method's candidates are estimated, each method's best kept; the allowed methods that fit within the caps are
    viable, one is chosen (planner/rules.py), and the rest are rejected with the reason."""
    report = estimate_spec(spec, base_dir=base_dir, calibration=calibration)
    measured = _lengths(spec, report.resolved.setup.geometry.seq_len, lengths)
    situation = rules.Situation(priority=spec.objective.priority, num_examples=spec.data.num_examples)
    hypers = {m: choose_hyperparameters(m, report.model.shape.parameters, spec.data.num_examples, spec.method,
                                        spec.training, devices=report.devices,
                                        spec_eval_fraction=spec.data.eval_fraction, scarce=situation.scarce,
                                        eval_path=spec.data.eval_path is not None)
              for m in METHODS}  # all five are shown; a method set in the spec is the only one chosen from
    all_cands = {m: _candidates(spec, report, m, hypers[m], measured) for m in METHODS}
    best, without_dropout = _bests(all_cands, hypers, spec.objective.priority, report.usable_bytes)
    for m, c in best.items():
        hypers[m] = _rank_choice(_dropout_choice(hypers[m], c, "0: with the DoRA authors' 0.05 it does not fit"), c)
    allowed = _allowed(spec, report)
    result = PlanResult(report=report, best=best, chosen=None, given=_given(spec), lengths=measured)
    within = partial(over_limits, spec.objective)
    viable = {m: c for m, c in best.items() if m in allowed and c.fits and not within(c)}
    result.rejected += _not_viable(spec, report, best, allowed, within)
    if not viable:
        _nothing_fits(spec, report, result, {m: c for m, c in best.items() if m in allowed}, measured,
                      float(hypers[allowed[0]]["epochs"].value))
    candidates = {m: c for m, c in without_dropout.items() if m in allowed and c.fits and not within(c)}
    chosen, reasons, dropout_why = _choose(spec, situation, viable, best, candidates, report.usable_bytes,
                                           _roomy_full(all_cands["full"], within, report.usable_bytes))
    best[chosen.method] = result.chosen = chosen
    hyper = _dropout_choice(hypers[chosen.method], chosen, dropout_why or "")
    hyper["effective_batch_size"] = _batch_choice(hyper["effective_batch_size"], chosen, spec)
    result.hyperparameters = hyper
    result.reasons = _reasons(spec, report, chosen, reasons, all_cands, measured)
    result.rejected = _rejected(spec, chosen, viable, result.rejected)
    result.steps_per_epoch = _steps_per_epoch(spec, chosen, float(hyper["eval_fraction"].value))
    result.warnings = warnings_for(spec, report, chosen, hyper) + _tight(report, chosen, all_cands[chosen.method])
    return result


def _roomy_full(cands: list[Candidate], within, usable: int) -> Candidate | None:
    """Full fine-tuning's fastest geometry that leaves rules.FULL_FT_MIN_HEADROOM of the device free."""
    roomy = [c for c in cands if c.fits and not within(c) and 1 - c.needed_bytes / usable >= rules.FULL_FT_MIN_HEADROOM]
    return min(roomy, key=lambda c: c.seconds) if roomy else None


def _steps_per_epoch(spec: Spec, chosen: Candidate, eval_fraction: float) -> int | None:
    """Optimizer steps per epoch: the time model's token count, else examples over the effective batch."""
    if chosen.time and chosen.time.count:
        return chosen.time.count.optimizer_steps
    return steps_per_epoch(spec.data.num_examples, chosen.micro_batch, chosen.accumulation, chosen.devices,
                           eval_fraction)


def over_limits(o, c: Candidate) -> str | None:
    """Why `c` misses the objective's caps (`o`: spec.objective), or None."""
    if o.max_hours and c.time and c.time.seconds > o.max_hours * 3600:
        return f"takes ~{duration(c.time.seconds)}, over objective.max_hours = {o.max_hours:g}"
    if o.budget_usd and c.cost_usd is not None and c.cost_usd > o.budget_usd:
        return f"costs ~${c.cost_usd:,.0f}, over objective.budget_usd = {o.budget_usd:g}"
    return None


def _allowed(spec: Spec, report: EstimateReport) -> list[str]:
    """The methods the plan may choose: the one the spec sets, or all; a 4-bit checkpoint's only trains as 4-bit."""
    allowed = [spec.method.name] if spec.method.name != "auto" else list(METHODS)
    if report.model.prequantized == "bnb-4bit":  # its 16-bit weights are not in the checkpoint
        allowed = [m for m in allowed if METHODS[m].quantized]
    return allowed


def _not_viable(spec: Spec, report: EstimateReport, best: dict[str, Candidate], allowed: list[str],
                within) -> list[dict]:
    """Why each method that cannot be chosen is out: not allowed, does not fit, or over the caps."""
    out = []
    for m, c in best.items():
        if m not in allowed:
            verdict = "fits" if c.fits else "does not fit"
            why = (f"{report.model.name} is a 4-bit (bitsandbytes) checkpoint: its 16-bit weights are not in it, so "
                   "only QLoRA/QDoRA train from it; use the 16-bit original for this method"
                   if report.model.prequantized == "bnb-4bit" and not METHODS[m].quantized
                   else f"method.name = {spec.method.name!r} is set in the spec")
            out.append({"method": m, "why": f"{why} ({m} {verdict} at {gib(c.needed_bytes)})"})
        elif not c.fits:
            short = c.needed_bytes - report.usable_bytes
            out.append({"method": m, "why": (
                f"needs {gib(c.needed_bytes)} per device at best ({c.describe()}): {gib(short)} over the "
                f"{gib(report.usable_bytes)} usable on {report.hardware.device.id}")})
        elif (why := within(c)):
            out.append({"method": m, "why": why})
    return out


def _nothing_fits(spec: Spec, report: EstimateReport, result: PlanResult, considered: dict[str, Candidate],
                  measured: Lengths | None, epochs: float) -> None:
    """Raise NothingFits with what would: advice on the caps when some method fits in memory, else on memory."""
    fitting = {m: c for m, c in considered.items() if c.fits}
    if fitting:  # memory is fine for these: their time or cost is over the objective's caps
        result.suggestions = meet_the_caps(spec, report, fitting, measured, epochs)
        result.suggestions_for = "caps"
        raise NothingFits(caps_headline(spec, fitting), result)
    result.suggestions = what_would_fit(spec, report, considered)
    raise NothingFits(nothing_fits_headline(report, considered, spec.method.name), result)


def _reasons(spec: Spec, report: EstimateReport, chosen: Candidate, reasons: list[str],
             all_cands: dict[str, list[Candidate]], measured: Lengths | None) -> list[str]:
    """Why the chosen plan: the method's reasons, then parallelism, paging, packing and offloading."""
    if report.model.prequantized == "bnb-4bit" and spec.method.name == "auto":
        reasons = [f"{report.model.name} is stored in 4-bit (bitsandbytes NF4): {chosen.method} trains it as it is",
                   *[r for r in reasons[1:] if "does not fit" not in r]]
    if chosen.devices > 1:
        reasons.append(parallel_reason(chosen, all_cands))
    if chosen.paging is not None:
        reasons.append(paging_reason(chosen, report))
    return reasons + _packing_reasons(spec, chosen, measured) + _offload_reasons(spec, chosen,
                                                                                 all_cands[chosen.method])


def _rejected(spec: Spec, chosen: Candidate, viable: dict[str, Candidate], rejected: list[dict]) -> list[dict]:
    """Every method but the chosen one, with why not, in the methods' order."""
    out = [*rejected, *({"method": m, "why": why_not(c, chosen, spec)} for m, c in viable.items()
                        if m != chosen.method)]
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted((r for r in out if r["method"] != chosen.method), key=lambda r: order[r["method"]])


def _tight(report: EstimateReport, chosen: Candidate, cands: list[Candidate]) -> list[str]:
    """A warning when the plan nearly fills the device and no roomier geometry is nearly as fast; judged against
    the pool _best chose from (the chosen adapter settings, offloading only where it pays)."""
    pool = _offload_where_it_pays([c for c in cands if c.fits and c.setup.adapter == chosen.setup.adapter])
    if rules.with_margin(chosen, pool, report.usable_bytes)[1] is not None:
        return []
    if chosen.needed_bytes <= rules.TIGHT_FRACTION * report.usable_bytes:
        return []
    return [f"the plan fills {chosen.needed_bytes / report.usable_bytes:.0%} of the usable memory and no roomier "
            "geometry is nearly as fast: a few percent of estimate error would run out of memory"]


def _offload_reasons(spec: Spec, c: Candidate, cands: list[Candidate]) -> list[str]:
    """Why activation offloading is on, when the planner turned it on: what it bought and what it costs."""
    if not c.setup.offload or spec.training.activation_offloading is not None:
        return []
    plain = [x for x in cands if x.fits and not x.setup.offload]
    gain = ("nothing fits without it" if not plain else
            f"micro-batch {c.micro_batch} instead of {max(x.micro_batch for x in plain)} at most without it, "
            f"{min(x.seconds for x in plain) / c.seconds:.2f}x faster overall")
    return [f"activation offloading on: {gain}; the checkpointed layer inputs live in host memory, "
            f"~{duration(c.offload_seconds)} of PCIe transfer not hidden by compute"]


def _packing_reasons(spec: Spec, c: Candidate, lengths: Lengths | None) -> list[str]:
    """Why packing is on or off, when the planner chose it."""
    if spec.data.packing is not None or lengths is None:
        return []
    pays, why = packing_pays(lengths, c.micro_batch)
    state = "on" if c.packing else "off"
    return [f"packing {state}: {why}" + ("" if pays == c.packing else "; the time model's totals decided")]


def _given(spec: Spec) -> frozenset[str]:
    t = spec.training
    keys = {"micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "gradient_checkpointing": t.gradient_checkpointing, "optimizer": t.optimizer}
    return frozenset(f"training.{k}" for k, v in keys.items() if v is not None)


def _choose(spec: Spec, situation: rules.Situation, viable: dict[str, Candidate], best: dict[str, Candidate],
            without_dropout: dict[str, Candidate], usable: int,
            roomy_full: Candidate | None = None) -> tuple[Candidate, list[str], str | None]:
    """(chosen candidate, reasons, why its dropout was turned off — or None): the method the spec sets, the one
    objective.priority favours, or the first of the rules' preference order that fits and is worth its time."""
    prio = spec.objective.priority
    if spec.method.name != "auto":
        c = viable[spec.method.name]
        return c, [f"method.name = {spec.method.name!r} is set in the spec, and it fits"], None
    if prio in ("memory", "speed", "cost"):
        return (*_by_priority(prio, viable), None)
    reasons: list[str] = []
    for method, why in rules.preference(situation):
        c = viable.get(method)
        if c is None:
            if method in best and not best[method].fits:
                reasons.append(f"{method} was preferred here ({why}) but does not fit")
            continue
        if not METHODS[method].adapter:  # full fine-tuning wants plentiful memory
            c = _plentiful(c, roomy_full, usable, reasons)
            if c is None:
                continue
        c, dropout_why = _worth_its_time(c, viable, without_dropout.get(method), prio, reasons)
        if c is None:
            continue
        reasons.insert(0, why)
        reasons.append(f"fits: {gib(c.needed_bytes)} of {gib(usable)} usable per device")
        return c, reasons, dropout_why
    c = min(viable.values(), key=lambda c: c.seconds)
    return c, reasons + [f"{c.method}: the fastest remaining option"], None


def _by_priority(prio: str, viable: dict[str, Candidate]) -> tuple[Candidate, list[str]]:
    """objective.priority = memory, speed or cost: the viable candidate that needs the least of it."""
    if prio == "memory":
        c = min(viable.values(), key=lambda c: c.needed_bytes)
        return c, [f"objective.priority = memory: {c.method} needs the least memory ({gib(c.needed_bytes)})"]
    if prio == "speed":
        c = min(viable.values(), key=lambda c: c.seconds)
        return c, [f"objective.priority = speed: {c.method} is the fastest that fits (~{duration(c.seconds)})"]
    c = min(viable.values(), key=lambda c: c.cost_usd if c.cost_usd is not None else c.seconds)
    what = f"~${c.cost_usd:,.2f}" if c.cost_usd is not None else f"~{duration(c.seconds)}"
    return c, [f"objective.priority = cost: {c.method} is the cheapest that fits ({what})"]


def _plentiful(c: Candidate, roomy_full: Candidate | None, usable: int, reasons: list[str]) -> Candidate | None:
    """Full fine-tuning only with plentiful memory (rules.FULL_FT_MIN_HEADROOM): its roomier geometry when the fastest
    fills the device, else None (not plentiful)."""
    spare = 1 - c.needed_bytes / usable
    if spare >= rules.FULL_FT_MIN_HEADROOM:
        return c
    if roomy_full is not None:
        reasons.append(f"full fine-tuning's fastest geometry leaves {spare:.0%} of the device free; a roomier "
                       f"one leaves {1 - roomy_full.needed_bytes / usable:.0%} "
                       f"({roomy_full.seconds / c.seconds:.2f}x its time)")
        return roomy_full
    reasons.append(f"full fine-tuning fits but leaves only {spare:.0%} of the device free "
                   f"(wants ≥ {rules.FULL_FT_MIN_HEADROOM:.0%}): not plentiful")
    return None


def _worth_its_time(c: Candidate, viable: dict[str, Candidate], alt: Candidate | None, prio: str,
                    reasons: list[str]) -> tuple[Candidate | None, str | None]:
    """DoRA against LoRA on the same base (Method.plain): kept when within rules.dora_max_slowdown of its time, else
    without dropout (`alt`) when that is, else None. Returns (the candidate, why its dropout was turned off)."""
    plain = viable.get(METHODS[c.method].plain or "")
    if plain is None or not _slower(c, plain, prio):
        return c, None
    p = c.setup.adapter.dropout
    slow = (f"{c.method}{f' with dropout {p:g}' if p else ''} would take {c.seconds / plain.seconds:.1f}x "
            f"{plain.method}'s time (limit {rules.dora_max_slowdown(prio):g}x)")
    if alt is None or _slower(alt, plain, prio):
        reasons.append((slow if alt is None or c is alt else
                        f"{slow}, {alt.seconds / plain.seconds:.1f}x without dropout") + ": not worth it here")
        return None, None
    ratio = alt.seconds / plain.seconds
    reasons.append(f"{slow}; {ratio:.1f}x without dropout: {c.method} kept, its dropout off")
    return alt, (f"0: {slow}, because peft then runs each adapted module's base matmul twice; without dropout "
                 f"{ratio:.1f}x. The held-out loss watches for overfitting instead")


def _slower(c: Candidate, plain: Candidate, priority: str) -> bool:
    return c.seconds != float("inf") and plain.seconds != float("inf") and \
        c.seconds > rules.dora_max_slowdown(priority) * plain.seconds


def _batch_choice(planned: Choice, c: Candidate, spec: Spec) -> Choice:
    """The effective batch the chosen geometry really has."""
    actual = c.effective_batch
    t = spec.training
    if t.micro_batch_size and t.gradient_accumulation_steps:
        return Choice(actual,
                      f"micro_batch_size × gradient_accumulation_steps × {c.devices} device(s), set in the spec",
                      True)
    if actual == planned.value:
        return planned
    return Choice(actual, f"{planned.why}; {actual} in practice: micro-batch {c.micro_batch} × accumulation "
                          f"{c.accumulation} × {c.devices} device(s)")
