"""Exact mode's numbers against ones computed here by hand, not through the estimator's own helpers.

planner/exact.py turns a traced step (runtime.exact.trace) into a MemoryEstimate with the closed form's helpers
(optimizer_state_bytes, nf4_bytes, overhead_terms); tests/runtime/test_exact.py compares that with the closed form,
which shares them. Here every static term of a tiny real Llama is counted from its config by hand — parameters per
module, bytes per dtype, NF4 blocks, AdamW states, the overhead rule as the README states it — and the hand
arithmetic is itself checked against the real libraries: the parameter count against the model transformers builds,
the NF4 bytes against bitsandbytes' quantize_4bit, the AdamW state against torch's optimizer after a step.
"""

from __future__ import annotations

from functools import cache
from math import ceil

import pytest

pytest.importorskip("torch", reason="exact mode traces with torch (the [train] extra)")
pytest.importorskip("bitsandbytes", reason="the NF4 check quantizes with bitsandbytes (the [train] extra)")

from peftplan.planner import AdapterSettings, Geometry, Setup, shape_from_config  # noqa: E402
from peftplan.planner.exact import exact_estimate  # noqa: E402
from peftplan.runtime.exact import trace  # noqa: E402

CONFIG = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False, max_position_embeddings=256)
RANK = 8
# (in, out) of each decoder linear: q 4 heads × 32, k/v 2 heads × 32, o, gate/up/down through 344
LINEARS = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 344), (128, 344), (344, 128)]
LAYERS = 2
P_LINEAR = LAYERS * sum(i * o for i, o in LINEARS)  # 2 × 181,248
P = 2 * 500 * 128 + 128 + P_LINEAR + LAYERS * 2 * 128  # embeddings + untied head, final norm, linears, 2 norms/layer
N_LORA = LAYERS * sum(RANK * (i + o) for i, o in LINEARS)  # A: r × in, B: out × r
N_DORA = N_LORA + LAYERS * sum(o for _, o in LINEARS)  # + one magnitude per output
ROTARY_BUFFERS = 2 * (32 // 2) * 4  # inv_freq and original_inv_freq: head_dim / 2 fp32 each


def nf4(n: int) -> tuple[int, int]:
    """(packed bytes, constants bytes) of n weights in NF4 with double quantization: 2 weights per byte; a uint8
    absmax per 64; an fp32 absmax per 256 of those; fp32 codes of 16 and 256 entries; an fp32 offset."""
    blocks = ceil(n / 64)
    return ceil(n / 2), blocks + 4 * ceil(blocks / 256) + 16 * 4 + 256 * 4 + 4


def test_the_hand_numbers():
    assert P_LINEAR == 362_496 and P == 491_136
    assert N_LORA == 36_992 and N_DORA == 39_392


def test_the_hand_count_is_the_model_transformers_builds():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == P
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    assert sorted((m.in_features, m.out_features) for m in linears) == sorted(LINEARS * LAYERS)
    assert sum(b.numel() * b.element_size() for b in model.buffers()) == ROTARY_BUFFERS


@pytest.mark.parametrize("shape", [(128, 344), (344, 128), (128, 64)])
def test_the_hand_nf4_bytes_are_what_bitsandbytes_stores(shape):
    import torch
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    constants = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    stored = (packed.numel() * packed.element_size(), sum(t.numel() * t.element_size() for t in constants))
    assert stored == nf4(shape[0] * shape[1])
    assert qs.absmax.dtype == torch.uint8  # double quantization: the block absmax as uint8


def test_the_hand_adamw_state_is_what_torch_keeps_for_lora():
    """8 bytes per fp32 adapter parameter (exp_avg and exp_avg_sq), after a real step of torch's AdamW."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftplan.runtime.model import MethodSetup, apply_method
    from peftplan.runtime.optim import build_optimizer

    cfg = dict(CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.bfloat16)
    model = apply_method(model, MethodSetup(method="lora", rank=RANK, alpha=2 * RANK, dropout=0.0,
                                            gradient_checkpointing=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == N_LORA and {p.dtype for p in trainable} == {torch.float32}
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt = build_optimizer("adamw_torch", trainable, lr=1e-4)
    opt.step()
    moments = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert moments == 8 * N_LORA


@cache
def traced(method: str, accumulation: int = 1) -> dict:
    return trace(CONFIG, method=method, dtype="bfloat16", attention="sdpa", gradient_checkpointing=False, rank=RANK,
                 alpha=2 * RANK, dropout=0.0, batch=1, seq=32, loss="chunked", grads_held=accumulation > 1)


def setup(optimizer: str = "adamw_torch", accumulation: int = 1, device: str = "cuda") -> Setup:
    return Setup(shape_from_config(CONFIG), Geometry(1, 32, False, accumulation, "sdpa", False),
                 AdapterSettings(rank=RANK, alpha=2 * RANK, dropout=0.0), optimizer, "bfloat16", device)


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "qdora"])
def test_the_trace_sees_the_hand_counted_model(method):
    t = traced(method)
    n = {"full": P, "lora": N_LORA, "qlora": N_LORA, "dora": N_DORA, "qdora": N_DORA}[method]
    assert sum(numel for numel, _ in t["trainable"]) == n
    assert {size for _, size in t["trainable"]} == ({2} if method == "full" else {4})  # bf16 weights, fp32 adapters
    assert t["parameters"] == P + (0 if method == "full" else n)
    assert t["frozen_bytes"] == (0 if method == "full" else 2 * P)
    assert t["buffer_bytes"] == ROTARY_BUFFERS
    assert sorted(t["linear_weight_numels"]) == sorted(i * o for i, o in LINEARS * LAYERS)
    assert t["step_peak_bytes"] > 0


def expected_terms(method: str, optimizer: str, accumulation: int, device: str) -> dict[str, int]:
    """Every term exact mode adds to the traced step, by hand."""
    t = traced(method, accumulation)
    adapter = method != "full"
    n = {"full": P, "lora": N_LORA, "qlora": N_LORA, "dora": N_DORA, "qdora": N_DORA}[method]
    out = {"activations": t["step_peak_bytes"]}  # the traced forward + backward: the trace's own measurement
    if method in ("qlora", "qdora"):
        numels = [i * o for i, o in LINEARS * LAYERS]
        out["weights"] = 2 * (P - P_LINEAR) + ROTARY_BUFFERS + sum(nf4(x)[0] for x in numels)
        out["quant_constants"] = sum(nf4(x)[1] for x in numels)
        out["transient"] = 2 * 128 * 344  # the largest de-quantized weight in bf16
    else:
        out["weights"] = 2 * P + ROTARY_BUFFERS  # frozen (adapters) or trainable (full) bf16 weights, and buffers
    param_bytes = 4 if adapter else 2
    if adapter:
        out["adapter"] = 4 * n
    if optimizer == "adamw_torch":  # exp_avg and exp_avg_sq in the parameter's dtype
        out["optimizer"] = 2 * param_bytes * n
    else:  # bitsandbytes 8-bit: two uint8 states + an fp32 absmax per 256, fp32 states below 4096 elements
        sizes = [numel for numel, _ in t["trainable"]]
        out["optimizer"] = sum(2 * 4 * x if x < 4096 else 2 * (x + 4 * ceil(x / 256)) for x in sizes)
    if accumulation > 1:
        out["gradients"] = param_bytes * n
    peak = sum(out.values())
    out["overhead"] = int(peak * 0.10) + (512 * 2**20 if device == "cuda" else 0)  # 10% + the CUDA context
    return out


CASES = [("lora", "adamw_torch", 1, "cuda"), ("qlora", "adamw_torch", 1, "cuda"), ("dora", "adamw_torch", 1, "cpu"),
         ("qdora", "adamw_torch", 4, "cuda"), ("full", "adamw_torch", 1, "cuda"), ("full", "adamw_8bit", 2, "cpu"),
         ("lora", "adamw_8bit", 2, "cuda")]


@pytest.mark.parametrize("method,optimizer,accumulation,device", CASES)
def test_exact_terms_equal_the_hand_arithmetic(method, optimizer, accumulation, device):
    est = exact_estimate(method, setup(optimizer, accumulation, device), traced(method, accumulation))
    got = {k: v for k, v in est.components().items() if v}
    want = {k: v for k, v in expected_terms(method, optimizer, accumulation, device).items() if v}
    assert got == want
    assert est.trainable_parameters == {"full": P, "lora": N_LORA, "qlora": N_LORA}.get(method, N_DORA)
    assert est.peak_allocated_bytes == sum(v for k, v in want.items() if k != "overhead")
    assert est.device_total_bytes == sum(want.values())


def test_accumulation_adds_the_gradients_once():
    """With gradients held, the trace's baseline holds them (not its step peak) and exact mode adds them once."""
    one, four = traced("lora", 1), traced("lora", 4)
    e1 = exact_estimate("lora", setup("adamw_torch", 1), one)
    e4 = exact_estimate("lora", setup("adamw_torch", 4), four)
    grown = e4.peak_allocated_bytes - e1.peak_allocated_bytes
    assert grown == 4 * N_LORA + four["step_peak_bytes"] - one["step_peak_bytes"]
    assert abs(four["step_peak_bytes"] - one["step_peak_bytes"]) < 4 * N_LORA  # not counted a second time
