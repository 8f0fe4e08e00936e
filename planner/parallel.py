"""Per-device memory and communication time under data parallelism, FSDP and DeepSpeed ZeRO-2/3.

Starts from the single-device estimate (the same runtime, the same activations: every device runs its
own micro-batch), re-shards the static terms over N = devices per node × nodes and re-evaluates each
moment of the step (loss, inside a layer's backward, optimizer step) with the buffers the engine adds
there, keeping the largest:

| parallelism      | weights   | trainable + grads          | optimizer state           | extra buffers |
|------------------|-----------|----------------------------|---------------------------|---------------|
| ddp              | W         | full; + gradient buckets   | full                      | (1)           |
| fsdp (FSDP2)     | W/N       | /N                         | /N                        | (2)           |
| deepspeed-zero2  | W         | weights full, grads /N     | fp32 master + states, /N  | (3)           |
| deepspeed-zero3  | W/N       | /N                         | fp32 master + states, /N  | (4)           |

(1) DDP buckets = gradients (gradient_as_bucket_view off). (2) At the loss: the lm_head unit; in backward: 2 layers
(current + prefetched), + one layer's unsharded grads (full FT). (3) Reduce bucket (h² elements). (4) Prefetch
bucket (0.9·h²) + one layer gathered.

FSDP follows accelerate 1.15's fsdp2_prepare_model, measured on two CPU ranks
(benchmarks/calibrate_parallel.py): one unit per decoder layer (resharded after forward); the input
embeddings their own unit when untied (freed after use); a tail unit of final norm + lm_head (+ the
embeddings when tied) kept from the lm_head's forward through its backward; the root holding the rest.
Under bf16/fp16 mixed precision accelerate upcasts trainable 16-bit parameters to fp32 before sharding
(full fine-tuning: fp32 weights, gradients and AdamW state, 16 bytes/param / N) and FSDP's policy runs the
fp32 adapters in the compute dtype, which changes what they save (Setup.adapters_in_compute_dtype).
FSDP and ZeRO-3 shard the frozen base too (for QLoRA, the 4-bit weights are stored in the compute dtype —
bnb_4bit_quant_storage — so they can be sharded; the bytes are unchanged). DeepSpeed keeps an fp32
master copy of every trainable parameter in its optimizer (Rajbhandari et al. 2020: 16 bytes/param of
model states for mixed-precision Adam = 2 weights + 2 grads + 12 optimizer); its terms are not measured
here (DeepSpeed needs an accelerator).
Communication per optimizer step (ring collectives, Thakur et al. 2005): all-reduce 2(N−1)/N·bytes,
all-gather and reduce-scatter (N−1)/N·bytes each, over the slowest link on the ring.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import assumptions as A
from .memory import NOT_ALLOCATED, MemoryEstimate, estimate, overhead_terms
from .methods import METHODS
from .rules import COMM_OVERLAP  # noqa: F401  (a judgement, planner/rules.py; the time model reads it here)
from .terms import Setup, Term

STATIC = ("weights", "quant_constants", "adapter", "optimizer", "paged_optimizer")

PARALLELISMS = ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
DEFAULT_NETWORK_GBPS = 12.5  # between nodes, per node: 100 Gb/s Ethernet, a common cloud default


@dataclass(frozen=True)
class Topology:
    count: int
    nodes: int
    intra_gbps: float  # per-device link inside a node (unidirectional GB/s)
    inter_gbps: float  # per-node network between nodes (GB/s)

    @property
    def devices(self) -> int:
        return self.count * self.nodes

    @property
    def ring_gbps(self) -> float:
        """Bandwidth of the slowest link of a ring over all devices (GB/s)."""
        if self.nodes > 1:
            return min(self.intra_gbps, self.inter_gbps) if self.intra_gbps else self.inter_gbps
        return self.intra_gbps


def layer_weight_bytes(s: Setup, quantized: bool) -> int:
    per = s.shape.linear_params_per_layer
    return per // 2 if quantized else per * s.compute_bytes


def tail_weight_bytes(s: Setup) -> int:
    """accelerate's FSDP2 tail unit, the lm_head and final norm (with the embeddings when tied), in the compute
    dtype (never quantized): gathered from the lm_head's forward until its backward has run."""
    sh = s.shape
    params = sh.vocab_size * sh.hidden_size + sh.hidden_size * (2 if sh.norm == "layernorm" else 1)
    return (params + (sh.vocab_size if sh.lm_head_bias else 0)) * s.compute_bytes


def root_leftover_bytes(s: Setup) -> int:
    """What stays in the FSDP2 root unit (learned position embeddings), gathered for the whole step."""
    return s.shape.learned_positions * s.shape.hidden_size * s.compute_bytes


BACKWARD_PHASES = ("layer", "recompute")


@dataclass(frozen=True)
class Engine:
    """What an engine splits over the devices (the table above)."""
    shards_weights: bool  # weights, quantization constants and adapters /N (FSDP, ZeRO-3)
    shards_states: bool  # gradients and optimizer state /N (all but DDP)
    fp32_master: bool  # DeepSpeed's optimizer keeps an fp32 copy of every trainable parameter


ENGINES = {
    "ddp": Engine(shards_weights=False, shards_states=False, fp32_master=False),
    "fsdp": Engine(shards_weights=True, shards_states=True, fp32_master=False),
    "deepspeed-zero2": Engine(shards_weights=False, shards_states=True, fp32_master=True),
    "deepspeed-zero3": Engine(shards_weights=True, shards_states=True, fp32_master=True),
}


@dataclass(frozen=True)
class Buffers:
    """What an engine adds to the moments of a step."""
    always: tuple[Term, ...] = ()  # every moment of forward and backward
    at_loss: tuple[Term, ...] = ()  # the loss and the lm_head's backward
    in_backward: tuple[Term, ...] = ()  # inside the decoder layers' backward


def engine_setup(s: Setup, method: str, parallelism: str, devices: int) -> Setup:
    """The setup as the engine runs it: FSDP2's mixed-precision policy runs the fp32 adapters in the compute
    dtype, which changes what they save."""
    fsdp_mixed = parallelism == "fsdp" and devices > 1 and s.dtype != "float32"
    if fsdp_mixed and METHODS[method].adapter and not s.adapters_in_compute_dtype:
        return replace(s, adapters_in_compute_dtype=True)
    return s


def per_device(method: str, s: Setup, parallelism: str, devices: int) -> MemoryEstimate:
    """The estimate on each device in one pass: the setup as the engine runs it, the method's terms at each moment
    of the step (planner/memory.py), then those moments sharded with the engine's buffers (`shard`)."""
    s = engine_setup(s, method, parallelism, devices)
    return shard(estimate(method, s), s, parallelism, devices)


def fsdp_upcast(s: Setup, method: str, parallelism: str) -> float:
    """accelerate's fsdp2_prepare_model upcasts trainable 16-bit parameters to fp32 under mixed precision (fp32
    sharded weights, gradients and optimizer state); adapters are fp32 already, 4-bit bases frozen."""
    if parallelism == "fsdp" and s.dtype != "float32" and not METHODS[method].adapter and A.FSDP_UPCASTS_TRAINABLE:
        return 4 / METHODS["full"].weight_bytes(s)
    return 1


def _resharded(t: Term, engine: Engine, n: int, upcast: float, param_state: bool) -> Term:
    c = t.component
    shards = (engine.shards_weights and c in ("weights", "quant_constants", "adapter")) \
        or (engine.shards_states and c in ("optimizer", "paged_optimizer", "gradients"))
    up = upcast != 1 and (c in ("weights", "gradients") or (c == "optimizer" and param_state))
    if not shards and not up:
        return t
    notes = (["fp32 under FSDP mixed precision"] if up else []) + ([f"sharded /{n}"] if shards else [])
    formula = t.formula + (f" × {upcast:g}" if up else "") + (f" / {n}" if shards else "")
    # NF4 MoE experts are buffers of their module (runtime/moe.py): FSDP2 and ZeRO-3 shard parameters only
    whole = 0
    if shards:
        whole = t.inputs.get("P_experts", 0) // 2 if c == "weights" else \
            t.inputs.get("experts", 0) if c == "quant_constants" else 0
    if whole:
        notes.append("NF4 experts whole on every device")
        formula += " (experts unsharded)"
    sharded = (t.bytes - whole) * (upcast if up else 1) / (n if shards else 1) + whole
    return Term(c, f"{t.label} ({', '.join(notes)})", int(sharded), formula, t.inputs)


def _buffers(single: MemoryEstimate, s: Setup, parallelism: str) -> Buffers:
    h = s.shape.hidden_size
    quantized = METHODS[single.method].quantized
    if parallelism == "ddp":
        grads = sum(t.bytes for t in single.terms if t.component == trained_component(single.method))
        return Buffers(always=(Term("transient", "DDP gradient buckets", grads,
                                    "= gradient bytes (gradient_as_bucket_view off)", {"bytes": grads}),))
    if parallelism == "deepspeed-zero2":
        return Buffers(always=(Term("transient", "ZeRO-2 reduce bucket (h² elements, 16-bit)", h * h * 2, "h² × 2",
                                    {"h": h}),))
    layer = layer_weight_bytes(s, quantized)
    if parallelism == "deepspeed-zero3":
        prefetch = int(0.9 * h * h) * 2
        return Buffers(always=(Term("transient", "ZeRO-3 gathered layer + prefetch bucket", layer + prefetch,
                                    "one layer + 0.9·h² × 2", {"layer_bytes": layer, "h": h}),))
    return _fsdp_buffers(s, layer, full_ft=not METHODS[single.method].adapter)


def _fsdp_buffers(s: Setup, layer: int, full_ft: bool) -> Buffers:
    tail, rest = tail_weight_bytes(s), root_leftover_bytes(s)
    always = (Term("transient", "FSDP root unit gathered (position embeddings)", rest,
                   "positions × h × compute bytes", {"bytes": rest}),) if rest else ()
    # The chunked loss runs inside the lm_head's own call (runtime/loss.py), where FSDP2 has gathered it; with an
    # untied head the two-rank calibration measures the tail's bytes twice at that moment (the all-gather's output
    # and the unsharded parameter view it fills); a tied head is the root unit's embedding, gathered once.
    copies = 2 if s.loss == "chunked" and not s.shape.tie_embeddings else 1
    at_loss = (Term("transient", "FSDP tail unit gathered (lm_head, final norm)", copies * tail,
                    f"{copies} × (V·h + norm) × compute bytes", {"bytes": tail, "copies": copies}),)
    backward = [Term("transient", "FSDP gathered layers in backward (current + prefetched)", 2 * layer,
                     "2 × one layer's weights", {"layer_bytes": layer})]
    if full_ft:
        backward.append(Term("transient", "FSDP one layer's unsharded gradients (reduce-scatter input)", layer,
                             "one layer's weights", {"layer_bytes": layer}))
    return Buffers(always=always, at_loss=at_loss, in_backward=tuple(backward))


def trained_component(method: str) -> str:
    """The component whose bytes are the trainable weights (and their gradients): the adapter, or all weights."""
    return "adapter" if METHODS[method].adapter else "weights"


def shard(single: MemoryEstimate, s: Setup, parallelism: str, devices: int) -> MemoryEstimate:
    """The per-device estimate of `single` (estimated on `engine_setup(s, ...)`) under `parallelism` over `devices`
    devices: the static terms re-sharded, each moment of the step with the buffers the engine adds there, the
    largest moment kept."""
    if parallelism not in ENGINES or devices == 1:
        return single
    if engine_setup(s, single.method, parallelism, devices) is not s:
        raise ValueError("estimate an FSDP run on parallel.engine_setup(...)'s setup (or use per_device)")
    n, engine = devices, ENGINES[parallelism]
    upcast = fsdp_upcast(s, single.method, parallelism)
    param_state = A.OPTIMIZER_STATES[s.optimizer][0] == "param"

    def resharded(t: Term) -> Term:
        return _resharded(t, engine, n, upcast, param_state)

    static = [resharded(t) for t in single.terms if t.component in STATIC]
    if engine.fp32_master:
        params = single.trainable_parameters
        static.append(Term("optimizer", f"DeepSpeed fp32 master weights (sharded /{n})", 4 * params // n,
                           "4 × N_trainable / devices", {"N": params, "devices": n}))
    moments = _moments(single, parallelism, resharded, _buffers(single, s, parallelism))
    totals = {k: sum(int(t.bytes) for t in ts) for k, ts in moments.items()}
    phase = max(totals, key=lambda k: totals[k])
    out = static + moments[phase]
    peak = sum(t.bytes for t in out if t.component not in NOT_ALLOCATED)
    out += overhead_terms(s, peak)
    static_bytes = sum(int(t.bytes) for t in static if t.component not in NOT_ALLOCATED)
    return MemoryEstimate(method=single.method, trainable_parameters=single.trainable_parameters,
                          phase=phase, terms=tuple(out), phases={k: v + static_bytes for k, v in totals.items()},
                          phase_terms=moments)


def _moments(single: MemoryEstimate, parallelism: str, resharded, buffers: Buffers) -> dict[str, list[Term]]:
    """Each moment of the step on one device: its gradients re-sharded, the engine's buffers at that moment."""
    # an estimate built elsewhere (exact mode) may carry only its peak moment
    phase_terms = single.phase_terms or {single.phase: tuple(t for t in single.terms
                                                             if t.component not in STATIC + ("overhead",))}
    moments: dict[str, list[Term]] = {}
    for name, dyn in phase_terms.items():
        terms = [resharded(t) if t.component == "gradients" else t for t in dyn]
        if parallelism == "fsdp" and name == "optimizer":
            moments[name] = terms  # the root is resharded after backward
        else:
            moments[name] = [*terms, *buffers.always,
                             *(buffers.in_backward if name in BACKWARD_PHASES else buffers.at_loss)]
    return moments


def comm_seconds_per_step(single: MemoryEstimate, s: Setup, parallelism: str, topo: Topology) -> float:
    """Seconds of communication per optimizer step (before overlap)."""
    n = topo.devices
    if parallelism == "single" or n == 1 or topo.ring_gbps <= 0:
        return 0.0
    bw = topo.ring_gbps * 1e9
    frac = (n - 1) / n
    grads = sum(t.bytes for t in single.terms if t.component == trained_component(single.method))
    weights = layer_weight_bytes(s, METHODS[single.method].quantized) * s.shape.num_layers
    micro = s.geometry.gradient_accumulation_steps
    if parallelism == "ddp":
        return 2 * frac * grads / bw
    if parallelism == "deepspeed-zero2":
        return 2 * frac * grads / bw  # reduce-scatter grads + all-gather updated weights
    # fsdp / zero3: gather weights in forward and backward, every micro-step; reduce-scatter grads
    return micro * (2 * frac * weights + frac * grads) / bw


def topology(device, count: int, nodes: int, network_gbps: float | None) -> Topology:
    intra = device.interconnect_gbps / 2 if device.interconnect_gbps else 0.0  # catalog: bidirectional
    return Topology(count=count, nodes=nodes, intra_gbps=intra,
                    inter_gbps=network_gbps if network_gbps else DEFAULT_NETWORK_GBPS)
