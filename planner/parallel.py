"""Per-device memory and communication time under data parallelism, FSDP and DeepSpeed ZeRO-2/3.

Starts from the single-device estimate (the same runtime, the same activations: every device runs its
own micro-batch) and re-shards the static terms over N = devices per node × nodes:

| parallelism      | weights   | trainable + grads          | optimizer state           | extra buffers |
|------------------|-----------|----------------------------|---------------------------|---------------|
| ddp              | W         | full; + gradient buckets    | full                      | DDP buckets = gradients (gradient_as_bucket_view off) |
| fsdp (full shard)| W/N       | /N                         | /N                        | 2 layers gathered (forward prefetch) + one layer's reduce-scatter |
| deepspeed-zero2  | W         | weights full, grads /N     | fp32 master + states, /N  | reduce bucket (h² elements) |
| deepspeed-zero3  | W/N       | /N                         | fp32 master + states, /N  | prefetch bucket (0.9·h²) + one layer gathered |

FSDP and ZeRO-3 shard the frozen base too (for QLoRA with FSDP, the 4-bit weights are stored in the
compute dtype — bnb_4bit_quant_storage — so they can be sharded; the bytes are unchanged). DeepSpeed
keeps an fp32 master copy of every trainable parameter in its optimizer (Rajbhandari et al. 2020:
16 bytes/param of model states for mixed-precision Adam = 2 weights + 2 grads + 12 optimizer).
Communication per optimizer step (ring collectives, Thakur et al. 2005): all-reduce 2(N−1)/N·bytes,
all-gather and reduce-scatter (N−1)/N·bytes each, over the slowest link on the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import NOT_ALLOCATED, MemoryEstimate, overhead_terms
from .terms import Setup, Term

PARALLELISMS = ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
DEFAULT_NETWORK_GBPS = 12.5  # between nodes, per node: 100 Gb/s Ethernet, a common cloud default
COMM_OVERLAP = 0.5  # fraction of communication hidden behind compute (FSDP prefetch, DDP bucketing)


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


def shard(single: MemoryEstimate, s: Setup, parallelism: str, devices: int, quantized: bool) -> MemoryEstimate:
    """The per-device estimate of `single` under `parallelism` over `devices` devices."""
    if parallelism == "single" or devices == 1:
        return single
    n = devices
    h = s.shape.hidden_size
    out: list[Term] = []
    trainable_bytes = sum(t.bytes for t in single.terms if t.component == "adapter")
    full_ft = single.method == "full"
    for t in single.terms:
        if t.component in NOT_ALLOCATED and t.component == "overhead":
            continue  # recomputed below
        c = t.component
        factor = 1.0
        if c in ("weights", "quant_constants", "adapter") and parallelism in ("fsdp", "deepspeed-zero3"):
            factor = 1 / n
        if c in ("optimizer", "paged_optimizer") and parallelism != "ddp":
            factor = 1 / n
        if c == "gradients" and parallelism != "ddp":
            factor = 1 / n
        label = t.label + (f" (sharded /{n})" if factor != 1 else "")
        out.append(Term(c, label, int(t.bytes * factor), t.formula + (f" / {n}" if factor != 1 else ""), t.inputs))
    weights16 = sum(t.bytes for t in single.terms if t.component == "weights") if full_ft else trainable_bytes
    params = single.trainable_parameters
    if parallelism.startswith("deepspeed"):  # fp32 master copy of every trainable parameter, sharded
        out.append(Term("optimizer", f"DeepSpeed fp32 master weights (sharded /{n})", 4 * params // n,
                        "4 × N_trainable / devices", {"N": params, "devices": n}))
    if parallelism == "ddp":
        grads = weights16 if full_ft else trainable_bytes
        out.append(Term("transient", "DDP gradient buckets", grads, "= gradient bytes (gradient_as_bucket_view off)",
                        {"bytes": grads}))
    elif parallelism == "fsdp":
        layer = layer_weight_bytes(s, quantized)
        out.append(Term("transient", "FSDP all-gathered layers (current + prefetched)", 2 * layer,
                        "2 × one layer's weights", {"layer_bytes": layer}))
        if full_ft:
            out.append(Term("transient", "FSDP reduce-scatter of one layer's gradients", layer, "one layer's weights",
                            {"layer_bytes": layer}))
    elif parallelism == "deepspeed-zero2":
        bucket = h * h * 2
        out.append(Term("transient", "ZeRO-2 reduce bucket (h² elements, 16-bit)", bucket, "h² × 2", {"h": h}))
    elif parallelism == "deepspeed-zero3":
        layer = layer_weight_bytes(s, quantized)
        prefetch = int(0.9 * h * h) * 2
        out.append(Term("transient", "ZeRO-3 gathered layer + prefetch bucket", layer + prefetch,
                        "one layer + 0.9·h² × 2", {"layer_bytes": layer, "h": h}))
    peak = sum(t.bytes for t in out if t.component not in NOT_ALLOCATED)
    out += overhead_terms(s, peak)
    return MemoryEstimate(method=single.method, trainable_parameters=single.trainable_parameters,
                          phase=single.phase, terms=tuple(out), phases=single.phases)


def comm_seconds_per_step(single: MemoryEstimate, s: Setup, parallelism: str, topo: Topology,
                          quantized: bool) -> float:
    """Seconds of communication per optimizer step (before overlap)."""
    n = topo.devices
    if parallelism == "single" or n == 1 or topo.ring_gbps <= 0:
        return 0.0
    bw = topo.ring_gbps * 1e9
    frac = (n - 1) / n
    grads = sum(t.bytes for t in single.terms if t.component == "adapter") if single.method != "full" else \
        sum(t.bytes for t in single.terms if t.component == "weights")
    weights = layer_weight_bytes(s, quantized) * s.shape.num_layers
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
