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
H, FF, L, A_, KV, D, V = 256, 688, 4, 8, 2, 32, 1000
B, S = 2, 128
T = B * S
R = 8

# module: (in, out)
MODULES = {"q_proj": (H, A_ * D), "k_proj": (H, KV * D), "v_proj": (H, KV * D), "o_proj": (A_ * D, H),
           "gate_proj": (H, FF), "up_proj": (H, FF), "down_proj": (FF, H)}
LINEAR_PARAMS = sum(i * o for i, o in MODULES.values())  # per layer
PARAMS = 2 * V * H + L * LINEAR_PARAMS + H * (2 * L + 1)
LORA_PARAMS = L * sum(R * (i + o) for i, o in MODULES.values())


def setup(gc=False, dropout=0.0, device="cuda", optimizer="adamw_torch", attention="sdpa", padded=False, ga=1,
          loss="full", offload=False):
    """The terms below are written for transformers' own loss (`loss = "full"`); the chunked loss and offloading
    have their own tests at the end."""
    return Setup(shape_from_config(CFG), Geometry(B, S, gc, ga, attention, padded),
                 AdapterSettings(rank=R, alpha=16, dropout=dropout), optimizer=optimizer,
                 dtype="bfloat16", device_kind=device, loss=loss, offload=offload)


def comp(method, **kw):
    return estimate(method, setup(**kw)).components()


# per-layer activations for LoRA (bf16, no dropout), op by op. The runtime keeps adapter inputs 16-bit, so each
# lora_A saves the tensor its module reads, once per distinct tensor: the normed input (q/k/v), the normed input
# (gate/up), act(gate)·up (down); o_proj reads sdpa's own saved output, counted with the attention
LORA_INPUT_COPIES = 2 * T * (H + H + FF)
LORA_A_OUT = 7 * 2 * T * R
ATTN = 2 * T * A_ * D + 2 * 2 * T * KV * D + 2 * T * A_ * D + 4 * B * A_ * S  # q, k, v, out, lse
MLP = 3 * 2 * T * FF  # silu input, silu output, up output
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
    assert LAYER_LORA == 2_562_048
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
    # with dropout each module's lora_A saves its own dropped input (bf16) instead of the shared tensor, plus the
    # mask (CUDA: one bool byte per element); layer 0's q/k/v read (norm of) the frozen embeddings: no mask there
    all_inputs = L * T * sum(i for i, _ in MODULES.values())
    layer0_qkv = 3 * T * H
    assert drop["activations"] - base["activations"] == 3 * all_inputs - L * LORA_INPUT_COPIES - layer0_qkv


def test_lora_dropout_on_cpu_masks_have_the_inputs_dtype():
    base, drop = comp("lora", device="cpu"), comp("lora", device="cpu", dropout=0.1)
    all_inputs = L * T * sum(i for i, _ in MODULES.values())
    # the CPU's dropout mask has the input's dtype: bf16, 2 bytes
    assert drop["activations"] - base["activations"] == 4 * all_inputs - L * LORA_INPUT_COPIES - 2 * 3 * T * H


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
    assert 8 * 8 * FF < 2 * H * FF
    assert labels["de-quantized gate_proj weight (largest)"] == 2 * H * FF


def test_dora_magnitude_activations_and_norm_transient():
    lora, dora = comp("dora"), comp("lora")
    outs = sum(o for _, o in MODULES.values())
    assert lora["adapter"] - dora["adapter"] == 4 * L * outs
    est = estimate("dora", setup())
    # every adapted module also keeps base_result and lora_result (b × s × out, bf16) and 3 fp32 vectors
    per_layer_extra = 2 * 2 * T * outs + 12 * outs
    assert lora["activations"] - dora["activations"] == L * per_layer_extra
    transients = [t for t in est.terms if t.component == "transient"]
    # the largest per module: max(identity in fp32 + its bf16 copy: 6·in², 2·in² + (3·2 + 4)·in·out: the lora weight,
    # s·BA, W + s·BA in bf16 and the norm's fp32 copy); down_proj's identity (in = 688) wins
    per_module = [max(6 * i * i, 2 * i * i + 10 * i * o) for i, o in MODULES.values()]
    assert max(t.bytes for t in transients) == max(per_module) == 6 * FF * FF


def test_dora_dropout_saves_a_copy_of_every_adapted_weight():
    a, b = comp("dora", dropout=0.1), comp("dora")
    all_inputs = L * T * sum(i for i, _ in MODULES.values())
    dropped = 3 * all_inputs - L * LORA_INPUT_COPIES - 3 * T * H  # as for LoRA (above)
    assert a["activations"] - b["activations"] == dropped + 2 * L * LINEAR_PARAMS


def test_full_finetuning_terms():
    c = comp("full")
    assert c["weights"] == 2 * PARAMS
    assert c["optimizer"] == 2 * 2 * PARAMS  # AdamW states in bf16
    assert c["adapter"] == 0
    # linear inputs saved once per distinct tensor: attn_in, mlp_in (h wide), mlp_mid (i); o_proj reads the sdpa
    # output, which the attention saves anyway
    linear_inputs = 2 * T * (H + H + FF)
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
    kept = 24 * T + 2 * 2 * T * D  # ids and labels, cos/sin: every layer's recomputation reads them
    working = 4 * T * FF  # 4 bytes per element of the widest MLP gradient (assumptions.BACKWARD_WORKING_BYTES)
    static = 2 * PARAMS + 12 * LORA_PARAMS  # weights, adapter (4 B), AdamW (8 B)
    grads = 4 * LORA_PARAMS * (L - 1) // L  # while layer 0 is recomputed, layers 1..3 have gradients
    assert est.peak_allocated_bytes == static + ckpt + kept + LAYER_LORA + working + grads


def test_gradient_accumulation_holds_gradients_during_forward():
    c1, c4 = comp("full", ga=1), comp("full", ga=4)
    assert c1["gradients"] == 0
    assert c4["gradients"] == 2 * PARAMS


def test_padding_mask_materializes_kv_heads_and_adds_mask():
    a, b = comp("lora", padded=True), comp("lora", padded=False)
    kv_growth = L * 2 * 2 * T * (A_ - KV) * D
    # bool 4D mask once + attention_mask int64, and per layer the additive bf16 mask sdpa saves
    mask = B * S * S + 8 * T + L * 2 * B * S * S
    assert a["activations"] - b["activations"] == kv_growth + mask


def test_eager_attention_keeps_seq_squared_probabilities():
    a, b = comp("lora", attention="eager"), comp("lora", attention="sdpa")
    per_layer = (2 * T * (A_ - KV) * D * 2  # k, v repeated to all heads
                 + (4 + 2) * B * A_ * S * S  # fp32 softmax + bf16 copy
                 - 4 * B * A_ * S)  # no lse; the output sdpa saved is o_proj's input copy here (counted for eager)
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


# --- the chunked loss (runtime/loss.py) and activation offloading (runtime/offload.py) -------------------------------
def test_chunked_loss_holds_one_chunk_not_tokens_times_vocabulary():
    """LoRA, bf16 (p = q = 2): the chunk is min(the budget's 4096 tokens, T = 256); at the loss's forward peak the
    final hidden states, the labelled rows and their gradient, one chunk's logits in bf16 and fp32, and the chunk's
    inputs and row indices."""
    c = estimate("lora", setup(loss="chunked")).components()
    chunk = min(4096, T)
    expected = T * H * 2 + 2 * T * H * 2 + chunk * V * (4 + 2) + chunk * H * (2 + 2) + 24 * T
    assert c["logits"] == expected == 2_197_504
    assert c["logits"] < LOGITS  # 3,072,000 for the full fp32 logits


def test_chunked_loss_with_a_trainable_head_keeps_its_fp32_gradient():
    """Full fine-tuning (pure bf16): as for LoRA, plus the head's fp32 gradient accumulator 4·V·H; at the start of
    backward the stored gradient plus the accumulator and its bf16 cast (4 + 2)·V·H, smaller here than the forward's
    chunk of logits. (The chunked loss saves no head input: the layers' terms do not count one.)"""
    est = estimate("full", setup(loss="chunked"))
    forward = T * H * 2 + 2 * T * H * 2 + min(4096, T) * V * 6 + min(4096, T) * H * 4 + 24 * T + 4 * V * H
    backward = T * H * 2 + max(2 * T * H * 2, 4 * V * H + V * H * 2)
    assert (forward, backward) == (3_221_504, 1_667_072)
    assert est.components()["logits"] == max(forward, backward)


def test_chunk_size_follows_the_budget():
    from peftplan.planner.loss import chunk_tokens

    assert chunk_tokens(128_256, 2) == 256  # 256 MiB / (128,256 × 6 B) = 348 → 256
    assert chunk_tokens(32_000, 2) == 1024  # 1398 → 1024
    assert chunk_tokens(1000, 4) == 4096  # clamped
    assert chunk_tokens(10_000_000, 2) == 16  # clamped from below


def test_offloading_keeps_three_layer_inputs_on_the_device():
    """With gradient checkpointing the checkpointed inputs are L × 2·T·H; offloaded, at most 3 of them stay."""
    plain = estimate("lora", setup(gc=True, loss="chunked"))
    off = estimate("lora", setup(gc=True, loss="chunked", offload=True))
    one = 2 * T * H
    assert plain.components()["activations"] - off.components()["activations"] == (L - 3) * one
