"""Exact mode: trace one training step of any transformers causal LM without allocating it.

The model is built from its config on the meta device, the method is applied (peft LoRA/DoRA), and
every parameter and buffer is re-wrapped as a FakeTensor on the CPU. One forward and backward pass
then runs PyTorch's real kernels' shape logic — the same ops, autocast casts and saved tensors as a
real CPU step, measured on the CPU to agree byte for byte with runtime.memprobe — while a
dispatch mode counts live storage bytes. Nothing is allocated but shapes.

bitsandbytes' 4-bit kernels cannot run on fake tensors: QLoRA/QDoRA are traced with a 16-bit frozen
base (autograd saves the same activations: the 4-bit matmul keeps only the quantized weight) and the
caller replaces the 16-bit linear weights by their NF4 storage analytically (planner.exact).
Kernels are the CPU ones: fused attention saves the same tensors as CUDA's (output, log-sum-exp);
dropout masks have the input's dtype here where CUDA keeps 1-byte masks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def _no_data_dependent_masks():
    """transformers inspects position_ids for packed sequences with .item(); a traced batch is unpacked."""
    import transformers.masking_utils as mu

    saved = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = saved


def trace(config: dict, *, method: str, dtype: str = "bfloat16", attention: str = "sdpa",
          gradient_checkpointing: bool = True, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
          target_modules="all-linear", batch: int = 1, seq: int = 2048) -> dict:
    """Peak bytes of one training step (forward + backward) of `config` under `method`."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from .memprobe import LiveTensorBytes
    from .model import MethodSetup, apply_method, torch_dtype

    t0 = time.perf_counter()
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for key in ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    traced_method = {"qlora": "lora", "qdora": "dora"}.get(method, method)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype), attn_implementation=attention)
    setup = MethodSetup(method=traced_method, dtype=dtype, attention=attention,
                        gradient_checkpointing=gradient_checkpointing, rank=rank, alpha=alpha, dropout=dropout,
                        target_modules=target_modules)
    model = apply_method(model, setup)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    cpu = torch.device("cpu")
    linear_weights: list[int] = []
    swapped: dict[int, object] = {}  # shared (tied) tensors stay shared
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in swapped:
                    swapped[id(p)] = torch.nn.Parameter(FakeTensor(fake, p.data, cpu), requires_grad=p.requires_grad)
                module._parameters[name] = swapped[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in swapped:
                    swapped[id(b)] = FakeTensor(fake, b, cpu)
                module._buffers[name] = swapped[id(b)]
    from transformers.pytorch_utils import Conv1D

    base_layer_ids = set()
    for name, module in model.named_modules():  # what 4-bit loading would quantize: decoder linears
        if isinstance(module, (torch.nn.Linear, Conv1D)) and "lora_" not in name and not name.endswith("lm_head"):
            if id(module) not in base_layer_ids:
                base_layer_ids.add(id(module))
                linear_weights.append(module.weight.numel())
    model.train()
    params = list(model.parameters())
    trainable = [[int(p.numel()), int(p.element_size())] for p in params if p.requires_grad]
    frozen_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    compute = torch_dtype(dtype)
    with _no_data_dependent_masks(), fake:
        ids = torch.randint(0, int(hf_config.get_text_config().vocab_size), (batch, seq))
        tracker = LiveTensorBytes([p.data for p in params] + list(model.buffers()))
        with tracker:
            with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
                out = model(input_ids=ids, labels=ids)
            loss = out.loss
            del out
            loss.backward()
            del loss
    return {
        "method_traced": traced_method,
        "static_bytes": int(tracker.baseline),
        "frozen_bytes": int(frozen_bytes),
        "buffer_bytes": int(buffer_bytes),
        "trainable": trainable,
        "step_peak_bytes": int(tracker.peak - tracker.baseline),
        "linear_weight_numels": linear_weights,
        "parameters": int(sum(p.numel() for p in params)),
        "seconds": time.perf_counter() - t0,
        "kernels": "cpu",
    }
