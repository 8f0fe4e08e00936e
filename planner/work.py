"""The work of one training step: FLOPs of a micro-step, and the memory-bound bytes the step moves.

Counted per device, for a micro-step of T token positions and A attention pairs (planner.tokens), as the runtime
trains (transformers + peft + bitsandbytes, Trainer with gradient clipping at 1.0, runtime/optim.py's optimizers):

Matmul FLOPs (Kaplan et al. 2020 §2.1; Chinchilla appendix F; nanoGPT estimate_mfu). N = weights multiplied per
token: every decoder linear (routed MoE experts weighted by top_k / experts) and the output head.
    forward                  2·N·T
    input gradients          2·N·T              (frozen or not: backward always needs them)
    weight gradients         2·N·T              full fine-tuning only
    recomputation            2·N_layers·T       with gradient checkpointing (the decoder layers run forward twice)
    adapters (LoRA, DoRA)    2·r·(in+out)·T per adapted module forward, 4·r·(in+out)·T backward (input and weight
                             gradients), forward again when recomputed (Hu et al. 2021: B·A·x as two thin matmuls)
    DoRA with dropout        peft's DoraLinearVariant runs the base matmul again on the dropped input: 2·W·T forward,
                             2·W·T input gradient, 2·W·T recomputed (W = the adapted weights)
Attention FLOPs, per layer and head, per query-key pair the kernel computes (planner.tokens counts the pairs):
    forward 4·d (QKᵀ and AV, 2·d each); backward 2.5× the forward for fused kernels (FlashAttention-2, Dao 2023;
    Dao-AILab/flash-attention benchmarks/benchmark_flash_attention.py counts 2.5× the forward's FLOPs for the backward:
    five matmuls against two, QKᵀ recomputed), 2× for eager (four matmuls against two);
    forward again when recomputed. Sliding-window layers see at most `window` keys per query.
DoRA's weight norm (peft DoraLinearLayer.forward, every forward pass, token-independent): lora_B(lora_A(I_in)) builds
    the in×out update from an in×in identity (2·in²·r + 2·in·r·out FLOPs), then ‖W + s·ΔW‖ per output row (3·in·out).
    Its memory traffic is what costs: the base weight copied to the adapter dtype (fp32, peft's autocast_adapter_dtype),
    s·ΔW, the sum and the norm read: (w + 28) bytes per weight (w = stored bytes, + dequantization for QDoRA) and the
    fp32 identity (8·in² bytes written and read).
4-bit de-quantization (bitsandbytes MatMul4Bit): every pass over a 4-bit linear de-quantizes the whole weight (forward,
    recomputation, and again for the input gradient): 0.5 byte of NF4 read + 2 bytes of 16-bit weight written (the
    matmul then reads it as it reads any 16-bit weight) = 2.5 bytes per weight and pass, whatever the micro-batch:
    its share of the step shrinks as T grows.
Optimizer step (per optimizer step, memory-bound): bytes per trainable element e (its stored bytes):
    torch fused AdamW 7e (read weight, gradient, two states; write weight, two states; torch _fused_adamw), gradient
    clipping 3e (the Trainer's clip_grad_norm_: a norm read and an in-place scale), the runtime's NaN guard 1e
    (a foreach norm); foreach AdamW (torch's default before `fused`) 20e (nine foreach kernels); 8-bit AdamW
    (bitsandbytes blockwise) 3e + 4 bytes of uint8 states; SGD 3e. Accumulating gradients adds 3e per micro-step
    after the first (AccumulateGrad's in-place add). Sharded (FSDP, ZeRO) optimizer state: ÷ devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import METHODS
from .terms import Setup

FLASH_BACKWARD = 2.5  # flash-attention's benchmark_flash_attention.py: backward FLOPs = 2.5 × forward
EAGER_BACKWARD = 2.0  # four matmuls (dS·K, dSᵀ·Q, Pᵀ·dO, dO·Vᵀ) against the forward's two
DEQUANT_BYTES = 2.5  # per 4-bit weight and pass: NF4 read (0.5) + the 16-bit weight written (2)
# per weight: fp32 copy of W (4 written), s·ΔW (4 read, 4 written), W + s·ΔW (8 read, 4 written), the norm (4 read)
DORA_BYTES_OVER_WEIGHT = 28

# bytes moved per trainable element per optimizer step, as multiples of its stored bytes (e) plus fixed bytes
OPTIMIZER_TRAFFIC = {  # name: (multiple of e, extra bytes)
    "adamw_torch": (7 + 3 + 1, 0),  # runtime: adamw_torch_fused + clipping + NaN guard
    "adamw_torch_foreach": (20 + 3, 0),  # published runs on torch's foreach AdamW (no NaN guard)
    "adamw_8bit": (3 + 3 + 1, 4),
    "paged_adamw_8bit": (3 + 3 + 1, 4),
    "paged_adamw_32bit": (3 + 3 + 1, 16),
    "sgd": (3 + 3 + 1, 0),
}


@dataclass(frozen=True)
class StepWork:
    """One device's work: per micro-step (FLOPs, bytes, layer passes) and per optimizer step (optimizer bytes)."""

    matmul_flops: float  # per micro-step: linears, output head, adapters
    attention_flops: float  # per micro-step
    weight_flops: float  # per micro-step, token-independent (DoRA's weight norm)
    dequant_bytes: float  # per micro-step: 4-bit de-quantization
    dora_bytes: float  # per micro-step: DoRA's weight-norm traffic
    accumulate_bytes: float  # per micro-step after the first of an optimizer step
    optimizer_bytes: float  # per optimizer step
    layer_passes: int  # decoder layers run per micro-step (forward, backward, recomputation)
    notes: tuple[str, ...]

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops + self.weight_flops


def multiplied_weights(s: Setup) -> tuple[float, float]:
    """(weights multiplied per token in the decoder layers, in the output head)."""
    sh = s.shape
    layers = sh.num_layers * sum(lin.in_features * lin.out_features * lin.experts * lin.active * lin.layer_share
                                 for lin in sh.linears)
    return float(layers), float(sh.vocab_size * sh.hidden_size)


def _attention_layers(s: Setup, tokens: float, pairs: float) -> float:
    """Σ over layers of the pairs each computes (sliding-window layers: at most `window` keys per query)."""
    sh = s.shape
    if sh.sliding_layers and sh.sliding_window:
        capped = min(pairs, tokens * sh.sliding_window)
        return (sh.num_layers - sh.sliding_layers) * pairs + sh.sliding_layers * capped
    return sh.num_layers * pairs


def optimizer_bytes(method: str, s: Setup, optimizer: str | None = None, shards: int = 1,
                    trainable_bytes: int | None = None) -> tuple[float, float]:
    """(bytes the optimizer step moves on one device, bytes one more accumulated micro-step moves), per the module
    docstring; `trainable_bytes` overrides the stored bytes per trainable element (4 for FSDP's fp32 upcast)."""
    mult, extra = OPTIMIZER_TRAFFIC.get(optimizer or s.optimizer, OPTIMIZER_TRAFFIC["adamw_torch"])
    step = stored = 0.0
    for t in METHODS[method].trainable_tensors(s):
        e = trainable_bytes or t.bytes_per
        step += t.elements * (mult * e + extra)
        stored += t.elements * e
    n = max(shards, 1)
    return step / n, 3 * stored / n


def step_work(method: str, s: Setup, tokens: float, pairs: float, *, optimizer: str | None = None, shards: int = 1,
              trainable_bytes: int | None = None) -> StepWork:
    """The work of one micro-step of `tokens` positions and `pairs` attention pairs, and of the optimizer step."""
    m = METHODS[method]
    gc = s.geometry.gradient_checkpointing
    n_layers, n_head = multiplied_weights(s)
    n = n_layers + n_head
    matmul = (2 + 2 + (0 if m.adapter else 2)) * n * tokens + (2 * n_layers * tokens if gc else 0)
    notes = [f"matmuls: {(6 if not m.adapter else 4) + (2 if gc else 0) * n_layers / n:.1f}·N FLOPs per token "
             f"(N = {n / 1e9:.2f}B multiplied weights: forward 2N, input gradients 2N"
             f"{', weight gradients 2N' if not m.adapter else ' (frozen base: no weight gradients)'}"
             f"{', recomputation 2N of the layers' if gc else ''})"]
    adapter_matmul, weight_flops, dora_bytes = _adapter_work(m, s, tokens, n, notes) if m.adapter else (0.0, 0.0, 0.0)
    attention = _attention_work(s, tokens, pairs, notes)
    dequant = _dequant_work(s, notes) if m.quantized else 0.0
    opt, accumulate = optimizer_bytes(method, s, optimizer, shards, trainable_bytes)
    passes = s.shape.num_layers * (3 if gc else 2)
    return StepWork(matmul + adapter_matmul, attention, weight_flops, dequant, dora_bytes, accumulate, opt, passes,
                    tuple(notes))


def _adapter_work(m, s: Setup, tokens: float, n: float, notes: list[str]) -> tuple[float, float, float]:
    """(the adapters' matmul FLOPs, DoRA's weight-norm FLOPs, DoRA's weight-norm memory traffic) of a micro-step."""
    sh, gc, r = s.shape, s.geometry.gradient_checkpointing, s.adapter.rank
    targeted = s.targeted()  # computed once: peft's matching of target_modules
    thin = sh.num_layers * sum(2 * r * (lin.in_features + lin.out_features) * lin.experts * lin.active
                               * lin.layer_share for lin in targeted)
    matmul = thin * tokens * (3 + (1 if gc else 0))
    if not m.dora:
        return matmul, 0.0, 0.0
    if s.adapter.dropout > 0:
        w = sh.num_layers * sum(lin.in_features * lin.out_features * lin.experts * lin.active * lin.layer_share
                                for lin in targeted)
        matmul += (6 if gc else 4) * w * tokens
        share = (6 if gc else 4) * w / ((4 + (2 if gc else 0)) * n)
        notes.append(f"DoRA with dropout {s.adapter.dropout:g}: every adapted module's base matmul runs again on "
                     f"the dropped input (peft's DoraLinearVariant), +{share:.0%} matmul FLOPs")
    passes = 2 if gc else 1
    per = sum((2 * lin.in_features ** 2 * r + (2 * r + 3) * lin.in_features * lin.out_features) * lin.experts
              * lin.layer_share for lin in targeted)
    stored = 2.5 if m.quantized else s.compute_bytes  # QDoRA de-quantizes W for the norm
    per_bytes = sum(((stored + DORA_BYTES_OVER_WEIGHT) * lin.in_features * lin.out_features
                     + 8 * lin.in_features ** 2) * lin.experts * lin.layer_share for lin in targeted)
    dora_bytes = passes * sh.num_layers * per_bytes
    notes.append(f"DoRA: the weight norm is recomputed every forward pass ({passes}× per micro-step): "
                 f"{dora_bytes / 1e9:.1f} GB of memory traffic")
    return matmul, passes * sh.num_layers * per, dora_bytes


def _attention_work(s: Setup, tokens: float, pairs: float, notes: list[str]) -> float:
    """Attention's FLOPs over the query-key pairs: forward, backward and (with checkpointing) recomputation."""
    sh, gc = s.shape, s.geometry.gradient_checkpointing
    fwd_attn = 4 * sh.num_heads * sh.head_dim * _attention_layers(s, tokens, pairs)
    back = EAGER_BACKWARD if s.geometry.attention == "eager" else FLASH_BACKWARD
    attention = fwd_attn * (1 + back + (1 if gc else 0))
    notes.append(f"attention: {attention / max(tokens, 1) / 1e9:.2f} GFLOP per position (forward 4·d per query-key "
                 f"pair, backward {back:g}× it{', recomputed' if gc else ''})")
    return attention


def _dequant_work(s: Setup, notes: list[str]) -> float:
    """Bytes of NF4 de-quantization per micro-step: every pass over the 4-bit weights."""
    sh = s.shape
    quantized = sh.num_layers * sum(lin.in_features * lin.out_features * lin.experts * lin.layer_share
                                    for lin in sh.linears)
    passes = 3 if s.geometry.gradient_checkpointing else 2
    dequant = passes * DEQUANT_BYTES * quantized
    notes.append(f"4-bit: every pass de-quantizes the weights ({passes}× per micro-step, "
                 f"{dequant / 1e9:.0f} GB of memory traffic, independent of the micro-batch)")
    return dequant
