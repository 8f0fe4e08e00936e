"""Exact mode's arithmetic (no torch here): turn a traced step (runtime.exact.trace) into a MemoryEstimate,
and a whole estimate report into a traced one (`trace_estimates`: --exact, and any architecture the closed
form does not know).

The trace gives the static bytes of the traced model, the trainable tensors, and the peak bytes of
one forward+backward pass above them. Added analytically: optimizer state for the trainable tensors,
NF4 storage in place of the 16-bit decoder linears for QLoRA/QDoRA (bitsandbytes cannot run on fake
tensors) with the largest de-quantized weight as a transient, gradients held across accumulation,
and the device overhead — the same formulas the closed form uses.
"""

from __future__ import annotations

from .memory import MemoryEstimate, optimizer_state_bytes, overhead_terms
from .methods import METHODS, Tensors
from .methods.nf4 import nf4_bytes
from .terms import Setup, Term


def exact_estimate(method: str, setup: Setup, traced: dict) -> MemoryEstimate:
    e = setup.compute_bytes
    tensors = [Tensors("traced", numel, 1, size) for numel, size in traced["trainable"]]
    n_train = sum(t.numel for t in tensors)
    train_bytes = sum(t.numel * t.bytes_per for t in tensors)
    terms: list[Term] = []
    frozen = traced["frozen_bytes"] + traced["buffer_bytes"]
    m = METHODS[method]
    if m.quantized:
        numels = traced["linear_weight_numels"]
        sixteen = sum(n * e for n in numels)
        data = sum(nf4_bytes(n)[0] for n in numels)
        consts = sum(nf4_bytes(n)[1] for n in numels)
        terms += [Term("weights", "frozen weights (traced), decoder linears as NF4", frozen - sixteen + data,
                       "traced − 16-bit linears + NF4", {"linears": len(numels)}),
                  Term("quant_constants", "NF4 block constants", consts, "per tensor, as bitsandbytes stores them", {})]
    else:
        terms.append(Term("weights", "frozen weights and buffers (traced)" if m.adapter else "buffers (traced)",
                          frozen, "sum of traced tensors", {}))
    if not m.adapter:
        terms.append(Term("weights", "trainable weights (traced)", train_bytes, "sum of traced tensors",
                          {"N": n_train}))
    else:
        terms.append(Term("adapter", "adapter weights (traced)", train_bytes, "sum of traced tensors", {"N": n_train}))
    opt, formula = optimizer_state_bytes(tensors, setup.optimizer)
    comp = "paged_optimizer" if setup.optimizer.startswith("paged_") else "optimizer"
    terms.append(Term(comp, f"{setup.optimizer} state", opt, formula, {"N": n_train}))
    terms.append(Term("activations", "traced forward + backward peak (activations, logits, gradients)",
                      traced["step_peak_bytes"], "measured on fake tensors", {"seconds": round(traced["seconds"], 2)}))
    if setup.geometry.gradient_accumulation_steps > 1:  # traced with them in its baseline (grads_held): once here
        terms.append(Term("gradients", "gradients held across accumulation", train_bytes, "N × bytes", {"N": n_train}))
    if m.quantized and traced["linear_weight_numels"]:
        biggest = max(traced["linear_weight_numels"])
        terms.append(Term("transient", "largest de-quantized NF4 weight (analytic)", biggest * e, "n × e",
                          {"n": biggest}))
    peak = sum(t.bytes for t in terms if t.component not in ("overhead", "paged_optimizer"))
    terms += overhead_terms(setup, peak)
    return MemoryEstimate(method=method, trainable_parameters=n_train, phase="traced", terms=tuple(terms))


def trace_estimates(report, trace, *, progress=None, automatic: bool = False):
    """`report` (planner.report.EstimateReport) with every method's estimate traced instead of closed-form.

    `trace` is runtime.exact.trace, passed in by the caller (the planner never imports the runtime).
    `automatic`: the closed form does not know the architecture (report.model.described), so the trace is
    the estimate, not a cross-check; the notes say so and how long it took. `progress(method)` is called
    before each method is traced."""
    import time
    from dataclasses import replace

    from .memory import estimate

    t0 = time.perf_counter()
    s = report.resolved.setup
    s = replace(s, geometry=replace(s.geometry, padded=False))  # the trace runs an unpadded batch
    targets = s.adapter.target_modules
    out, notes = {}, []
    if s.geometry.attention == "sdpa" and not s.shape.supports_sdpa:
        s = replace(s, geometry=replace(s.geometry, attention="eager"))
        notes.append(f"{s.shape.model_type} has no sdpa attention in transformers: traced with eager attention")
    for method in report.estimates:
        if progress is not None:
            progress(method)
        traced = trace(report.model.config, method=method, dtype=s.dtype, attention=s.geometry.attention,
                       gradient_checkpointing=s.geometry.gradient_checkpointing, rank=s.adapter.rank,
                       alpha=s.adapter.alpha, dropout=s.adapter.dropout,
                       target_modules=list(targets) if isinstance(targets, tuple) else targets,
                       batch=s.geometry.micro_batch_size, seq=s.geometry.seq_len, loss=s.loss,
                       grads_held=s.geometry.gradient_accumulation_steps > 1)
        est = exact_estimate(method, s, traced)
        out[method] = est
        closed = estimate(method, s).peak_allocated_bytes
        kind = "described closed form (not calibrated)" if automatic else "closed form"
        notes.append(f"exact {method}: traced in {traced['seconds']:.1f} s; {kind} {closed / 2**30:.2f} GiB vs traced "
                     f"{est.peak_allocated_bytes / 2**30:.2f} GiB "
                     f"({(closed - est.peak_allocated_bytes) / est.peak_allocated_bytes:+.1%})")
    seconds = time.perf_counter() - t0
    head = []
    if automatic:
        head.append(f"model_type {report.model.shape.model_type!r} is not one the closed form knows: every method was "
                    f"traced instead (one forward+backward on fake tensors per method, {seconds:.0f} s in all)")
    notes.append("exact mode: one forward+backward traced on fake tensors with PyTorch's CPU kernels (unpadded batch);"
                 " bitsandbytes 4-bit storage and optimizer state added analytically")
    if report.devices > 1:
        notes.append(f"exact mode traces one device without sharding: these are single-device numbers, not per device "
                     f"over {report.devices}; the closed form (without --exact) gives the per-device ones")
    resolved = replace(report.resolved, notes=report.resolved.notes + tuple(head + notes))
    return replace(report, estimates=out, parallelism={m: "single" for m in out}, resolved=resolved)
