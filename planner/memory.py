"""Peak training memory per method, from named, explained terms.

The peak is the largest of a few moments of a steady-state training step (the optimizer state
already exists), each a sum of terms:

- `loss`:      all saved activations + the fp32 cross-entropy buffers at the start of backward;
- `layer`:     all saved activations + the largest short-lived buffer inside a layer (NF4
               de-quantization, DoRA's weight norm) and one layer's backward gradients;
- `recompute`: with gradient checkpointing, the checkpointed inputs + one recomputed layer;
- `optimizer`: gradients of every trainable tensor at the optimizer step.

Static terms (weights, quantization constants, adapters, optimizer state) are added to each.
Gradients are held during the forward pass only with gradient accumulation (> 1 micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

from . import assumptions as A
from .activations import (
    backward_working_term,
    checkpoint_term,
    layer_terms,
    outside_layers_terms,
)
from .loss import loss_terms
from .methods import METHODS, Method, Tensors
from .terms import COMPONENTS, Setup, Term

NOT_ALLOCATED = ("overhead", "paged_optimizer")


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    trainable_parameters: int
    phase: str  # the moment the peak happens
    terms: tuple[Term, ...]  # the terms that make up the peak (and the overhead)
    phases: dict = field(default_factory=dict)  # bytes at each moment (peak_allocated candidates)
    phase_terms: dict = field(default_factory=dict)  # the non-static terms of each moment (planner.parallel)

    def components(self) -> dict[str, int]:
        out = {name: 0 for name in COMPONENTS}
        for t in self.terms:
            out[t.component] += int(t.bytes)
        return out

    @property
    def peak_allocated_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated() reports: every component but the overhead and the
        paged optimizer state (CUDA unified memory, outside PyTorch's allocator)."""
        return sum(int(t.bytes) for t in self.terms if t.component not in NOT_ALLOCATED)

    @property
    def device_total_bytes(self) -> int:
        """What nvidia-smi shows: everything, paged optimizer state included while it is resident."""
        return sum(int(t.bytes) for t in self.terms)

    @property
    def evictable_bytes(self) -> int:
        """Paged optimizer state, which the driver moves to host memory when the device runs short."""
        return sum(int(t.bytes) for t in self.terms if t.component == "paged_optimizer")


def optimizer_state_bytes(tensors: list[Tensors], optimizer: str) -> tuple[int, str]:
    kind, states = A.OPTIMIZER_STATES[optimizer]
    total = 0
    for t in tensors:
        if kind == "param":
            per = states * t.bytes_per * t.numel
        elif kind == "fp32":
            per = states * 4 * t.numel
        elif t.numel < A.BNB_MIN_8BIT_SIZE:  # bitsandbytes keeps small tensors in 32-bit state
            per = states * 4 * t.numel
        else:
            per = states * (t.numel + 4 * ceil(t.numel / A.BNB_8BIT_BLOCK))
        total += per * t.count
    formula = {
        "param": f"{states} states × param bytes × N",
        "fp32": f"{states} × 4 × N",
        "int8": f"{states} × (N + 4·N/{A.BNB_8BIT_BLOCK})",
    }[kind]
    return total, formula


def estimate(method: str | Method, s: Setup) -> MemoryEstimate:
    """One pass: the static terms (weights, adapters, optimizer state), the terms of each moment of a step, the
    largest moment, the overhead on top."""
    m = METHODS[method] if isinstance(method, str) else method
    tensors = m.trainable_tensors(s)
    n_train = sum(t.elements for t in tensors)
    train_bytes = sum(t.elements * t.bytes_per for t in tensors)
    static = _static_terms(m, s, tensors, n_train, train_bytes)
    phases = _moments(m, s, n_train, train_bytes)
    totals = {name: sum(int(t.bytes) for t in ts) for name, ts in phases.items()}
    phase = max(totals, key=lambda k: totals[k])
    terms = [*static, *phases[phase]]
    peak = sum(int(t.bytes) for t in terms if t.component not in NOT_ALLOCATED)
    terms += overhead_terms(s, peak)
    return MemoryEstimate(
        method=m.name,
        trainable_parameters=n_train,
        phase=phase,
        terms=tuple(terms),
        phases={k: v + sum(int(t.bytes) for t in static) for k, v in totals.items()},
        phase_terms={k: tuple(v) for k, v in phases.items()},
    )


def _static_terms(m: Method, s: Setup, tensors: list[Tensors], n_train: int, train_bytes: int) -> list[Term]:
    """What lives through the whole step: the base weights as the method stores them, the adapters, the optimizer
    state (paged state is CUDA unified memory, evictable to host)."""
    static = list(m.weight_terms(s))
    if m.adapter:
        static.append(Term("adapter", "adapter weights (fp32)", train_bytes, "N_adapter × 4",
                           {"N_adapter": n_train}))
    opt_bytes, opt_formula = optimizer_state_bytes(tensors, s.optimizer)
    paged = s.optimizer.startswith("paged_")
    static.append(Term("paged_optimizer" if paged else "optimizer",
                       f"{s.optimizer} state" + (" (CUDA unified memory, evictable to host)" if paged else ""),
                       opt_bytes, opt_formula, {"N": n_train, "optimizer": s.optimizer}))
    return static


def _moments(m: Method, s: Setup, n_train: int, train_bytes: int) -> dict[str, list[Term]]:
    """The non-static terms at each moment of a step (the module docstring)."""
    g, sh, T = s.geometry, s.shape, s.geometry.tokens
    grads = Term("gradients", "gradients of the trainable tensors", train_bytes, "N × param bytes",
                 {"N": n_train})
    held_grads = [grads] if g.gradient_accumulation_steps > 1 else []
    per_layer = layer_terms(s, m)
    layer_bytes = sum(t.bytes for t in per_layer)
    outside = outside_layers_terms(s, m)
    inner = _inner(m, backward_working_term(s, m), m.layer_transient_terms(s, T), s)
    logits = loss_terms(s, m)
    phases: dict[str, list[Term]] = {}
    if g.gradient_checkpointing:
        ckpt = checkpoint_term(s)
        if s.offload:  # runtime/offload.py: the layer inputs live in host memory, a few at a time on the device
            ckpt = offloaded_checkpoint_term(s, ckpt)
        one_layer = Term("activations", "one recomputed layer", layer_bytes, "per-layer activations",
                         {"terms": {t.label: int(t.bytes) for t in per_layer}})
        phases["loss"] = [ckpt, *outside, *logits, *held_grads]
        # Recomputing layer 0: every later layer's gradients already exist. A de-quantized weight lives
        # only inside one matmul, so it and the layer's backward gradients do not overlap: the larger
        # counts. DoRA's weight-norm buffers are built in the recomputed forward while the gradients
        # flowing into the layer are alive: measured, they add.
        later = Term("gradients", "gradients of the layers already back-propagated",
                     train_bytes - (0 if held_grads else m.not_yet_graded_bytes(s)), "N × bytes − layer 0",
                     {"N": n_train})
        # the inputs, masks and rotary tables every layer's recomputation reads are still alive then
        phases["recompute"] = [ckpt, outside[0], one_layer, *inner, later]
    else:
        saved = layer_bytes * sh.num_layers - m.layer0_savings(s, T) - _layer0_norm(s, m)
        all_layers = Term("activations", f"{sh.num_layers} layers × per-layer activations", saved,
                          "L × layer − layer-0 savings",
                          {"L": sh.num_layers, "layer": int(layer_bytes),
                           "terms": {t.label: int(t.bytes) for t in per_layer}})
        phases["loss"] = [all_layers, *outside, *logits, *held_grads]
        phases["layer"] = [all_layers, *outside, *inner, *held_grads]
    phases["optimizer"] = [grads]
    return phases


def offloaded_checkpoint_term(s: Setup, ckpt: Term) -> Term:
    """The checkpointed inputs on the device under activation offloading: at most a few layers' worth."""
    sh, T = s.shape, s.geometry.tokens
    one = s.compute_bytes * T * sh.hidden_size
    kept = min(sh.num_layers, A.OFFLOAD_LAYERS_ON_DEVICE)
    return Term("activations", f"checkpointed layer inputs on the device (offloaded: {kept} of {sh.num_layers})",
                kept * one, f"min(L, {A.OFFLOAD_LAYERS_ON_DEVICE}) × e·T·h",
                {"host_bytes": int(ckpt.bytes), "L": sh.num_layers, "T": T, "h": sh.hidden_size})


def _inner(m: Method, working: Term, transient: list[Term], s: Setup) -> list[Term]:
    """Short-lived buffers inside one layer at its worst moment: DoRA's weight-norm buffers add to the backward
    gradients (measured), except where the method says they do not (NF4 experts: planner/methods/nf4.py)."""
    if m.dora and m.transients_add_to_working(s):
        return [working, *transient]
    return [max([working, *transient], key=lambda t: t.bytes)]


def _layer0_norm(s: Setup, m: Method) -> int:
    """Layer 0's first norm reads the frozen embedding output and saves nothing (adapter methods)."""
    if m.trains_norms() or s.shape.norms_per_layer == 0 or not s.shape.input_norm:
        return 0  # OLMo 2 normalizes each layer's outputs: no norm reads the embeddings
    from .activations import norm_saved_bytes

    return norm_saved_bytes(s, s.geometry.tokens, False)


def overhead_terms(s: Setup, peak: int) -> list[Term]:
    if s.device_kind == "cpu":
        return [Term("overhead", "allocator slack (glibc, fragmentation)", int(peak * A.ALLOCATOR_RESERVE_FRACTION),
                     "peak × reserve fraction", {"fraction": A.ALLOCATOR_RESERVE_FRACTION})]
    return [
        Term("overhead", "caching-allocator reserve", int(peak * A.ALLOCATOR_RESERVE_FRACTION),
             "peak × reserve fraction", {"fraction": A.ALLOCATOR_RESERVE_FRACTION}),
        Term("overhead", "CUDA context and library workspaces", A.CUDA_CONTEXT_BYTES, "constant",
             {"bytes": A.CUDA_CONTEXT_BYTES}),
    ]


def estimate_all(s: Setup) -> dict[str, MemoryEstimate]:
    return {name: estimate(m, s) for name, m in METHODS.items()}
