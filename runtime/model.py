"""Model loading and method setup: the one place that decides how each method holds its weights.

The planner's estimator (`peftplan.planner.assumptions`) describes exactly what this module does;
a change here changes the estimator and its calibration data in the same commit.

- full:  all weights in the training dtype, all trainable.
- lora:  base in the training dtype, frozen; peft LoRA adapters (fp32: peft upcasts adapter weights).
- qlora: base linear layers of the decoder in 4-bit NF4 with double quantization (bitsandbytes),
         embeddings / norms / lm_head left in the training dtype; LoRA adapters as above.
- dora / qdora: as lora / qlora with `use_dora=True` (a trainable magnitude vector per adapted module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUANTIZED = ("qlora", "qdora")
ADAPTERS = ("lora", "qlora", "dora", "qdora")


@dataclass(frozen=True)
class MethodSetup:
    method: str  # full | lora | qlora | dora | qdora
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    attention: str = "sdpa"
    gradient_checkpointing: bool = True
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    trust_remote_code: bool = False
    shard_quantized: bool = False  # FSDP / ZeRO-3: store 4-bit weights in the compute dtype so they can be sharded
    extra: dict = field(default_factory=dict)


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(setup: MethodSetup):
    if setup.method not in QUANTIZED:
        return None
    from transformers import BitsAndBytesConfig

    kwargs = {"bnb_4bit_quant_storage": torch_dtype(setup.dtype)} if setup.shard_quantized else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(setup.dtype),
        **kwargs,
    )


def load_model(model_path: str, setup: MethodSetup, device_map: Any = None):
    """Load the base model for `setup` (safetensors only) and apply the method."""
    return apply_method(load_base(model_path, setup, device_map), setup)


def load_base(model_path: str, setup: MethodSetup, device_map: Any = None):
    """The base model as `setup` holds it, without the adapter: 16-bit, or for qlora/qdora its decoder linears in
    NF4 (bitsandbytes) and fused MoE experts in NF4 too (runtime/moe.py), each quantized as the loader assigns it so
    the 16-bit experts never all sit on the device at once. Training, merge, evaluate and sample all load it here."""
    from transformers import AutoModelForCausalLM

    from .moe import quantize_experts, quantizing_experts_on_load

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(setup.dtype),
        "attn_implementation": setup.attention,
        "use_safetensors": True,
        "trust_remote_code": setup.trust_remote_code,
    }
    quant = quantization_config(setup)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    with quantizing_experts_on_load(setup):
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return quantize_experts(model, setup)


def apply_method(model, setup: MethodSetup):
    """Gradient checkpointing, then the adapter (LoRA/DoRA) or nothing (full)."""
    model.config.use_cache = False
    if setup.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if setup.method == "full":
        model.requires_grad_(True)
        return model
    if setup.method not in ADAPTERS:
        raise ValueError(f"unknown method {setup.method!r}")
    from peft import LoraConfig, get_peft_model

    from .moe import adapter_targets

    config = LoraConfig(
        r=setup.rank,
        lora_alpha=setup.alpha,
        lora_dropout=setup.dropout,
        # "all-linear" as linear-layer names: peft would otherwise target fused MoE experts' parameters
        target_modules=adapter_targets(model, setup.target_modules),
        use_dora=setup.method in ("dora", "qdora"),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_adapter_inputs_16bit(model) -> int:
    """peft casts each adapted module's input to the adapter's dtype (fp32) before lora_A; under the Trainer's
    autocast lora_A casts it straight back to 16-bit, so every adapted module saves its own 16-bit copy of its
    input (and DoRA builds its weight-norm buffers in fp32), and the backward makes fp32 copies of the gradients.
    The round trip changes no value (16-bit → fp32 → 16-bit is exact), so training turns it off (peft's
    `cast_input_dtype_enabled`, the switch behind `peft.helpers.disable_input_dtype_casting`): modules reading one
    tensor share it, as in full fine-tuning. Only where every forward runs under autocast (training, tracing);
    evaluate/merge/sample keep peft's default. Returns the number of layers switched."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)
