"""What a plan must say about itself even though it fits: each caveat is a function of the shape, the
method and the numbers, so it disappears by itself when what it warns about is fixed.

- Mixture-of-experts bases (`moe`): transformers 5 stores each layer's experts as fused 3D parameters,
  not nn.Linear modules, so bitsandbytes' 4-bit loading leaves them in 16-bit and peft's all-linear
  adapters skip them (planner/assumptions.py: only the decoder's nn.Linear modules are quantized). The caveat is
  computed from the 4-bit estimate's own count of quantized weights (its `P_q` input) and from the modules the
  adapter targets: once the runtime quantizes or adapts the experts, the estimate counts them and the caveat goes.
- Pure-bf16 full fine-tuning (`bf16_rounding`): the runtime keeps full fine-tuning's weights in bf16
  (assumptions.py). bf16 keeps 8 significant bits, so a weight moves only if the update is at least half a
  unit in the last place, 2^-9 of its magnitude; AdamW's per-step change is about the learning rate, so at
  lr every weight larger than lr · 2^9 in magnitude keeps its value ("nearest rounding for model weight
  updates often cancels small updates", Zamirai et al. 2020, "Revisiting BFloat16 Training").
  Llama-style weights are initialized with std 0.02 (config initializer_range), so at 1e-5 (|w| > 0.005)
  about 80% of them; at 2e-5 (|w| > 0.01) about 60%.
"""

from __future__ import annotations

import math

from .memory import MemoryEstimate
from .shapes import ModelShape
from .terms import Setup

INIT_STD = 0.02  # initializer_range of Llama, Mistral, Qwen2 and Gemma configs
BF16_HALF_ULP = 2.0**-9


def expert_weight_params(shape: ModelShape) -> int:
    """Weights of the experts' matrices over all layers."""
    return round(shape.num_layers * sum(lin.experts * lin.in_features * lin.out_features
                                        * lin.layer_share
                                        for lin in shape.linears if lin.experts > 1))


def quantized_params(est: MemoryEstimate) -> int | None:
    """How many weights the estimate stores in 4-bit (its `P_q` input), None for a 16-bit base."""
    for term in est.terms:
        if term.component == "weights" and "P_q" in term.inputs:
            return int(term.inputs["P_q"])
    return None


def unquantized_expert_params(shape: ModelShape, est: MemoryEstimate) -> int:
    """Expert weights a 4-bit estimate leaves in 16-bit (0 for a dense model or a 16-bit base)."""
    experts = expert_weight_params(shape)
    q = quantized_params(est)
    if not experts or q is None:
        return 0
    dense = shape.num_layers * sum(lin.in_features * lin.out_features for lin in shape.linears
                                   if lin.experts == 1 and lin.is_linear)
    return max(0, experts - max(0, q - dense))


def unadapted_expert_params(shape: ModelShape, setup: Setup) -> int:
    """Expert weights the adapter does not target."""
    targeted = {id(lin) for lin in setup.targeted()}
    return shape.num_layers * sum(lin.experts * lin.in_features * lin.out_features
                                  for lin in shape.linears if lin.experts > 1 and id(lin) not in targeted)


def moe(model_name: str, shape: ModelShape, setup: Setup, estimates: dict[str, MemoryEstimate]) -> list[str]:
    """Why a mixture-of-experts plan costs what it does (empty for dense models)."""
    if not shape.num_experts:
        return []
    out = []
    share = expert_weight_params(shape) / shape.parameters
    q = next((e for name, e in estimates.items() if quantized_params(e) is not None), None)
    left = unquantized_expert_params(shape, q) if q is not None else 0
    if left:
        plain = estimates.get("lora")
        compare = (f": QLoRA needs {q.device_total_bytes / 2**30:.1f} GiB against LoRA's "
                   f"{plain.device_total_bytes / 2**30:.1f} GiB" if plain is not None else "")
        out.append(f"{model_name} is a mixture of experts ({shape.num_experts} per layer, {share:.0%} of its weights): "
                   f"4-bit loading leaves {left / 1e9:.1f}B expert weights in 16-bit (transformers 5 stores them as "
                   f"fused 3D parameters, not linear layers), so a 4-bit base saves little{compare}")
    if unadapted_expert_params(shape, setup):
        out.append(f"{model_name}: adapters skip the experts (fused 3D parameters, not linear layers): only the "
                   "attention projections are adapted")
    return out


def bf16_rounding(method: str, precision: str, learning_rate: float, weights_dtype: str) -> str | None:
    """Pure-bf16 full fine-tuning loses small updates to rounding; say how many at this learning rate."""
    if method != "full" or precision != "bf16" or weights_dtype != "bfloat16":
        return None
    threshold = learning_rate / BF16_HALF_ULP
    lost = math.erfc(threshold / (INIT_STD * math.sqrt(2)))  # P(|w| > threshold), w ~ N(0, 0.02²)
    return (f"full fine-tuning keeps bf16 weights: an AdamW step (≈ learning rate {learning_rate:g}) is rounded away "
            f"for every weight with |w| > {threshold:.3g} (half a bf16 unit, 2^-9 of |w|) — about {lost:.0%} of "
            "weights initialized with std 0.02 (Zamirai et al. 2020). Consider LoRA, or model.dtype = \"float32\" "
            "(fp32 weights: 16 bytes per parameter with AdamW)")
