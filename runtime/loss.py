"""The training loss without tokens × vocabulary: a chunked fused linear cross-entropy.

transformers computes `logits = lm_head(h)` for every token (N × V in the compute dtype), then
`ForCausalLMLoss` upcasts them (`logits.float()`, N × V × 4 bytes) and `cross_entropy` keeps the fp32
log-probabilities for backward. For Llama-3 (V = 128,256) at 2 × 2048 tokens that is ~5.9 GiB at the start
of backward. Here the head and the loss run together, `chunk` tokens at a time: each chunk's logits are
computed exactly as the model would (same matmul in the compute dtype, same soft-capping / scaling, then
`.float()`), turned into the summed NLL and, in the same pass, into the gradients (softmax − one-hot):
grad_h for the hidden states and, only when the head is trainable (full fine-tuning, tied embeddings),
grad_W/grad_b accumulated in fp32. Backward only multiplies the stored gradients by grad_output.

    res = install(model)              # a (peft-wrapped) causal LM; self-checked, falls back if unsure
    print(res)                        # "loss: chunked (torch backend, 256 tokens per chunk)" or why not
    out = model(input_ids=..., labels=..., num_items_in_batch=...)   # out.loss, out.logits is None

Memory (what the estimator counts; measured op by op on CPU, tests/runtime/test_loss.py). N = B·T rows,
n = rows with a label ≠ -100 (after the shift), C = chunk_tokens(V, p), p = compute dtype bytes (autocast's,
else the weight's), q = bytes of the hidden states' dtype (the final norm's output), w = the head weight's:
- forward, peak (inside a chunk), on top of everything alive before the loss:
      C·V·(4 + p)          the chunk's logits in the compute dtype and in fp32 (p = 4: C·V·4, as `.float()` is
                           the same tensor; p = 4 with soft-capping: C·V·8)
    + 2·n·H·q              the labelled rows' hidden states and grad_h being filled
    + 4·V·H (+ 4·V)        only for a trainable head: fp32 grad_W (grad_b) accumulators
    + V·H·p                only if w ≠ p: the head cast to the compute dtype (autocast's cast, standard too)
    + C·H·(p + q) + 24·n   small: one chunk's cast/product, row indices and labels
  (Traced with fake/meta tensors the rows are not compacted: n = N and one N·H·q term instead of two.)
- between forward and backward: n·H·q (grad_h) [+ 4·V·H for a trainable head].
- backward at the loss: max(n·H·q + 4·V·H + V·H·w [trainable 16-bit head: the accumulator and its cast],
  n·H·q + 2·N·H·q [grad_h scattered back to all N rows]).
The standard path holds ≈ 12·N·V bytes at its peak (logits, fp32 copy / log-probabilities, their gradient):
measured 12.07·N·V (fp32) and 12.17·N·V (bf16 autocast) on CPU. On CUDA with liger (accum_dtype fp32) the
terms are the same with liger's own chunk: next_power_of_2(⌈n / ⌈V/H⌉⌉) rows of V in the compute dtype only
(≈ n·H·p … 2·n·H·p bytes), plus 4·n bytes of per-row losses.

Backend: on CUDA with `liger_kernel` importable, Liger's fused linear cross-entropy (Triton; the same
compute-gradients-in-forward design, exact: no gradient filtering); elsewhere (CPU, ROCm, tests) the
pure-PyTorch implementation below. cut-cross-entropy (apple/ml-cross-entropy) needs even less memory
(it never writes a logits chunk), but its default gradient filtering (`filter_eps="auto"`) drops small
gradient entries, its last release is 25.1.1 (January 2025), and its FSDP use has open reports of
illegal memory accesses (apple/ml-cross-entropy#31). Liger is maintained, exact, handles bias and
soft-capping, and is what transformers' `use_liger_kernel` uses. Pin: `liger-kernel==0.8.5`. Its caveats
(linkedin/Liger-Kernel#332, #674): the head's weight must be the gathered tensor (FSDP/ZeRO-3 shard it
outside the head's own forward) and a peft-wrapped lm_head (modules_to_save, LoRA on lm_head) is not a
plain weight — both are handled below (the loss runs inside lm_head's call; peft/bnb heads fall back).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Chunk rule (the estimator mirrors these three numbers). One chunk of C tokens holds at most C·V·(4 + p)
# bytes of logits (fp32 + compute dtype). C is the largest power of two with C·V·(4 + p) ≤ the budget,
# clamped to [MIN, MAX]: for Llama-3 (V = 128,256, bf16) C = 256 tokens → 197 MB; for V = 32,000, C = 1024.
# 256 MiB is ~0.3% of an 80 GB card (the standard path holds ~5.9 GiB for Llama-3 at 2 × 2048 tokens), while
# ≥ 256 rows keep the C × H × V matmuls in the efficient regime; powers of two keep their shapes regular.
CHUNK_BUDGET_BYTES = 256 * 2**20
MIN_CHUNK_TOKENS = 16
MAX_CHUNK_TOKENS = 4096

LIGER_VERSION = "0.8.5"  # the liger-kernel release the CUDA backend was written against (pin it)


def chunk_tokens(vocab_size: int, compute_bytes: int = 2, budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk: the largest power of two C with C·V·(4 + p) ≤ budget, within [16, 4096]."""
    rows = max(budget // (vocab_size * (4 + compute_bytes)), 1)
    return max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, 1 << (rows.bit_length() - 1)))


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to `lm_head(h)` before the loss, in the compute dtype, in this order:
    `x * multiply` (Cohere's logit_scale), `x / divide` (Granite's logits_scaling), then
    `softcap · tanh(x / softcap)` (Gemma-2/3's final_logit_softcapping)."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None


def _chunk_logits(h, weight, bias, t: LogitTransform):
    """fp32 logits of one chunk, made as transformers makes them; also the tanh values (soft-capping's derivative)."""
    x = F.linear(h, weight, bias)  # compute dtype, like the lm_head Linear under autocast
    if t.multiply is not None:
        x.mul_(t.multiply)  # in place: the same rounding as transformers' `logits * s`
    if t.divide is not None:
        x.div_(t.divide)
    if t.softcap is None:
        return x.float(), None  # `.float()` exactly as ForCausalLMLoss; for fp32 the same tensor
    th = x.div_(t.softcap).tanh_()  # x / cap, tanh, in the compute dtype
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.mul(th, t.softcap, out=out)  # == (tanh * cap).float(), without a compute-dtype temporary
    return out, th


def _forward_and_grads(h, weight, bias, y, t: LogitTransform, chunk: int, cd, need_h, need_w, need_b):
    """Summed NLL over rows with y ≠ -100 and, when asked, the gradients of that sum."""
    n = h.shape[0]
    w_cd = weight.to(cd)
    b_cd = bias.to(cd) if bias is not None else None
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk):
        h_c = h[s:s + chunk].to(cd)
        y_c = y[s:s + chunk]
        valid = y_c != IGNORE_INDEX
        y_safe = torch.where(valid, y_c, 0).unsqueeze(1)
        logits, th = _chunk_logits(h_c, w_cd, b_cd, t)
        target = logits.gather(1, y_safe)
        m = logits.amax(1, keepdim=True)
        g = logits.sub_(m).exp_()  # in place: one fp32 chunk buffer serves logits, softmax and gradient
        del logits
        z = g.sum(1, keepdim=True)
        total += torch.where(valid, (m + z.log() - target).squeeze(1), 0.0).sum()
        if need_h or need_w or need_b:
            g.div_(z).scatter_add_(1, y_safe, torch.full_like(target, -1.0))  # softmax − one-hot
            g.mul_(valid.unsqueeze(1))  # ignored rows contribute nothing
            if th is not None:
                g.mul_(th.square_().neg_().add_(1.0))  # d(cap·tanh(x/cap))/dx = 1 − tanh²
            th = None
            if t.divide is not None:
                g.div_(t.divide)
            if t.multiply is not None:
                g.mul_(t.multiply)
            if need_w:
                grad_w.addmm_(g.t(), h_c.float())  # fp32 accumulation over chunks, no V × H temporary
            if need_b:
                grad_b += g.sum(0)
            if need_h:
                g = g.to(cd)  # the fp32 buffer is freed once its compute-dtype copy exists
                grad_h[s:s + chunk] = g @ w_cd
        del g, th  # before the next chunk allocates its own
    return total, grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `F.linear(h, W, b)` (then `transform`) against `y`; gradients made in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, transform, chunk, cd, need_h, need_w, need_b):
        dev = h.device.type  # autocast off inside: every cast is explicit in _forward_and_grads
        with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else _nothing():
            total, grad_h, grad_w, grad_b = _forward_and_grads(h, weight, bias, y, transform, chunk, cd,
                                                               need_h, need_w, need_b)
        # Kept on ctx, not save_for_backward: they are new buffers (no reference cycle), and saved-tensor
        # hooks (activation offloading) must not ship gradients to the host that backward needs first.
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss frees its gradients in backward; backward through it twice "
                               "(retain_graph) is not supported")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # released now, not when the whole graph is freed after the decoder's backward
        if grad_h is not None:
            grad_h.mul_(grad_out)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_out).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


@contextlib.contextmanager
def _nothing():
    yield


def _is_real(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmul runs in: autocast's when autocast is on, else the operands' common type."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def resolve_backend(requested: str, device: torch.device) -> str:
    """`auto`: liger on CUDA when liger_kernel is importable (not ROCm), else torch. `torch` / `liger` force one."""
    if requested not in ("auto", "torch", "liger"):
        raise ValueError(f"loss backend must be auto, torch or liger, not {requested!r}")
    if requested == "torch":
        return "torch"
    usable = device.type == "cuda" and torch.version.hip is None and importlib.util.find_spec("liger_kernel")
    if requested == "liger" and not usable:
        raise RuntimeError("loss backend 'liger' needs CUDA and `pip install liger-kernel==" + LIGER_VERSION + "`")
    return "liger" if usable else "torch"


def _liger_sum(h, weight, bias, y, t: LogitTransform):
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy as flce,
    )

    if t.multiply is not None:  # scaling the logits == scaling h (before the matmul instead of after)
        h = h * t.multiply
    if t.divide is not None:
        h = h / t.divide
    kwargs = {"bias": bias, "ignore_index": IGNORE_INDEX, "reduction": "sum", "softcap": t.softcap}
    if "accum_dtype" in inspect.signature(flce).parameters:
        kwargs["accum_dtype"] = torch.float32  # grad_W over chunks in fp32, as the torch backend
    return flce(h, weight, y, **kwargs)


def linear_cross_entropy(hidden, weight, bias, targets, *, transform: LogitTransform = LogitTransform(),
                         chunk: int | None = None, backend: str = "auto", compact: bool = True) -> torch.Tensor:
    """Σ over tokens with target ≠ -100 of cross_entropy(transform(hidden @ Wᵀ + b).float(), target).

    hidden (…, H), targets (…) already aligned (no shift here). `compact` first keeps only the labelled rows
    (one host sync; prompts and padding cost no matmul); it is skipped for meta/fake tensors (tracing).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).to(h.device)
    if compact and _is_real(h):
        keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)  # autograd scatters grad_h back to N rows
    cd = compute_dtype(h, weight)
    if resolve_backend(backend, h.device) == "liger" and h.shape[0] > 0:
        return _liger_sum(h, weight, bias, y, transform)
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    size = chunk or chunk_tokens(weight.shape[0], torch.finfo(cd).bits // 8)
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, y, transform, size, cd, need_h, need_w, need_b)


def causal_lm_loss(hidden, weight, bias, labels, *, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels=None, transform: LogitTransform = LogitTransform(), chunk: int | None = None,
                   backend: str = "auto", **_) -> torch.Tensor:
    """transformers' ForCausalLMLoss on `lm_head(hidden)` without the logits: labels shifted left with -100
    padding (or `shift_labels` as given); summed, then divided by `num_items_in_batch` when the Trainer
    passes it (token-weighted across gradient accumulation and devices), else the mean over labelled tokens."""
    if ignore_index != IGNORE_INDEX:
        raise ValueError(f"the chunked loss ignores label {IGNORE_INDEX}, not {ignore_index}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    y = shift_labels.reshape(-1).to(hidden.device)
    total = linear_cross_entropy(hidden, weight, bias, y, transform=transform, chunk=chunk, backend=backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (y != ignore_index).sum()


# ---------------------------------------------------------------------------------------------------- install

@dataclass(frozen=True)
class LossResult:
    enabled: bool
    backend: str  # "torch" | "liger" (CUDA with liger_kernel) | "standard" (full logits: not enabled)
    chunk: int | None  # tokens per chunk of the torch backend at the head's dtype (liger picks its own)
    reason: str | None = None  # why the standard loss is used (or a note)

    def __str__(self) -> str:
        if self.enabled and self.chunk:
            return f"loss: chunked ({self.backend} backend, {self.chunk} tokens per chunk)"
        if self.enabled:
            return f"loss: chunked ({self.backend} backend)"
        return f"loss: standard (full logits): {self.reason}"


_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_NOT_FOR_DECODER = ("labels", "logits_to_keep", "return_dict", "skip_logits") + _LOSS_KWARGS


def causal_lm(model):
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(lm) -> LogitTransform:
    cfg = lm.config
    scale = getattr(lm, "logit_scale", None)  # Cohere stores config.logit_scale on the model
    return LogitTransform(multiply=float(scale) if isinstance(scale, (int, float)) else None,
                          divide=getattr(cfg, "logits_scaling", None),
                          softcap=getattr(cfg, "final_logit_softcapping", None))


def _unsupported(lm) -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        return f"{type(lm).__name__} has no output embeddings (lm_head)"
    if type(head) is not torch.nn.Linear:  # peft LoRA / modules_to_save wrapper, bnb 4-bit, custom heads
        return f"lm_head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear"
    if lm.base_model is lm:
        return f"{type(lm).__name__} has no separate decoder (base_model_prefix)"
    if getattr(lm.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if getattr(lm.config, "output_router_logits", False):
        return "the model adds a router auxiliary loss (output_router_logits)"
    if lm.loss_function is not ForCausalLMLoss:
        return f"{type(lm).__name__} uses {getattr(lm.loss_function, '__name__', 'a custom loss')}, not ForCausalLMLoss"
    if "labels" not in inspect.signature(lm.forward).parameters:
        return f"{type(lm).__name__}.forward takes no labels"
    return None


class _Installed:
    def __init__(self, lm, backend: str, chunk: int | None):
        self.lm, self.head, self.decoder = lm, lm.get_output_embeddings(), lm.base_model
        self.original = lm.forward  # the class's bound forward
        self.signature = inspect.signature(self.original)
        self.var_kw = next((p.name for p in self.signature.parameters.values()
                            if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        dec = inspect.signature(self.decoder.forward).parameters
        self.decoder_takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in dec.values())
        self.decoder_params = set(dec)
        self.transform, self.backend, self.chunk = logit_transform(lm), backend, chunk
        self.linear_forward = self.head.forward

    def head_forward(self, input, _peftplan_loss=None):
        # Through lm_head's own __call__ so that module hooks that materialize its weight run around the loss:
        # FSDP2 unshards a unit's parameters in its pre-forward hook (lm_head in the root unit, or its own) and
        # DeepSpeed ZeRO-3 gathers them per module. Reading lm_head.weight from outside that call would see a
        # shard. The gradients (grad_W included) are computed here, while the weight is whole; backward needs
        # no weight at all.
        if _peftplan_loss is None:
            return self.linear_forward(input)
        return _peftplan_loss(input, self.head.weight, self.head.bias)

    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        named = dict(self.signature.bind(*args, **kwargs).arguments)
        named.update(named.pop(self.var_kw, None) or {})
        has_labels = named.get("labels") is not None or named.get("shift_labels") is not None
        chunked = has_labels and (self.lm.training if skip_logits is None else skip_logits)
        if not chunked or named.get("logits_to_keep", 0) not in (0, None) or named.get("output_router_logits"):
            return self.original(*args, **kwargs)  # (a router's auxiliary loss is added by the model's own forward)
        return self.chunked_forward(named)

    def chunked_forward(self, named: dict):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        loss_kwargs = {k: named[k] for k in _LOSS_KWARGS if k in named}
        labels, return_dict = named.get("labels"), named.get("return_dict")
        dec_kwargs = {k: v for k, v in named.items() if k not in _NOT_FOR_DECODER
                      and (self.decoder_takes_all or k in self.decoder_params)}
        out = self.decoder(**dec_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        loss_fn = functools.partial(_head_loss, labels=labels, transform=self.transform, chunk=self.chunk,
                                    backend=self.backend, **loss_kwargs)
        loss = self.head(hidden, _peftplan_loss=loss_fn)
        result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                        hidden_states=getattr(out, "hidden_states", None),
                                        attentions=getattr(out, "attentions", None))
        return result.to_tuple() if return_dict is False else result


def _patched_forward(cls_forward):
    """A method that defers to the installed state. Bound with MethodType (not a closure over `lm`) so that a
    deepcopy of the model calls its own copy; `wraps` keeps the class forward's signature (the Trainer reads it)."""

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return self._peftplan_loss[0].forward(*args, **kwargs)

    return forward


def _head_loss(hidden, weight, bias, *, labels, **kwargs):
    return causal_lm_loss(hidden, weight, bias, labels, **kwargs)


def install(model, *, backend: str = "auto", chunk: int | None = None, self_check: bool = True) -> LossResult:
    """Make `model` (a causal LM, possibly peft-wrapped; before accelerate/DDP/FSDP wrap it) compute its training
    loss chunk by chunk: with labels (and in training, or with skip_logits=True) forward runs the decoder and the
    loss inside lm_head's call and returns `loss` with `logits=None`; otherwise the model's own forward runs.

    The self-check compares, on 1 × 8 tokens without gradients, the model's own logits and loss with the ones
    this module makes; on a mismatch (a post-processing of the logits it does not know) the standard path is
    restored and the result says why. Nothing is changed when the model is not supported.
    """
    lm = causal_lm(model)
    existing = getattr(lm, "_peftplan_loss", None)
    if existing is not None:
        return existing[1]
    if backend not in ("auto", "torch", "liger"):
        raise ValueError(f"loss backend must be auto, torch or liger, not {backend!r}")
    why = _unsupported(lm)
    if why:
        return LossResult(False, "standard", None, why)
    used = resolve_backend(backend, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    state = _Installed(lm, backend, chunk)
    bits = 16 if state.head.weight.dtype in (torch.float16, torch.bfloat16) else 32
    size = chunk or chunk_tokens(state.head.out_features, bits // 8)
    lm.forward = types.MethodType(_patched_forward(type(lm).forward), lm)
    state.head.forward = state.head_forward
    result = LossResult(True, used, size if used == "torch" else None, None)
    lm._peftplan_loss = (state, result)
    if self_check:
        problem = _self_check(lm, state)
        if problem:
            uninstall(model)
            return LossResult(False, "standard", None, problem)
    return result


def uninstall(model) -> None:
    """Restore the model's own forward (and lm_head's)."""
    lm = causal_lm(model)
    existing = getattr(lm, "_peftplan_loss", None)
    if existing is None:
        return
    state = existing[0]
    for module in (lm, state.head):
        module.__dict__.pop("forward", None)
    del lm._peftplan_loss


def _self_check(lm, state: _Installed) -> str | None:
    weight = state.head.weight
    if not _is_real(weight):
        return None
    vocab = state.head.out_features
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(lm.get_input_embeddings().weight.device)
    backend, state.backend = state.backend, state.backend if weight.device.type == "cuda" else "torch"
    modes = {m: m.training for m in lm.modules()}
    lm.eval()  # no dropout; but bitsandbytes 0.50 permanently repacks a 4-bit weight for CPU inference when its
    for m in modes:  # layer runs in eval mode without grad, which would change the training numerics afterwards
        if type(m).__module__.startswith("bitsandbytes"):
            m.training = True
    try:
        with torch.no_grad():
            ref = state.original(input_ids=ids, labels=ids)
            out = state.decoder(input_ids=ids)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            h = hidden.reshape(-1, hidden.shape[-1])
            cd = compute_dtype(h, weight)
            ours, _ = _chunk_logits(h.to(cd), weight.to(cd), None if state.head.bias is None
                                    else state.head.bias.to(cd), state.transform)
            loss = float(lm(input_ids=ids, labels=ids, skip_logits=True).loss)
            theirs, ref_loss = ref.logits.float().reshape(-1, vocab), float(ref.loss)
    except Exception as exc:  # noqa: BLE001 - any failure here means: keep the model's own loss
        return f"self-check failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for m, mode in modes.items():
            m.training = mode
        state.backend = backend
    low = cd in (torch.float16, torch.bfloat16)
    scale = max(float(theirs.abs().max()), 1.0)
    delta = float((ours.to(theirs.device) - theirs).abs().max())
    if delta > (1e-2 if low else 1e-5) * scale:
        return (f"the chunked logits differ from {type(lm).__name__}'s own by up to {delta:.3g} (of {scale:.3g}): "
                f"the model post-processes its logits in a way this loss does not know")
    if abs(loss - ref_loss) > (1e-2 if low else 1e-5) * max(abs(ref_loss), 1.0):
        return f"the chunked loss {loss:.6g} differs from {type(lm).__name__}'s own {ref_loss:.6g}"
    return None
