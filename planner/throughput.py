"""Time: the runtime's work (planner.work) at a speed fitted on published runs, per GPU generation and method.

    lengths = Lengths.from_mean(300, 2048)                                   # or Lengths.from_counts(...)
    tm = estimate_time("lora", setup, device, "bf16", lengths=lengths, num_examples=19_000, epochs=2, packing=False)
    tm.seconds, tm.low_seconds, tm.high_seconds, tm.optimizer_steps, tm.assumptions

Seconds per optimizer step on one device, with A micro-steps of T token positions each (planner.tokens counts them
as the runtime computes them) and the work of planner.work:

    t_step  = A · t_micro + ((A − 1) · B_accumulate + B_optimizer) / (BW · k_bw)
    t_micro = F / (P · e_gen · e_method · m_moe)      compute: the micro-step's FLOPs (matmuls, attention forward and
                                                      backward, recomputation, adapters, DoRA's norm) at the device's
                                                      dense 16-bit peak P
            + (B_dequant + B_dora) / (BW · k_bw)      memory-bound work per pass: 4-bit de-quantization, DoRA's norm
            + c_host · layer passes                   host-side time per decoder layer and pass (Python, autograd and
                                                      kernel launches of transformers + peft): the same on any GPU

BW is the device's memory bandwidth. The fixed host time makes the efficiency saturate with the micro-batch:
F / t_micro = P · e · T / (T + T½) with T½ = c_host · passes · P · e / (F / T), so a faster GPU or a smaller model
needs more positions per micro-batch to reach the same share of its peak. The optimizer step is memory-bound bytes
(planner.work): what makes full fine-tuning slow at small batches.

Seven coefficients are fitted on half of the published runs of the Hugging Face stack (docs/published_throughput.toml)
by benchmarks/published_time.py, which writes them with the fit's provenance and the held-out error to
planner/data/throughput_fit.toml; this module only reads that file: e_method for full / LoRA / QLoRA (on Ampere,
the A100 rows), e_gen for Ada (the L40S rows), m_moe (Mixtral rows), c_host and k_bw. Hopper's e_gen is transferred
from same-stack H100 ÷ A100 ratios, Blackwell's from NVIDIA's published B200 ÷ H100 ratio; generations without
measurements are assumed (that file says which). DoRA uses LoRA's efficiency (its extra work is in planner.work),
QDoRA QLoRA's. Communication under DDP / FSDP / ZeRO is not here: the caller adds planner.parallel's
comm_seconds_per_step per optimizer step. The low-high range is the held-out runs' 10th-90th percentile of
predicted ÷ measured time, widened for generations without fitted runs.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from .catalog import Device
from .methods import METHODS
from .terms import Setup
from .tokens import Lengths, TokenCount, count_tokens
from .work import StepWork, step_work

FIT_FILE = Path(__file__).with_name("data") / "throughput_fit.toml"
ASSUMED_FLOPS_PER_BYTE = 150.0  # a device without a known bandwidth: an A100's ratio (312 TFLOPS / 2.04 TB/s)


@dataclass(frozen=True)
class Generation:
    name: str
    factor: float  # multiplies the efficiency fitted on Ampere (A100) runs
    how: str  # reference | fitted | transferred | assumed
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.how in ("reference", "fitted")


@dataclass(frozen=True)
class Coefficients:
    """The fitted time model (planner/data/throughput_fit.toml)."""

    efficiency: dict  # method class (full | lora | qlora) -> e_method on Ampere
    generations: dict  # name -> Generation
    moe: float  # efficiency multiplier for mixture-of-experts models
    host_seconds: float  # c_host: per decoder layer and pass
    bandwidth_efficiency: float  # k_bw
    range_log: tuple[float, float]  # 10th / 90th percentile of ln(measured / predicted time), held-out runs
    unmeasured_widening: float  # the range's width is multiplied by this for generations without fitted runs
    devices: dict  # device id -> generation name (overrides the compute capability's)
    by_capability: dict  # CUDA compute capability -> generation name
    provenance: dict = field(default_factory=dict)

    def generation_name(self, device: Device) -> str:
        if device.is_cpu:
            return "cpu"
        if device.id in self.devices:
            return self.devices[device.id]
        return self.by_capability.get(device.compute_capability or "", "unknown")

    def generation(self, device: Device) -> Generation:
        name = self.generation_name(device)
        return self.generations.get(name) or Generation(name, self.generations["ampere"].factor, "assumed",
                                                        "no generation known for this device: Ampere's")


def load_coefficients(path: Path = FIT_FILE) -> Coefficients:
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    gens = {name: Generation(name, float(g["factor"]), g["how"], g.get("note", ""))
            for name, g in raw["generation"].items()}
    c, r = raw["coefficients"], raw["range"]
    return Coefficients(efficiency={k: float(c[f"efficiency_{k}"]) for k in ("full", "lora", "qlora")},
                        generations=gens, moe=float(c["moe"]), host_seconds=float(c["host_seconds"]),
                        bandwidth_efficiency=float(c["bandwidth_efficiency"]),
                        range_log=(float(r["log_p10"]), float(r["log_p90"])),
                        unmeasured_widening=float(r["unmeasured_widening"]), devices=dict(raw.get("devices", {})),
                        by_capability=dict(raw["compute_capability"]), provenance=dict(raw.get("fit", {})))


@lru_cache(maxsize=1)
def coefficients() -> Coefficients:
    return load_coefficients()


def method_class(method: str) -> str:
    """Which fitted efficiency a method uses: full, lora (LoRA, DoRA) or qlora (QLoRA, QDoRA)."""
    m = METHODS[method]
    return "full" if not m.adapter else ("qlora" if m.quantized else "lora")


def device_flops(device: Device, precision: str, tflops: float | None = None) -> float:
    """Peak FLOP/s: the user's hardware.tflops, else the catalog's dense rate for the precision."""
    if tflops:
        return tflops * 1e12
    if device.is_cpu or precision == "fp32":
        return device.fp32_tflops * 1e12
    return (device.bf16_tflops if precision == "bf16" else device.fp16_tflops) * 1e12


def device_bandwidth(device: Device, peak: float) -> tuple[float, str | None]:
    """Memory bandwidth in B/s, and a note when it had to be assumed."""
    if device.memory_bandwidth_gbps > 0:
        return device.memory_bandwidth_gbps * 1e9, None
    bw = peak / ASSUMED_FLOPS_PER_BYTE
    return bw, f"memory bandwidth unknown: {bw / 1e9:,.0f} GB/s assumed ({ASSUMED_FLOPS_PER_BYTE:g} FLOPs per byte)"


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on one device, by term."""

    compute: float  # A micro-steps
    memory: float  # de-quantization and DoRA's norm, A micro-steps
    host: float  # A micro-steps
    optimizer: float  # the step and gradient accumulation
    efficiency: float  # e_gen · e_method (· m_moe): share of the peak while computing

    @property
    def micro(self) -> float:
        return self.compute + self.memory + self.host

    @property
    def seconds(self) -> float:
        return self.micro + self.optimizer


def step_time(work: StepWork, accumulation: int, peak: float, bandwidth: float, method: str, generation: Generation,
              moe: bool, c: Coefficients) -> StepTime:
    """The module docstring's t_step for one device."""
    eff = generation.factor * c.efficiency[method_class(method)] * (c.moe if moe else 1.0)
    a = accumulation
    bw = bandwidth * c.bandwidth_efficiency
    return StepTime(compute=a * work.flops / (peak * eff), memory=a * (work.dequant_bytes + work.dora_bytes) / bw,
                    host=a * work.layer_passes * c.host_seconds,
                    optimizer=((a - 1) * work.accumulate_bytes + work.optimizer_bytes) / bw, efficiency=eff)


@dataclass(frozen=True)
class TimeEstimate:
    tokens: int  # positions computed over the run, all devices (padding included)
    useful_tokens: int  # real tokens over the run
    optimizer_steps: int
    seconds: float  # training time, communication excluded (the caller adds it)
    low_seconds: float
    high_seconds: float
    seconds_per_step: float
    flops_per_token: float  # per computed position
    step_flops: float  # token-independent FLOPs per micro-step (DoRA's weight norm)
    peak_flops: float
    efficiency: float  # share of the peak while computing (e_gen · e_method)
    mfu: tuple[float, float]  # model FLOPs ÷ (peak × time), at the high and at the low time
    breakdown: dict  # seconds over the run by term
    count: TokenCount | None
    assumptions: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"tokens": int(self.tokens), "useful_tokens": int(self.useful_tokens),
                "optimizer_steps": int(self.optimizer_steps), "seconds": round(self.seconds, 1),
                "low_seconds": round(self.low_seconds, 1), "high_seconds": round(self.high_seconds, 1),
                "seconds_per_step": round(self.seconds_per_step, 3), "flops_per_token": self.flops_per_token,
                "peak_flops_per_device": self.peak_flops, "efficiency": round(self.efficiency, 3),
                "mfu_range": [round(x, 3) for x in self.mfu],
                "breakdown_seconds": {k: round(v, 1) for k, v in self.breakdown.items()},
                "assumptions": list(self.assumptions)}


@lru_cache(maxsize=64)
def lengths_for_mean(mean: float, seq_len: int) -> Lengths:
    """Lengths.from_mean, cached: the planner asks for the same distribution for every candidate."""
    return Lengths.from_mean(mean, seq_len)


@lru_cache(maxsize=64)
def full_rows(seq_len: int) -> Lengths:
    """No length known: every example is seq_len tokens (the spec's default for data.avg_tokens)."""
    why = f"data.avg_tokens not set: every example {seq_len} tokens (its row full)"
    return replace(Lengths.from_counts([seq_len], seq_len), source=why)


def estimate_time(method: str, s: Setup, device: Device, precision: str, *, num_examples: int, epochs: float,
                  packing: bool, lengths: Lengths | None = None, devices: int = 1, shards: int = 1,
                  tflops: float | None = None, trainable_bytes: int | None = None,
                  avg_tokens: int | None = None) -> TimeEstimate | None:
    """Training time of `num_examples` training examples × `epochs` on `devices` data-parallel devices.

    lengths: the per-example token counts (planner.tokens.Lengths); without it `avg_tokens` is taken as the mean of
    the assumed log-normal lengths, and without that every example fills its seq_len row. Micro-batch, accumulation,
    checkpointing and attention are s.geometry's. shards: devices the optimizer state is split over (FSDP, ZeRO: the
    device count). tflops: the user's peak (hardware.tflops), for uncatalogued devices and the CPU. trainable_bytes:
    bytes per trainable element when the engine upcasts (FSDP full fine-tuning: 4). None when the peak is unknown.
    """
    peak = device_flops(device, precision, tflops)
    if peak <= 0:
        return None
    g = s.geometry
    if lengths is None:  # data.avg_tokens as the mean of log-normal lengths; unknown: every example fills its row
        lengths = lengths_for_mean(float(avg_tokens), g.seq_len) if avg_tokens else full_rows(g.seq_len)
    count = count_tokens(lengths, num_examples=num_examples, seq_len=g.seq_len, micro_batch=g.micro_batch_size,
                         packing=packing, accumulation=g.gradient_accumulation_steps, devices=devices,
                         attention=g.attention)
    c = coefficients()
    gen = c.generation(device)
    bandwidth, bw_note = device_bandwidth(device, peak)
    t = count.tokens_per_micro_batch
    work = step_work(method, s, t, count.pairs_per_micro_batch, shards=shards, trainable_bytes=trainable_bytes)
    moe = s.shape.num_experts > 0
    st = step_time(work, g.gradient_accumulation_steps, peak, bandwidth, method, gen, moe, c)
    steps = count.steps(epochs)
    micro = epochs * count.micro_batches  # micro-steps each device runs (the last step of an epoch may hold fewer)
    per_micro = st.micro / g.gradient_accumulation_steps
    seconds = micro * per_micro + steps * st.optimizer
    lo, hi = c.range_log
    if not gen.measured:
        lo, hi = lo * c.unmeasured_widening, hi * c.unmeasured_widening
    low, high = seconds * math.exp(lo), seconds * math.exp(hi)
    a = g.gradient_accumulation_steps
    breakdown = {"compute": st.compute / a * micro, "memory-bound": st.memory / a * micro,
                 "host": st.host / a * micro, "optimizer": st.optimizer * steps}
    model_flops = work.flops * micro
    notes = _assumptions(method, s, device, precision, peak, bandwidth, bw_note, tflops, gen, c, count, work, st,
                         breakdown, seconds)
    return TimeEstimate(tokens=int(count.computed_tokens * epochs), useful_tokens=int(count.real_tokens * epochs),
                        optimizer_steps=steps, seconds=seconds, low_seconds=low, high_seconds=high,
                        seconds_per_step=seconds / steps, flops_per_token=work.flops / max(t, 1e-9),
                        step_flops=work.weight_flops, peak_flops=peak, efficiency=st.efficiency,
                        mfu=(model_flops / (peak * high), model_flops / (peak * low)), breakdown=breakdown, count=count,
                        assumptions=notes)


def _assumptions(method, s, device, precision, peak, bandwidth, bw_note, tflops, gen, c, count, work, st, breakdown,
                 seconds) -> tuple[str, ...]:
    t = count.tokens_per_micro_batch
    cls = method_class(method)
    where = "hardware.tflops" if tflops else f"the catalog's dense {precision} rate"
    notes = list(count.notes) + list(work.notes)
    notes.append(f"{device.id}: peak {peak / 1e12:g} TFLOPS ({where}), memory {bandwidth / 1e9:,.0f} GB/s")
    if bw_note:
        notes.append(bw_note)
    moe = f" × MoE {c.moe:.2f}" if s.shape.num_experts else ""
    half = work.layer_passes * c.host_seconds * peak * st.efficiency / (work.flops / max(t, 1e-9))
    notes.append(f"efficiency {st.efficiency:.0%} of peak while computing = {cls} {c.efficiency[cls]:.2f} (fitted on "
                 f"A100 runs) × {gen.name} {gen.factor:.2f} ({gen.how}{': ' + gen.note if gen.note else ''}){moe}")
    notes.append(f"host time {c.host_seconds * 1e3:.2f} ms per decoder layer and pass ({work.layer_passes} per "
                 f"micro-step): {st.efficiency * t / (t + half):.0%} of peak at {t:,.0f} positions per micro-batch "
                 f"(half of {st.efficiency:.0%} at {half:,.0f}); memory-bound work at {c.bandwidth_efficiency:.0%} "
                 "of the bandwidth")
    parts = ", ".join(f"{k} {v / max(seconds, 1e-9):.0%}" for k, v in breakdown.items() if v > 0.005 * seconds)
    notes.append(f"time by term: {parts}; range from the fit's held-out error "
                 f"({c.provenance.get('held_out_runs', '?')} published runs)"
                 + ("" if gen.measured else f", widened {c.unmeasured_widening:g}× ({gen.name}: no fitted runs)"))
    return tuple(notes)
