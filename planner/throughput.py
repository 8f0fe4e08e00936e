"""Time and cost: tokens to process, FLOPs per token per method, device throughput × utilization.

FLOPs per token (Kaplan et al. 2020; Chinchilla appendix F; nanoGPT's estimate_mfu): a forward pass
costs 2·N_matmul + attention 2·2·L·s·(a·d)·½ (causal), where N_matmul counts the weights of every
matrix multiplication (decoder linears, MoE experts actually routed, and the output head). The
backward pass costs twice the forward for full fine-tuning (input and weight gradients). With a
frozen base, the weight-gradient half disappears except for the adapters: backward ≈ 1× forward.
Gradient checkpointing adds one more forward of the decoder layers.
Extra work: 4-bit de-quantization (memory-bound; folded into a lower utilization) and DoRA's weight
norm (the merged weight W + s·BA and its column norms: 2·r·in·out + 3·in·out FLOPs per adapted
module in every forward pass, independent of the tokens in it).
Utilization (model FLOPs utilization, MFU) is assumed, not measured: a low-high range per method.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Device
from .terms import Setup

# MFU ranges for single-device HF Trainer training in 16-bit, from published reports: 30-50% is
# typical for dense training of 7-70B models on A100/H100 (e.g. the PaLM paper's 46%, Llama/torchtune
# recipe logs around 35-45%); HF Trainer + peft is usually at the low end. 4-bit de-quantization costs
# QLoRA about 30-40% of LoRA's speed (QLoRA paper's guanaco timings; Unsloth/HF blog measurements);
# peft's DoRA runs ~20% (DoRA paper) to 2x slower than LoRA on the same geometry.
MFU = {
    "full": (0.30, 0.45),
    "lora": (0.25, 0.42),
    "qlora": (0.17, 0.30),
    "dora": (0.20, 0.35),
    "qdora": (0.13, 0.25),
}
CPU_MFU = (0.05, 0.20)  # a CPU rarely reaches a large fraction of its peak in PyTorch training


@dataclass(frozen=True)
class TimeEstimate:
    tokens: int  # tokens processed (padding included unless packed) over all epochs
    useful_tokens: int
    flops_per_token: float
    step_flops: float  # token-independent work per optimizer step (DoRA's norms)
    seconds: float
    low_seconds: float
    high_seconds: float
    peak_flops: float
    mfu: tuple[float, float]
    assumptions: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"tokens": int(self.tokens), "useful_tokens": int(self.useful_tokens),
                "seconds": round(self.seconds, 1), "low_seconds": round(self.low_seconds, 1),
                "high_seconds": round(self.high_seconds, 1), "flops_per_token": self.flops_per_token,
                "peak_flops_per_device": self.peak_flops, "mfu_range": list(self.mfu),
                "assumptions": list(self.assumptions)}


def matmul_params(s: Setup) -> float:
    """Weights multiplied per token: decoder linears (routed experts only) and the output head."""
    sh = s.shape
    per_layer = sum(lin.in_features * lin.out_features * lin.experts * lin.active for lin in sh.linears)
    return sh.num_layers * per_layer + sh.vocab_size * sh.hidden_size


def flops_per_token(method: str, s: Setup) -> tuple[float, list[str]]:
    sh, g = s.shape, s.geometry
    n = matmul_params(s)
    attn = 2 * 2 * sh.num_layers * g.seq_len * sh.num_heads * sh.head_dim * 0.5  # QK^T and AV, causal
    forward = 2 * n + attn
    notes = [f"forward ≈ 2·N + attention = {forward / 1e9:.1f} GFLOP/token (N = {n / 1e9:.2f}B multiplied weights)"]
    if method == "full":
        backward = 2 * forward
        notes.append("full fine-tuning: backward ≈ 2× forward (input and weight gradients)")
    else:
        r = s.adapter.rank
        adapter = 2 * r * sum(l.in_features + l.out_features for l in s.targeted()) * sh.num_layers  # A and B
        backward = forward + 2 * adapter
        notes.append("frozen base: backward ≈ 1× forward (input gradients only) + adapter weight gradients")
        forward += adapter
    total = forward + backward
    if g.gradient_checkpointing:
        total += forward - 2 * sh.vocab_size * sh.hidden_size  # the layers run forward twice
        notes.append("gradient checkpointing: the decoder layers' forward pass runs twice")
    return total, notes


def dora_step_flops(method: str, s: Setup) -> float:
    """DoRA recomputes the merged weight's column norms in every forward pass (twice with checkpointing)."""
    if method not in ("dora", "qdora"):
        return 0.0
    r = s.adapter.rank
    per_layer = sum((2 * r + 3) * l.in_features * l.out_features for l in s.targeted())
    passes = 2 if s.geometry.gradient_checkpointing else 1
    return passes * per_layer * s.shape.num_layers


def device_flops(device: Device, precision: str) -> float:
    if device.is_cpu or precision == "fp32":
        return device.fp32_tflops * 1e12
    return (device.bf16_tflops if precision == "bf16" else device.fp16_tflops) * 1e12


def estimate_time(method: str, s: Setup, device: Device, precision: str, *, num_examples: int,
                  avg_tokens: int | None, epochs: float, packing: bool, micro_batch: int,
                  devices: int = 1) -> TimeEstimate | None:
    peak = device_flops(device, precision)
    if peak <= 0:
        return None
    seq = s.geometry.seq_len
    avg = min(avg_tokens or seq, seq)
    useful = num_examples * avg * epochs
    processed = useful if packing else num_examples * seq * epochs  # padded rows cost the full seq_len
    per_token, notes = flops_per_token(method, s)
    sequences_per_step = micro_batch * devices
    steps = (processed / seq) / sequences_per_step  # micro-steps over all devices
    step_extra = dora_step_flops(method, s)
    total = processed * per_token + steps * step_extra
    lo_mfu, hi_mfu = CPU_MFU if device.is_cpu else MFU[method]
    low = total / (peak * devices * hi_mfu)
    high = total / (peak * devices * lo_mfu)
    mid = total / (peak * devices * (lo_mfu + hi_mfu) / 2)
    notes.append(f"{device.id}: {peak / 1e12:g} TFLOPS dense {precision} per device, utilization {lo_mfu:.0%}–{hi_mfu:.0%}")
    if not packing and avg < seq:
        notes.append(f"padded to seq_len: {processed / max(useful, 1):.1f}× the useful tokens are computed (packing would avoid it)")
    if step_extra:
        notes.append("DoRA: the merged weight's norm is recomputed every forward pass")
    return TimeEstimate(tokens=int(processed), useful_tokens=int(useful), flops_per_token=per_token,
                        step_flops=step_extra, seconds=mid, low_seconds=low, high_seconds=high, peak_flops=peak,
                        mfu=(lo_mfu, hi_mfu), assumptions=tuple(notes))
