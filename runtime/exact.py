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

from . import quiet  # noqa: F401  (filters known-harmless library warnings before they load)


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


def meta_model(config: dict, *, dtype: str = "bfloat16", attention: str = "sdpa"):
    """(transformers config, model) built from a config.json dictionary on the meta device: no memory, no weights.

    trust_remote_code stays off: a model_type transformers does not ship raises ValueError."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import torch_dtype

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no model_type")
    for key in ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"transformers does not know model_type {model_type!r} ({exc})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype), attn_implementation=attention)
    return hf_config, model


def _make_fake(model, fake) -> None:
    """Every parameter and buffer of `model` swapped for a FakeTensor of `fake` on the CPU (no memory, no values)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
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


def _base_linear_numels(model) -> list[int]:
    """The weight sizes of what 4-bit loading would quantize: the decoder's linears (no adapter, no lm_head)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_weights: list[int] = []
    base_layer_ids = set()
    for name, module in model.named_modules():  # what 4-bit loading would quantize: decoder linears
        if isinstance(module, (torch.nn.Linear, Conv1D)) and "lora_" not in name and not name.endswith("lm_head"):
            if id(module) not in base_layer_ids:
                base_layer_ids.add(id(module))
                linear_weights.append(module.weight.numel())
    return linear_weights


def trace(config: dict, *, method: str, dtype: str = "bfloat16", attention: str = "sdpa",
          gradient_checkpointing: bool = True, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
          target_modules="all-linear", batch: int = 1, seq: int = 2048, loss: str = "chunked",
          grads_held: bool = False) -> dict:
    """Peak bytes of one training step (forward + backward) of `config` under `method`.

    `grads_held`: the gradients already exist when the step starts (gradient accumulation's later micro-batches):
    they are made before the trace and belong to its baseline, so backward adds into them as it does in training
    (the caller counts them once, as a static term); otherwise backward creates them and the peak includes them.

    `loss`: "chunked" runs the runtime's chunked head + cross-entropy (runtime.loss, torch backend: the CPU's)
    as training does by default; "full" is transformers' own loss (tokens x vocabulary logits)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .memprobe import LiveTensorBytes
    from .model import MethodSetup, apply_method, torch_dtype

    t0 = time.perf_counter()
    hf_config, model = meta_model(config, dtype=dtype, attention=attention)
    traced_method = {"qlora": "lora", "qdora": "dora"}.get(method, method)
    setup = MethodSetup(method=traced_method, dtype=dtype, attention=attention,
                        gradient_checkpointing=gradient_checkpointing, rank=rank, alpha=alpha, dropout=dropout,
                        target_modules=target_modules)
    model = apply_method(model, setup)
    loss_used = "full"
    if loss == "chunked":
        from .loss import install

        result = install(model, backend="torch", self_check=False)  # the self-check needs real values
        loss_used = "chunked" if result.enabled else f"full ({result.reason})"
    if dtype != "float32":  # as runtime/train.py trains: adapter inputs stay 16-bit under autocast
        from .model import keep_adapter_inputs_16bit

        keep_adapter_inputs_16bit(model)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    _make_fake(model, fake)
    linear_weights = _base_linear_numels(model)
    model.train()
    params = list(model.parameters())
    trainable = [[int(p.numel()), int(p.element_size())] for p in params if p.requires_grad]
    frozen_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    compute = torch_dtype(dtype)
    with _no_data_dependent_masks(), fake:
        ids = torch.randint(0, int(hf_config.get_text_config().vocab_size), (batch, seq))
        if grads_held:
            for p in params:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        held = [p.grad for p in params if p.grad is not None]
        tracker = LiveTensorBytes([p.data for p in params] + list(model.buffers()) + held)
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
        "loss": loss_used,
    }


# --- describe: the structure of any architecture, for the planner's closed form ---------------------

def _decoder_layers(model):
    """(path, ModuleList) of the decoder layers: the longest ModuleList of identically typed blocks."""
    import torch

    best = ("", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best[1] is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def _is_norm(module) -> bool:
    import torch

    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    own = list(module.parameters(recurse=False))
    return "norm" in name and not list(module.children()) and 0 < len(own) <= 2


def _linears(module):
    import torch
    from transformers.pytorch_utils import Conv1D

    for path, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            yield path, m, m.in_features, m.out_features
        elif isinstance(m, Conv1D):
            yield path, m, m.weight.shape[0], m.weight.shape[1]


def _feeds(model, layer) -> dict[str, str] | None:
    """Which tensor feeds each linear module of `layer`: a meta forward pass with hooks groups the
    modules that read the same tensor object. None when the forward pass cannot run on meta tensors."""
    import torch

    seen: dict[int, str] = {}
    feeds: dict[str, str] = {}
    alive = []  # keep every input alive: a freed tensor's id() can be reused by the next one
    hooks = []
    for path, m, _, _ in _linears(layer):
        def hook(mod, args, path=path):
            alive.append(args[0] if args else None)
            key = id(args[0]) if args else 0
            if key not in seen:
                seen[key] = "attn_in" if not seen else f"in{len(seen)}"
            feeds.setdefault(path, seen[key])
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with _no_data_dependent_masks(), torch.no_grad():
            model(input_ids=torch.zeros((1, 8), dtype=torch.long, device="meta"))
    except Exception:  # data-dependent control flow on meta tensors: fall back to module names
        return None
    finally:
        for h in hooks:
            h.remove()
    return feeds


def describe(config: dict) -> dict:
    """A plain description of any transformers causal LM built from `config` on the meta device: per decoder
    layer its linear modules (name, in/out features, bias, which tensor feeds them), its norms, the rest of its
    parameters; embeddings, head, vocabulary and attention geometry. No planner types: plain values only."""
    import torch

    t0 = time.perf_counter()
    hf_config, model = meta_model(config, dtype="bfloat16", attention="eager")
    text = hf_config.get_text_config()
    path, layers = _decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    vocab = int(text.vocab_size)
    layer = layers[0]
    feeds = _feeds(model, layer)
    linears = []
    for lpath, m, n_in, n_out in _linears(layer):
        linears.append({"name": lpath.split(".")[-1], "path": lpath, "in_features": int(n_in),
                        "out_features": int(n_out), "bias": getattr(m, "bias", None) is not None,
                        "input": feeds.get(lpath) if feeds else None})
    norms = []
    for npath, m in layer.named_modules():
        if npath and _is_norm(m):
            w = getattr(m, "weight", None)
            norms.append({"path": npath, "width": int(w.numel()) if w is not None else 0,
                          "bias": getattr(m, "bias", None) is not None,
                          "params": int(sum(p.numel() for p in m.parameters(recurse=False)))})
    layer_params = [int(sum(p.numel() for p in block.parameters())) for block in layers]
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    positions = sum(int(m.num_embeddings) for name, m in model.named_modules()  # a learned one: GPT-2's wpe
                    if isinstance(m, torch.nn.Embedding) and m is not emb and m.num_embeddings == max_pos
                    and name != path and not name.startswith(path + "."))
    unique = {id(p): p.numel() for p in model.parameters()}
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
    kv = getattr(text, "num_key_value_heads", None)
    if kv is None:
        kv = 1 if getattr(text, "multi_query", False) else getattr(text, "num_kv_heads", None) or heads
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    head_dim = int(getattr(text, "head_dim", None) or (hidden // heads if heads else 0))
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or getattr(text, "ffn_dim", None)
    act = next((getattr(text, k) for k in ("hidden_act", "hidden_activation", "activation_function")
                if isinstance(getattr(text, k, None), str)), "unknown")
    drops = {k: float(v) for k, v in text.to_dict().items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and ("dropout" in k or "pdrop" in k)}
    return {
        "model_type": str(config.get("model_type")),
        "num_layers": len(layers),
        "layer_params": layer_params,
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": int(kv),
        "head_dim": head_dim,
        "intermediate_size": int(inter) if inter else None,
        "vocab_size": vocab,
        "max_positions": max_pos,
        "activation": str(act),
        "dropouts": drops,
        "supports_sdpa": bool(getattr(model, "_supports_sdpa", False)),
        "linears": linears,
        "inputs_from": "forward" if feeds else "names",
        "norms": norms,
        "learned_positions": positions,
        "tie_embeddings": bool(tied),
        "lm_head_bias": head is not None and getattr(head, "bias", None) is not None,
        "parameters": int(sum(unique.values())),
        "seconds": time.perf_counter() - t0,
    }
