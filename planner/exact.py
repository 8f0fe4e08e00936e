"""Exact mode's arithmetic (no torch here): turn a traced step (runtime.exact.trace) into a MemoryEstimate.

The trace gives the static bytes of the traced model, the trainable tensors, and the peak bytes of
one forward+backward pass above them. Added analytically: optimizer state for the trainable tensors,
NF4 storage in place of the 16-bit decoder linears for QLoRA/QDoRA (bitsandbytes cannot run on fake
tensors) with the largest de-quantized weight as a transient, gradients held across accumulation,
and the device overhead — the same formulas the closed form uses.
"""

from __future__ import annotations

from .memory import MemoryEstimate, optimizer_state_bytes, overhead_terms
from .methods import Tensors
from .methods.nf4 import nf4_bytes
from .terms import Setup, Term


def exact_estimate(method: str, setup: Setup, traced: dict) -> MemoryEstimate:
    e = setup.compute_bytes
    tensors = [Tensors("traced", numel, 1, size) for numel, size in traced["trainable"]]
    n_train = sum(t.numel for t in tensors)
    train_bytes = sum(t.numel * t.bytes_per for t in tensors)
    terms: list[Term] = []
    frozen = traced["frozen_bytes"] + traced["buffer_bytes"]
    quantized = method in ("qlora", "qdora")
    if quantized:
        numels = traced["linear_weight_numels"]
        sixteen = sum(n * e for n in numels)
        data = sum(nf4_bytes(n)[0] for n in numels)
        consts = sum(nf4_bytes(n)[1] for n in numels)
        terms += [Term("weights", "frozen weights (traced), decoder linears as NF4", frozen - sixteen + data,
                       "traced − 16-bit linears + NF4", {"linears": len(numels)}),
                  Term("quant_constants", "NF4 block constants", consts, "per tensor, as bitsandbytes stores them", {})]
    else:
        terms.append(Term("weights", "frozen weights and buffers (traced)" if method != "full" else "buffers (traced)",
                          frozen, "sum of traced tensors", {}))
    if method == "full":
        terms.append(Term("weights", "trainable weights (traced)", train_bytes, "sum of traced tensors", {"N": n_train}))
    else:
        terms.append(Term("adapter", "adapter weights (traced)", train_bytes, "sum of traced tensors", {"N": n_train}))
    opt, formula = optimizer_state_bytes(tensors, setup.optimizer)
    comp = "paged_optimizer" if setup.optimizer.startswith("paged_") else "optimizer"
    terms.append(Term(comp, f"{setup.optimizer} state", opt, formula, {"N": n_train}))
    terms.append(Term("activations", "traced forward + backward peak (activations, logits, gradients)",
                      traced["step_peak_bytes"], "measured on fake tensors", {"seconds": round(traced["seconds"], 2)}))
    if setup.geometry.gradient_accumulation_steps > 1:
        terms.append(Term("gradients", "gradients held across accumulation", train_bytes, "N × bytes", {"N": n_train}))
    if quantized and traced["linear_weight_numels"]:
        biggest = max(traced["linear_weight_numels"])
        terms.append(Term("transient", "largest de-quantized NF4 weight (analytic)", biggest * e, "n × e",
                          {"n": biggest}))
    peak = sum(t.bytes for t in terms if t.component not in ("overhead", "paged_optimizer"))
    terms += overhead_terms(setup, peak)
    return MemoryEstimate(method=method, trainable_parameters=n_train, phase="traced", terms=tuple(terms))
