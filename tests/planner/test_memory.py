"""Each memory term against arithmetic written out by hand for one small Llama-style config.

Config: hidden 256, intermediate 688, 4 layers, 8 heads of 32, 2 KV heads (GQA), vocab 1000,
untied embeddings. Geometry: batch 2 × 128 tokens (T = 256), bf16 on CUDA, sdpa without padding
mask, LoRA rank 8 on all linear modules. Every expected number below is computed in the test from
the architecture, not by calling the estimator's helpers.
"""

import pytest

from peftplan.planner import AdapterSettings, Geometry, Setup, estimate, shape_from_config
from peftplan.planner.memory import optimizer_state_bytes
from peftplan.planner.methods import Tensors

CFG = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
H, I, L, A_, KV, D, V = 256, 688, 4, 8, 2, 32, 1000
B, S = 2, 128
T = B * S
R = 8

# module: (in, out)
MODULES = {"q_proj": (H, A_ * D), "k_proj": (H, KV * D), "v_proj": (H, KV * D), "o_proj": (A_ * D, H),
           "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
LINEAR_PARAMS = sum(i * o for i, o in MODULES.values())  # per layer
PARAMS = 2 * V * H + L * LINEAR_PARAMS + H * (2 * L + 1)
LORA_PARAMS = L * sum(R * (i + o) for i, o in MODULES.values())


def setup(gc=False, dropout=0.0, device="cuda", optimizer="adamw_torch", attention="sdpa", padded=False, ga=1):
    return Setup(shape_from_config(CFG), Geometry(B, S, gc, ga, attention, padded),
                 AdapterSettings(rank=R, alpha=16, dropout=dropout), optimizer=optimizer,
                 dtype="bfloat16", device_kind=device)


def comp(method, **kw):
    return estimate(method, setup(**kw)).components()


# per-layer activations for LoRA (bf16, no dropout), op by op
LORA_INPUT_COPIES = 2 * T * sum(i for i, _ in MODULES.values())  # autocast copy per adapted module
LORA_A_OUT = 7 * 2 * T * R
ATTN = 2 * T * A_ * D + 2 * 2 * T * KV * D + 2 * T * A_ * D + 4 * B * A_ * S  # q, k, v, out, lse
MLP = 3 * 2 * T * I  # silu input, silu output, up output
NORM = 4 * T * H + 4 * T  # fp32 input copy + rsqrt
LAYER_LORA = LORA_INPUT_COPIES + LORA_A_OUT + ATTN + MLP + 2 * NORM
OUTSIDE = 24 * T + 2 * 2 * T * D + NORM  # ids/labels, cos/sin, final norm
LOGITS = 3 * 4 * T * V


def test_parameter_count_by_hand():
    assert PARAMS == 3_283_200
    assert shape_from_config(CFG).parameters == PARAMS


def test_lora_static_terms():
    c = comp("lora")
    assert c["weights"] == 2 * PARAMS
    assert c["adapter"] == 4 * LORA_PARAMS == 575_488
    assert c["optimizer"] == 8 * LORA_PARAMS


def test_lora_activations_and_logits():
    c = comp("lora")
    assert LAYER_LORA == 3_086_336
    assert c["activations"] == L * LAYER_LORA - NORM + OUTSIDE  # layer 0's first norm input needs no grad
    assert c["logits"] == LOGITS
    assert c["gradients"] == 0  # no accumulation: gradients are None during the forward pass


def test_peak_is_sum_of_components_and_total_adds_overhead():
    est = estimate("lora", setup())
    c = est.components()
    assert est.peak_allocated_bytes == sum(v for k, v in c.items() if k != "overhead")
    assert est.device_total_bytes == est.peak_allocated_bytes + int(0.10 * est.peak_allocated_bytes) + 512 * 2**20
    assert est.peak_allocated_bytes == 2 * PARAMS + 12 * LORA_PARAMS + L * LAYER_LORA - NORM + OUTSIDE + LOGITS


def test_lora_dropout_adds_masks_except_layer0_attention_inputs():
    base, drop = comp("lora"), comp("lora", dropout=0.1)
    # CUDA: one bool byte per element of each adapted module's input; layer 0's q/k/v read
    # (norm of) the frozen embeddings, so their dropout keeps no mask
    all_inputs = L * T * sum(i for i, _ in MODULES.values())
    layer0_qkv = 3 * T * H
    assert drop["activations"] - base["activations"] == all_inputs - layer0_qkv


def test_lora_dropout_on_cpu_masks_are_fp32():
    base, drop = comp("lora", device="cpu"), comp("lora", device="cpu", dropout=0.1)
    all_inputs = L * T * sum(i for i, _ in MODULES.values())
    assert drop["activations"] - base["activations"] == 4 * (all_inputs - 3 * T * H)


def test_qlora_nf4_storage_by_hand():
    c = comp("qlora")

    def nf4(n):  # 4-bit data, and constants: uint8 absmax per 64, fp32 absmax per 256 blocks, codes
        blocks = -(-n // 64)
        return n // 2, blocks + 4 * -(-blocks // 256) + 16 * 4 + 256 * 4 + 4

    data = sum(nf4(i * o)[0] for i, o in MODULES.values()) * L
    consts = sum(nf4(i * o)[1] for i, o in MODULES.values()) * L
    assert data == L * LINEAR_PARAMS // 2
    assert c["weights"] == data + 2 * (PARAMS - L * LINEAR_PARAMS)
    assert c["quant_constants"] == consts == 74_528
    assert c["activations"] == comp("lora")["activations"]  # bitsandbytes saves no extra activations


def test_qlora_dequant_transient_is_largest_weight():
    s = setup(gc=True)
    short = Setup(s.shape, Geometry(1, 8, True, 1, "sdpa", False), s.adapter, s.optimizer, s.dtype, s.device_kind)
    labels = {t.label: t.bytes for t in estimate("qlora", short).terms}
    # 8 tokens: one layer's backward gradients (8·T·i) are smaller than the 16-bit gate_proj weight
    assert 8 * 8 * I < 2 * H * I
    assert labels["de-quantized gate_proj weight (largest)"] == 2 * H * I


def test_dora_magnitude_activations_and_norm_transient():
    lora, dora = comp("dora"), comp("lora")
    outs = sum(o for _, o in MODULES.values())
    assert lora["adapter"] - dora["adapter"] == 4 * L * outs
    est = estimate("dora", setup())
    # every adapted module also keeps base_result and lora_result (b × s × out, bf16) and 3 fp32 vectors
    per_layer_extra = 2 * 2 * T * outs + 12 * outs
    assert lora["activations"] - dora["activations"] == L * per_layer_extra
    transients = [t for t in est.terms if t.component == "transient"]
    # down_proj: in 688 → out 256: 2·in² (identity through lora_A, bf16) + 16·in·out (fp32 buffers)
    assert max(t.bytes for t in transients) == 2 * I * I + 16 * I * H


def test_dora_dropout_saves_a_copy_of_every_adapted_weight():
    a, b = comp("dora", dropout=0.1), comp("dora")
    masks = L * T * sum(i for i, _ in MODULES.values()) - 3 * T * H
    assert a["activations"] - b["activations"] == masks + 2 * L * LINEAR_PARAMS


def test_full_finetuning_terms():
    c = comp("full")
    assert c["weights"] == 2 * PARAMS
    assert c["optimizer"] == 2 * 2 * PARAMS  # AdamW states in bf16
    assert c["adapter"] == 0
    # linear inputs saved once per distinct tensor: attn_in, attn_out, mlp_in (h wide), mlp_mid (i)
    linear_inputs = 2 * T * (H + A_ * D + H + I)
    norms = 2 * (NORM + 2 * T * H)  # + bf16 normed output for the norm weight's gradient
    layer = linear_inputs + ATTN + MLP + norms
    outside = 24 * T + 2 * 2 * T * D + NORM + 2 * T * H + 2 * T * H + 8 * T  # + lm_head input, ids
    assert c["activations"] == L * layer + outside


def test_full_fp16_keeps_fp32_master_weights():
    s = setup()
    s16 = Setup(s.shape, s.geometry, s.adapter, s.optimizer, "float16", "cuda")
    c = estimate("full", s16).components()
    assert c["weights"] == 4 * PARAMS and c["optimizer"] == 8 * PARAMS


def test_gradient_checkpointing_peak_is_recompute_of_one_layer():
    est = estimate("lora", setup(gc=True))
    assert est.phase == "recompute"
    ckpt = L * 2 * T * H
    working = 8 * T * I
    static = 2 * PARAMS + 12 * LORA_PARAMS  # weights, adapter (4 B), AdamW (8 B)
    grads = 4 * LORA_PARAMS * (L - 1) // L  # while layer 0 is recomputed, layers 1..3 have gradients
    assert est.peak_allocated_bytes == static + ckpt + LAYER_LORA + working + grads


def test_gradient_accumulation_holds_gradients_during_forward():
    c1, c4 = comp("full", ga=1), comp("full", ga=4)
    assert c1["gradients"] == 0
    assert c4["gradients"] == 2 * PARAMS


def test_padding_mask_materializes_kv_heads_and_adds_mask():
    a, b = comp("lora", padded=True), comp("lora", padded=False)
    kv_growth = L * 2 * 2 * T * (A_ - KV) * D
    mask = B * S * S + 8 * T  # bool 4D mask once + attention_mask int64
    assert a["activations"] - b["activations"] == kv_growth + mask


def test_eager_attention_keeps_seq_squared_probabilities():
    a, b = comp("lora", attention="eager"), comp("lora", attention="sdpa")
    per_layer = (2 * T * (A_ - KV) * D * 2  # k, v repeated to all heads
                 + (4 + 2) * B * A_ * S * S  # fp32 softmax + bf16 copy
                 - 2 * T * A_ * D - 4 * B * A_ * S)  # no separate output/lse
    assert a["activations"] - b["activations"] == L * per_layer


@pytest.mark.parametrize("optimizer,expected", [
    ("adamw_torch", 2 * 4 * 65536 + 2 * 4 * 1000),
    ("paged_adamw_32bit", 2 * 4 * 65536 + 2 * 4 * 1000),
    ("adamw_8bit", 2 * (65536 + 4 * 256) + 2 * 4 * 1000),  # < 4096 elements stay 32-bit
    ("paged_adamw_8bit", 2 * (65536 + 4 * 256) + 2 * 4 * 1000),
    ("sgd", 0),
])
def test_optimizer_state_bytes(optimizer, expected):
    tensors = [Tensors("a", 65536, 1, 4), Tensors("b", 1000, 1, 4)]
    assert optimizer_state_bytes(tensors, optimizer)[0] == expected


def test_cpu_has_no_cuda_context():
    est = estimate("lora", setup(device="cpu"))
    assert est.components()["overhead"] == int(0.10 * est.peak_allocated_bytes)
