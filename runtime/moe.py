"""Mixture-of-experts under 4-bit (QLoRA / QDoRA): the routed experts stored in NF4, not left in 16-bit.

transformers 5 keeps each layer's routed experts as fused 3-D parameters (Mixtral, Qwen3-MoE, OLMoE, GraniteMoE:
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; gpt-oss and Llama 4 store them transposed,
[E, H, 2I] and [E, I, H]). bitsandbytes' 4-bit loading converts `nn.Linear` modules only, so without this module
the experts — 96% of Mixtral-8x7B's weights — stay in the compute dtype (bitsandbytes issue #1849).

What the runtime does (planner/methods/nf4.py counts exactly this; planner/assumptions.py says it in words):

- every expert's matrix is quantized on its own with `bitsandbytes.functional.quantize_4bit` (NF4, blocks of 64,
  `compress_statistics=True`: QLoRA's double quantization) in the [out, in] orientation `matmul_4bit` expects,
  and kept as non-persistent buffers of the experts module: packed data [E, n/2] uint8, absmax [E, n/64] uint8,
  nested absmax [E, n/64/256] fp32, offset [E] fp32, and one NF4 code (16 fp32) and one nested code (256 fp32)
  per module. Routers and expert biases stay in the compute dtype; shared experts and dense MLPs are `nn.Linear`
  and are already NF4 through 4-bit loading.
- forward: each expert that receives tokens goes through `bitsandbytes.matmul_4bit`, which de-quantizes that one
  expert matrix, multiplies the routed tokens and frees it; its backward de-quantizes it again. Nothing 16-bit is
  kept for backward, and the largest transient is one expert's matrix, not the fused tensor.
- loading: inside `quantizing_experts_on_load()`, a torch parameter-registration hook quantizes each fused tensor
  the moment the loader assigns it, so at most one fused 16-bit tensor exists at a time; `quantize_experts` then
  finishes the conversion (and quantizes any experts a load without the context left in 16-bit).
- adapters: `all-linear` means the nn.Linear / Linear4bit modules (attention, shared experts, dense MLPs); peft's
  `target_parameters` cannot wrap NF4 experts (they are no longer `nn.Parameter`s), see `adapter_targets`.
"""

from __future__ import annotations

from contextlib import contextmanager
from math import ceil

import torch
from torch import nn

QUANTIZED = ("qlora", "qdora")
MATRICES = ("gate_up_proj", "up_proj", "down_proj")  # fused expert matrices, as transformers 5 names them
BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256
_BUFFERS = ("data", "absmax", "absmax2", "offset")


# ---------------------------------------------------------------------------------------------- recognising experts


def is_experts(module: nn.Module) -> bool:
    """A transformers 5 experts container: `num_experts` and at least one fused matrix (3-D, or already NF4)."""
    if not hasattr(module, "num_experts"):
        return False
    if getattr(module, "_nf4_shapes", None) or module.__dict__.get("_nf4_pending"):
        return True
    return any(isinstance(module._parameters.get(name), torch.Tensor) and module._parameters[name].dim() == 3
               for name in MATRICES)


def _transposed(module: nn.Module) -> bool:
    """[E, in, out] storage (gpt-oss through `use_experts_implementation(is_transposed=True)`; Llama 4's bmm layout)."""
    if hasattr(module, "is_transposed"):
        return bool(module.is_transposed)
    return type(module).__name__ == "Llama4TextExperts"


# ---------------------------------------------------------------------------------------------- quantization


def _quantize_stack(weight: torch.Tensor, transposed: bool) -> dict:
    """NF4 + double quantization of each expert of a fused [E, out, in] (or [E, in, out]) tensor, one at a time."""
    import bitsandbytes.functional as bnbf

    num_experts = weight.shape[0]
    out_f, in_f = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    n = out_f * in_f
    blocks = ceil(n / BLOCKSIZE)
    dev = weight.device
    store = {
        "data": torch.empty(num_experts, (n + 1) // 2, dtype=torch.uint8, device=dev),
        "absmax": torch.empty(num_experts, blocks, dtype=torch.uint8, device=dev),
        "absmax2": torch.empty(num_experts, ceil(blocks / NESTED_BLOCKSIZE), dtype=torch.float32, device=dev),
        "offset": torch.empty(num_experts, dtype=torch.float32, device=dev),
    }
    code = code2 = None
    for e in range(num_experts):
        w = weight[e].t() if transposed else weight[e]
        packed, qs = bnbf.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                        quant_type="nf4")
        store["data"][e].copy_(packed.view(-1))
        store["absmax"][e].copy_(qs.absmax)
        store["absmax2"][e].copy_(qs.state2.absmax)
        store["offset"][e].copy_(qs.offset)
        code, code2 = qs.code, qs.state2.code
    store["code"], store["code2"] = code, code2
    store["shape"] = (out_f, in_f)
    store["dtype"] = weight.dtype
    return store


def _install(module: nn.Module, name: str, store: dict) -> None:
    """Replace the fused parameter `name` by its NF4 buffers."""
    module._parameters.pop(name, None)
    for key in _BUFFERS:
        module.register_buffer(f"{name}_nf4_{key}", store[key], persistent=False)
    if "nf4_code" not in module._buffers:  # one NF4 code and one nested code per module (identical tables)
        module.register_buffer("nf4_code", store["code"], persistent=False)
        module.register_buffer("nf4_code2", store["code2"], persistent=False)
    module._nf4_shapes = {**getattr(module, "_nf4_shapes", {}), name: store["shape"]}
    module._nf4_dtype = store["dtype"]


def _convert(module: nn.Module, compute_dtype: torch.dtype | None) -> None:
    """Quantize one experts module in place (or install what the load hook already quantized)."""
    pending = module.__dict__.pop("_nf4_pending", {})
    transposed = _transposed(module)
    for name in MATRICES:
        if name in pending:
            _install(module, name, pending[name])
            continue
        param = module._parameters.get(name)
        if param is None or param.dim() != 3:
            continue
        with torch.no_grad():
            store = _quantize_stack(param.data, transposed)
        module._parameters.pop(name)
        del param  # the 16-bit tensor goes now, before the next module is quantized
        _install(module, name, store)
    module._nf4_compute_dtype = compute_dtype
    module.__class__ = _nf4_class(type(module))


# ---------------------------------------------------------------------------------------------- forward


def _quant_state(buf: dict, name: str, expert: int, shape: tuple[int, int], dtype: torch.dtype):
    """bitsandbytes' QuantState of one expert's NF4 matrix `name` (double quantization: nested absmax)."""
    from bitsandbytes.functional import QuantState

    state2 = QuantState(absmax=buf[f"{name}_nf4_absmax2"][expert], code=buf["nf4_code2"],
                        blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=buf[f"{name}_nf4_absmax"][expert], shape=torch.Size(shape), code=buf["nf4_code"],
                      blocksize=BLOCKSIZE, quant_type="nf4", dtype=dtype, offset=buf[f"{name}_nf4_offset"][expert],
                      state2=state2)


class NF4ExpertsMixin:
    """Forward of a converted experts module: routed tokens through each hit expert, de-quantized one at a time."""

    def nf4_linear(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        buf = self._buffers
        state = _quant_state(buf, name, expert, self._nf4_shapes[name], self._nf4_dtype)
        in_dtype = x.dtype
        if self._nf4_compute_dtype is not None:
            x = x.to(self._nf4_compute_dtype)
        bias = getattr(self, f"{name}_bias", None) if getattr(self, "has_bias", False) else None
        if bias is not None:
            bias = bias[expert].to(x.dtype)
        return bnb.matmul_4bit(x, buf[f"{name}_nf4_data"][expert], quant_state=state, bias=bias).to(in_dtype)

    def expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_proj" in self._nf4_shapes:
            h = self.nf4_linear("gate_up_proj", expert, x)
            if hasattr(self, "_apply_gate"):
                h = self._apply_gate(h)
            else:  # Llama 4: up * act(gate)
                gate, up = h.chunk(2, dim=-1)
                h = up * self.act_fn(gate)
        else:
            h = self.act_fn(self.nf4_linear("up_proj", expert, x))
        return self.nf4_linear("down_proj", expert, h)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit.view(-1).tolist():
            if expert >= self.num_experts:  # expert-parallel sentinel
                continue
            pos, tokens = torch.where(mask[expert])
            out = self.expert_mlp(expert, hidden_states[tokens])
            out = out * top_k_weights[tokens, pos, None]
            # index_put_ keeps only the index for backward (index_add_ would also keep `out`: e·h per routed token)
            final.index_put_((tokens,), out.to(final.dtype), accumulate=True)
        return final

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k}: {self.num_experts} x {list(v)}" for k, v in self._nf4_shapes.items())
        return f"nf4 experts (double quantization) {shapes}"


class NF4Llama4MoeMixin:
    """Llama 4's MoE block with NF4 experts: only each token's routed experts run (transformers runs every expert
    over every token, zero-scaled). Same result: unrouted tokens enter an expert as 0 and, without biases, leave 0."""

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(x)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
        out = self.shared_expert(x)
        with torch.no_grad():
            hit = (router_scores != 0).any(dim=0).nonzero().view(-1).tolist()
        for expert in hit:
            tokens = torch.where(router_scores[:, expert] != 0)[0]
            routed = x[tokens] * router_scores[tokens, expert, None]
            out = out.index_put((tokens,), self.experts.expert_mlp(expert, routed).to(out.dtype), accumulate=True)
        return out, router_logits


_CLASSES: dict[type, type] = {}


def _nf4_class(cls: type) -> type:
    """The NF4 subclass of an experts class (or of Llama 4's MoE block), created once per class."""
    if cls in _CLASSES.values():
        return cls
    if cls not in _CLASSES:
        mixin = NF4Llama4MoeMixin if cls.__name__ == "Llama4TextMoe" else NF4ExpertsMixin
        _CLASSES[cls] = type(f"NF4{cls.__name__}", (mixin, cls), {"__module__": __name__, "_nf4_base": cls})
    return _CLASSES[cls]


# ---------------------------------------------------------------------------------------------- public API


def quantize_experts(model: nn.Module, setup) -> nn.Module:
    """For qlora/qdora: every fused experts module of `model` in NF4 (double quantization); others unchanged."""
    if getattr(setup, "method", None) not in QUANTIZED:
        return model
    from .model import torch_dtype

    compute = torch_dtype(setup.dtype)
    for module in list(model.modules()):
        if is_experts(module) and not isinstance(module, NF4ExpertsMixin):
            _convert(module, compute)
    for module in list(model.modules()):
        if type(module).__name__ == "Llama4TextMoe" and isinstance(module.experts, NF4ExpertsMixin):
            module.__class__ = _nf4_class(type(module))
    return model


@contextmanager
def quantizing_experts_on_load(setup):
    """Quantize fused experts as `from_pretrained` assigns them (qlora/qdora), so that at most one fused 16-bit
    tensor exists at a time; call `quantize_experts` after loading to finish the conversion."""
    if getattr(setup, "method", None) not in QUANTIZED:
        yield
        return

    def on_register(module, name, param):
        if name not in MATRICES or param.dim() != 3 or param.device.type == "meta" or \
                not hasattr(module, "num_experts"):
            return None
        with torch.no_grad():
            store = _quantize_stack(param.data, _transposed(module))
        module.__dict__.setdefault("_nf4_pending", {})[name] = store
        placeholder = nn.Parameter(torch.empty(0, dtype=param.dtype, device=param.device), requires_grad=False)
        placeholder._is_hf_initialized = True  # transformers must not re-initialise it
        return placeholder

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_register)
    try:
        yield
    finally:
        handle.remove()


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Back to fused 16-bit parameters (the weights the adapters were trained against), for merging."""
    import bitsandbytes.functional as bnbf

    for module in list(model.modules()):
        if isinstance(module, NF4Llama4MoeMixin):
            module.__class__ = module._nf4_base
        if not isinstance(module, NF4ExpertsMixin):
            continue
        transposed, buf = _transposed(module), module._buffers
        for name, (out_f, in_f) in module._nf4_shapes.items():
            mats = []
            for e in range(module.num_experts):
                state = _quant_state(buf, name, e, (out_f, in_f), dtype or module._nf4_dtype)
                w = bnbf.dequantize_4bit(buf[f"{name}_nf4_data"][e], state)
                mats.append(w.t() if transposed else w)
            for key in _BUFFERS:
                del buf[f"{name}_nf4_{key}"]
            module._parameters[name] = nn.Parameter(torch.stack(mats), requires_grad=False)
        for key in ("nf4_code", "nf4_code2"):
            del buf[key]
        del module._nf4_shapes
        module.__class__ = module._nf4_base
    return model


def adapter_targets(model: nn.Module, target_modules):
    """Explicit module names for peft when the model has fused experts: "all-linear" becomes the leaf names of its
    nn.Linear / Linear4bit modules (lm_head and routers excluded), so that peft (>= 0.18 with transformers 5) does not
    turn it into `target_parameters` on the experts and router of Mixtral / Qwen-MoE / OLMoE, which NF4 experts do
    not have and which fail with lora_dropout > 0. Other values are returned unchanged."""
    if not (isinstance(target_modules, str) and target_modules == "all-linear"):
        return target_modules
    if not any(is_experts(m) for m in model.modules()):
        return target_modules
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        kind = type(module)
        if module is head or not (kind is nn.Linear or isinstance(module, bnb.nn.Linear4bit)):
            continue  # Llama 4's router subclasses nn.Linear and returns a tuple: not an adapter target
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)
