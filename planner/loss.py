"""Memory of the loss: the output head and the cross-entropy, as the runtime computes them (runtime/loss.py).

`loss = "chunked"` (the default): the head and the loss run together a chunk of C tokens at a time; the gradients
are made in the same pass. What is alive at the loss, besides the saved activations (T = tokens of the micro-batch,
n = T labelled rows in the worst case, V = vocabulary, H = hidden size, p = compute bytes, q = bytes of the hidden
states and of the head's weight):

    forward  = T·H·q              the final hidden states (the head's input)
             + 2·n·H·q            the labelled rows gathered, and their gradient being filled
             + C·V·(4 + p)        one chunk's logits in the compute dtype and in fp32 (p = 4: C·V·4, ·8 soft-capped)
             + 4·V·H (+ 4·V)      a trainable head only (full fine-tuning): its fp32 gradient accumulator (and bias)
             + V·H·p              only when the head's dtype is not the compute dtype: autocast's cast of it
             + C·H·(p + q) + 24·n one chunk's inputs, row indices and labels
    backward = n·H·q + max(2·T·H·q, 4·V·H + V·H·q)   the stored gradient; scattered back to every row, or (trainable
                                                      head) the accumulator and its cast to the head's dtype

`loss = "full"` is transformers' own path: fp32 log-softmax and two fp32 gradients at the start of backward,
12·T·V bytes (+ p·T·V when the logits are soft-capped). planner/assumptions.py says how both were measured.
"""

from __future__ import annotations

from . import assumptions as A
from .terms import Setup, Term


def chunk_tokens(vocab_size: int, compute_bytes: int) -> int:
    """runtime/loss.py's chunk_tokens: the largest power of two C with C·V·(4 + p) within the budget, clamped."""
    rows = max(A.LOSS_CHUNK_BUDGET_BYTES // (vocab_size * (4 + compute_bytes)), 1)
    return max(A.LOSS_CHUNK_MIN, min(A.LOSS_CHUNK_MAX, 1 << (rows.bit_length() - 1)))


def full_loss_term(s: Setup) -> Term:
    sh, T = s.shape, s.geometry.tokens
    V = sh.vocab_size
    n = A.LOGIT_FP32_COPIES_AT_PEAK
    total, formula = n * 4 * T * V, f"{n} × 4·T·V"
    if sh.final_logit_softcap:
        total += s.compute_bytes * T * V
        formula += " + e·T·V (softcap tanh)"
    return Term("logits", "logits and fp32 cross-entropy (loss = full)", total, formula, {"T": T, "V": V})


def chunked_loss_terms(s: Setup, method) -> list[Term]:
    """The chunked loss at its largest moment (forward or the start of backward), as terms."""
    sh, T = s.shape, s.geometry.tokens
    V, H, p = sh.vocab_size, sh.hidden_size, s.compute_bytes
    q = method.weight_bytes(s)  # the final norm's output and the head's weight: the model's 16-bit (or fp32) dtype
    n = T  # every token labelled: the worst case (response-only labels use fewer rows)
    C = min(chunk_tokens(V, p), n)  # a micro-batch shorter than a chunk is one chunk of its own length
    trains = method.trains_lm_head()
    chunk = C * V * (4 + p) if p != 4 else C * V * (8 if sh.final_logit_softcap else 4)
    head_grad = (4 * V * H + (4 * V if sh.lm_head_bias else 0)) if trains else 0
    cast = V * H * p if q != p else 0
    forward = [
        Term("logits", "final hidden states (the head's input)", T * H * q, "T·H·q", {"T": T, "H": H, "q": q}),
        Term("logits", "labelled rows and their gradient", 2 * n * H * q, "2·n·H·q", {"n": n, "H": H, "q": q}),
        Term("logits", f"one chunk's logits ({C} tokens, compute dtype and fp32)", chunk,
             "C·V·(4 + p)" if p != 4 else ("C·V·8" if sh.final_logit_softcap else "C·V·4"),
             {"C": C, "V": V, "p": p}),
        Term("logits", "chunk inputs, row indices and labels", C * H * (p + q) + 24 * n, "C·H·(p+q) + 24·n",
             {"C": C, "H": H, "n": n}),
    ]
    if head_grad:
        forward.append(Term("logits", "trainable head's fp32 gradient accumulator", head_grad, "4·V·H (+ 4·V)",
                            {"V": V, "H": H}))
    if cast:
        forward.append(Term("logits", "the head cast to the compute dtype", cast, "V·H·p", {"V": V, "H": H, "p": p}))
    back_extra = max(2 * T * H * q, (4 * V * H + V * H * q) if trains else 0)
    backward = [Term("logits", "stored hidden-state gradient", n * H * q, "n·H·q", {"n": n, "H": H, "q": q}),
                Term("logits", "gradient scattered to every row" if back_extra == 2 * T * H * q else
                     "head gradient accumulator and its cast", back_extra, "max(2·T·H·q, 4·V·H + V·H·q)",
                     {"T": T, "V": V, "H": H, "q": q})]
    if sum(t.bytes for t in backward) > sum(t.bytes for t in forward):
        return backward
    return forward


def loss_terms(s: Setup, method) -> list[Term]:
    return chunked_loss_terms(s, method) if s.loss == "chunked" else [full_loss_term(s)]
