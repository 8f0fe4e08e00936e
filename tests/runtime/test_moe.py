"""MoE under QLoRA / QDoRA: the fused experts really are NF4 (runtime/moe.py), checked on tiny real models.

Every expectation is computed here by another route: expert bytes from the NF4 layout (½ byte per weight, one
uint8 absmax per 64 weights, one fp32 nested absmax per 256 blocks, an fp32 offset per expert, two code tables
per module); outputs against transformers' own experts forward run on weights quantized and de-quantized here
with bitsandbytes.functional; gradients and the Trainer's loss from real steps.
"""

import copy
from math import ceil

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch, transformers, peft, bitsandbytes)")
pytest.importorskip("bitsandbytes", reason="needs the [train] extra")

from peftplan.runtime import moe
from peftplan.runtime.memprobe import LiveTensorBytes
from peftplan.runtime.model import MethodSetup, load_model, quantization_config

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
VOCAB = 256
# Tiny configs; widths are multiples of 64 (bitsandbytes' CPU inference kernel wants whole blocks per row).
FAMILIES = {
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(model_type="granitemoe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1),
}
REQUIRED = ("mixtral", "qwen3_moe", "olmoe")


def _attention(family):
    return "eager" if family == "gpt_oss" else "sdpa"  # transformers has no sdpa path for gpt-oss (attention sinks)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    out = {}
    for family, cfg in FAMILIES.items():
        config = AutoConfig.for_model(**{**cfg, "vocab_size": VOCAB, "max_position_embeddings": 256})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # transformers initialises some tiny experts to zeros: give every expert real weights
            for module in model.modules():
                for name in moe.MATRICES:
                    p = module._parameters.get(name) if hasattr(module, "num_experts") else None
                    if p is not None and p.dim() == 3:
                        p.normal_(0.0, 0.05)
        model.save_pretrained(root / family)
        out[family] = str(root / family)
    return out


def _setup(method, family, dtype="bfloat16", **kw):
    return MethodSetup(method=method, dtype=dtype, attention=_attention(family), rank=4, alpha=8,
                       target_modules=kw.pop("target_modules", ATTENTION), **kw)


def _experts_modules(model):
    return [m for m in model.modules() if isinstance(m, moe.NF4ExpertsMixin)]


def _bytes_held(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _expected_nf4_bytes(num_experts: int, shapes) -> int:
    """NF4 with double quantization, per expert matrix of n weights: n/2 packed bytes, n/64 uint8 absmax,
    4 bytes per 256 absmax (fp32 nested absmax), a 4-byte offset; plus a 16-entry and a 256-entry fp32 code."""
    total = 16 * 4 + 256 * 4
    for out_f, in_f in shapes:
        n = out_f * in_f
        blocks = ceil(n / 64)
        total += num_experts * (ceil(n / 2) + blocks + 4 * ceil(blocks / 256) + 4)
    return total


def _roundtrip(w):
    """What NF4 with double quantization keeps of a [out, in] matrix, by bitsandbytes.functional directly."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(packed, state)


# ------------------------------------------------------------------------------------------------ storage


@pytest.mark.parametrize("family,method", [(f, "qlora") for f in FAMILIES] + [("qwen3_moe", "qdora")])
def test_experts_are_stored_in_nf4(family, method, model_dirs):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dirs[family])
    model = load_model(model_dirs[family], _setup(method, family))
    experts = _experts_modules(model)
    assert len(experts) == cfg.num_hidden_layers
    h = cfg.hidden_size
    i = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    num = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    expected = _expected_nf4_bytes(num, [(2 * i, h), (h, i)])
    if family == "gpt_oss":  # expert biases stay in the compute dtype (bf16)
        expected += 2 * num * (2 * i + h)
    for module in experts:
        assert not [n for n, p in module.named_parameters() if p.dim() >= 3], "a fused 16-bit expert tensor remains"
        assert _bytes_held(module) == expected
        sixteen_bit = 2 * num * 3 * i * h
        assert _bytes_held(module) < 0.3 * sixteen_bit  # ≈ ½ byte + constants per weight, not 2


def test_other_methods_keep_16_bit_experts(model_dirs):
    model = load_model(model_dirs["mixtral"], _setup("lora", "mixtral"))
    assert not _experts_modules(model)
    fused = [p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert len(fused) == 2 and fused[0].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ outputs


def _reference_block(family, path):
    """transformers' own 16-bit model in fp32, and a copy whose experts hold the NF4 round trip of each expert."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=_attention(family))
    rt = copy.deepcopy(ref)
    transposed = family in ("gpt_oss", "llama4_text")  # [E, in, out] layouts
    with torch.no_grad():
        for module in rt.modules():
            if hasattr(module, "num_experts") and isinstance(getattr(module, "down_proj", None), torch.nn.Parameter):
                for name in ("gate_up_proj", "down_proj"):
                    p = getattr(module, name)
                    for e in range(p.shape[0]):
                        p[e] = _roundtrip(p[e].t()).t() if transposed else _roundtrip(p[e])
            elif type(module) is torch.nn.Linear and module is not rt.lm_head:  # 4-bit loading: Linear4bit
                module.weight.copy_(_roundtrip(module.weight))
    return ref, rt


def _block(model, layer):
    layer = model.model.layers[layer]
    for name in ("mlp", "block_sparse_moe", "feed_forward"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise AssertionError("no MoE block")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_nf4_experts_compute_what_transformers_computes_on_nf4_weights(family, model_dirs):
    ref, rt = _reference_block(family, model_dirs[family])
    q = load_model(model_dirs[family], _setup("qlora", family, dtype="float32", gradient_checkpointing=False))
    q_model = q.base_model.model
    q_model.train()  # bitsandbytes repacks Linear4bit for a bf16 CPU kernel in eval mode; training uses the plain path
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in range(2):
            ours = _block(q_model, layer)(x)
            theirs_nf4 = _block(rt, layer)(x)
            theirs_16 = _block(ref, layer)(x)
            ours, theirs_nf4, theirs_16 = (o[0] if isinstance(o, tuple) else o for o in (ours, theirs_nf4, theirs_16))
            # same computation on the same NF4 weights: fp32 rounding only
            assert torch.allclose(ours, theirs_nf4, rtol=1e-4, atol=1e-5), (ours - theirs_nf4).abs().max()
            # against the 16-bit experts: NF4's error, which is real (not zero) and bounded
            rel = ((ours - theirs_16).norm() / theirs_16.norm()).item()
            assert 0.01 < rel < 0.25, rel


@pytest.mark.slow
@pytest.mark.parametrize("family", REQUIRED)
def test_logits_are_the_16_bit_models_on_nf4_weights(family, model_dirs):
    ref, rt = _reference_block(family, model_dirs[family])
    q = load_model(model_dirs[family], _setup("qlora", family, dtype="float32", gradient_checkpointing=False,
                                             dropout=0.0))
    q.train()  # no dropout; keeps bitsandbytes off its bf16 CPU inference kernel
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, nf4, sixteen = q(input_ids=ids).logits, rt(input_ids=ids).logits, ref(input_ids=ids).logits
    assert ((ours - nf4).norm() / nf4.norm()).item() < 1e-5  # exactly transformers on NF4 weights
    error = ((ours - sixteen).norm() / sixteen.norm()).item()
    assert 0.05 < error < 0.5, error  # NF4 on every decoder weight of a random 2-layer model (routing flips too)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [(f, "qlora") for f in REQUIRED] + [("olmoe", "qdora")])
def test_gradients_reach_the_adapters_only(family, method, model_dirs):
    model = load_model(model_dirs[family], _setup(method, family))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-4] in ATTENTION for n in trainable if "lora_" in n)
    lora_b = [p for n, p in trainable.items() if "lora_B" in n]
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad.abs().sum() > 0 for p in lora_b)  # B starts at zero: its gradient is the signal
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [(f, "qlora") for f in REQUIRED] + [("mixtral", "qdora")])
def test_loss_falls_through_the_trainer(family, method, model_dirs, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = load_model(model_dirs[family], _setup(method, family, dropout=0.05))
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (32,), generator=gen) for _ in range(4)]
    data = [{"input_ids": r, "labels": r.clone()} for r in rows * 2]
    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=10,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, bf16=True,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Record()]).train()
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.slow
def test_quantizing_on_load_never_holds_all_experts_in_16_bit(tmp_path):
    """Peak live tensor bytes while loading: with the hook, one fused tensor at a time is 16-bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    layers, experts, h, i = 4, 8, 128, 256
    cfg = AutoConfig.for_model("mixtral", hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                               num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    setup = MethodSetup(method="qlora", dtype="bfloat16")
    all_experts_16 = layers * experts * 3 * h * i * 2
    one_fused_16 = experts * 2 * i * h * 2  # one layer's gate_up_proj
    peaks = {}
    for on_load in (False, True):
        mode = LiveTensorBytes()
        with mode:
            kwargs = dict(dtype=torch.bfloat16, quantization_config=quantization_config(setup))
            if on_load:
                with moe.quantizing_experts_on_load(setup):
                    model = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
            model = moe.quantize_experts(model, setup)
        final = mode.current
        peaks[on_load] = mode.peak - final
        assert len(_experts_modules(model)) == layers
        del model
    assert peaks[False] >= 0.9 * all_experts_16 - final  # every expert was 16-bit at once
    assert peaks[True] <= 3 * one_fused_16  # the fused tensor being loaded, its parts, and one expert's buffers


def test_dequantize_experts_gives_back_the_nf4_weights(model_dirs):
    from transformers import AutoModelForCausalLM

    setup = _setup("qlora", "mixtral", dtype="float32")
    path = model_dirs["mixtral"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  quantization_config=quantization_config(setup))
    q = moe.quantize_experts(loaded, setup)
    back = moe.dequantize_experts(q)
    for layer in range(2):
        got, orig = back.model.layers[layer].mlp.experts, ref.model.layers[layer].mlp.experts
        assert type(got) is type(orig)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(orig, name)
            expected = torch.stack([_roundtrip(w[e]) for e in range(w.shape[0])])
            assert torch.equal(getattr(got, name), expected)


# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("family", REQUIRED)
def test_all_linear_resolves_to_linear_modules(family, model_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    setup = _setup("qlora", family)
    base = moe.quantize_experts(AutoModelForCausalLM.from_pretrained(
        model_dirs[family], dtype=torch.bfloat16, quantization_config=quantization_config(setup)), setup)
    targets = moe.adapter_targets(base, "all-linear")
    assert targets == sorted(ATTENTION)  # routers and NF4 experts are not linear modules
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == set(ATTENTION)


def test_llama4_all_linear_includes_the_shared_expert_not_the_router(model_dirs):
    from transformers import AutoModelForCausalLM

    setup = _setup("qlora", "llama4_text")
    base = moe.quantize_experts(AutoModelForCausalLM.from_pretrained(
        model_dirs["llama4_text"], dtype=torch.bfloat16, quantization_config=quantization_config(setup)), setup)
    assert moe.adapter_targets(base, "all-linear") == sorted(ATTENTION + ["gate_proj", "up_proj", "down_proj"])


def test_target_parameters_cannot_reach_nf4_experts(model_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    setup = _setup("qlora", "mixtral")
    base = moe.quantize_experts(AutoModelForCausalLM.from_pretrained(
        model_dirs["mixtral"], dtype=torch.bfloat16, quantization_config=quantization_config(setup)), setup)
    with pytest.raises(Exception, match="target_parameters"):
        get_peft_model(base, LoraConfig(r=4, target_modules=[], target_parameters=["experts.gate_up_proj"],
                                        task_type="CAUSAL_LM"))


# ------------------------------------------------------------------------------------------------ estimator


def _calibrate_moe():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("calibrate_moe", bench / "calibrate_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [("mixtral", "qlora"), ("qwen3_moe", "qdora"), ("olmoe", "qlora")])
def test_estimate_matches_a_measured_step(family, method, tmp_path):
    """benchmarks/calibrate_moe.py's measurement (peak live tensor bytes over three steps): the static bytes (NF4
    experts, linears, adapters, AdamW) to within a kilobyte, the peak without checkpointing within ±10%."""
    cal = _calibrate_moe()
    run = cal.MoERun(family, method)
    predicted = cal.predict(run)
    measured = cal.measure(run, tmp_path)
    static = sum(predicted[f"pred_{k}"] for k in ("weights", "quant_constants", "adapter", "optimizer"))
    assert abs(static - measured["measured_static"]) < 1024
    error = (predicted["predicted_peak"] - measured["measured_peak"]) / measured["measured_peak"]
    assert abs(error) < 0.10, error
