"""Exact mode (a traced step on fake tensors) against the closed form, and against a real measured step."""


import pytest

pytest.importorskip("torch", reason="exact mode needs the [train] extra")

from peftplan.planner import AdapterSettings, Geometry, Setup, catalog, estimate, shape_from_config  # noqa: E402
from peftplan.planner.exact import exact_estimate  # noqa: E402
from peftplan.runtime.exact import trace  # noqa: E402


def traced_and_closed(config: dict, method: str, attention="sdpa", gc=True, batch=1, seq=256, dropout=0.0):
    s = Setup(shape_from_config(config), Geometry(batch, seq, gc, 1, attention, False),
              AdapterSettings(rank=16, alpha=32, dropout=dropout), "adamw_torch", "bfloat16", "cuda")
    t = trace(config, method=method, dtype="bfloat16", attention=attention, gradient_checkpointing=gc, rank=16,
              alpha=32, dropout=dropout, batch=batch, seq=seq)
    return exact_estimate(method, s, t), estimate(method, s), t


CASES = [
    ("Qwen/Qwen2.5-0.5B", "lora", "sdpa", True),
    ("Qwen/Qwen2.5-0.5B", "qdora", "sdpa", False),
    ("openai-community/gpt2", "full", "sdpa", False),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "qlora", "sdpa", True),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "dora", "sdpa", False),
    ("google/gemma-2-2b", "lora", "eager", True),
    ("microsoft/Phi-3-mini-4k-instruct", "qlora", "sdpa", True),
    ("Qwen/Qwen3-0.6B", "lora", "sdpa", True),  # q/k norms per head
    ("google/gemma-3-1b-pt", "qlora", "sdpa", False),  # sliding layers (window 512 < 1024 tokens: masks), q/k norms
    ("allenai/OLMo-2-1124-7B", "dora", "sdpa", True),  # post-norms in fp32, q/k norms over the projection
    ("google/gemma-3-4b-pt", "lora", "sdpa", True),  # image-text checkpoint: the vision tower as frozen weights
]


@pytest.mark.slow
@pytest.mark.parametrize("model_id,method,attention,gc", CASES)
def test_exact_agrees_with_closed_form_on_catalog_models(model_id, method, attention, gc):
    config = dict(catalog.find_model(model_id).config)
    if model_id.startswith("openai-community/gpt2"):  # the catalog config keeps GPT-2's 0.1 dropouts
        config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    seq = 1024 if model_id.startswith("google/gemma-3") else 256  # past Gemma 3's sliding window
    exact, closed, t = traced_and_closed(config, method, attention, gc, seq=seq)
    assert t["parameters"] > 0
    err = (closed.peak_allocated_bytes - exact.peak_allocated_bytes) / exact.peak_allocated_bytes
    assert abs(err) < 0.05, f"{model_id} {method}: closed form {err:+.1%} from the trace"


@pytest.mark.slow
def test_accumulation_counts_the_held_gradients_once():
    """With gradient accumulation every gradient exists before the step starts; a trace that ends with all of them
    alive (full fine-tuning) already holds them at its peak. So the traced peak with accumulation exceeds the one
    without by less than the gradients' bytes (only what the forward pass keeps while they are held), not by all of
    them again, and agrees with the closed form, which holds them through the forward pass."""
    config = dict(catalog.find_model("Qwen/Qwen2.5-0.5B").config)
    shape = shape_from_config(config)
    peaks, closed = {}, {}
    for ga in (1, 4):
        s = Setup(shape, Geometry(1, 256, True, ga, "sdpa", False), AdapterSettings(rank=16, alpha=32, dropout=0.0),
                  "adamw_torch", "bfloat16", "cuda")
        t = trace(config, method="full", dtype="bfloat16", gradient_checkpointing=True, batch=1, seq=256,
                  grads_held=ga > 1)
        peaks[ga] = exact_estimate("full", s, t).peak_allocated_bytes
        closed[ga] = estimate("full", s).peak_allocated_bytes
    grads = 2 * shape.parameters  # bf16 gradients of every parameter
    assert 0 <= peaks[4] - peaks[1] < 0.5 * grads, (peaks, grads)
    assert abs(closed[4] - peaks[4]) / peaks[4] < 0.05, (closed, peaks)


@pytest.mark.slow
def test_exact_equals_a_real_measured_step():
    """The tiny Llama of the calibration table: the trace must reproduce the measured step."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("calibrate", root / "benchmarks" / "calibrate.py")
    cal = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("calibrate", cal)
    cal = sys.modules["calibrate"]
    if not hasattr(cal, "Run"):
        spec.loader.exec_module(cal)
    run = cal.Run("llama", "lora", loss="full")  # traced below with the same loss
    measured = cal.measure(run, Path(__import__("tempfile").mkdtemp()))["measured_peak"]
    s = Setup(shape_from_config(run.config()), Geometry(run.batch, run.seq, run.gc, 1, "sdpa", False),
              AdapterSettings(rank=run.rank, alpha=2 * run.rank, dropout=0.0), "adamw_torch", "bfloat16", "cpu")
    t = trace(run.config(), method="lora", dtype="bfloat16", gradient_checkpointing=False, rank=run.rank,
              alpha=2 * run.rank, dropout=0.0, batch=run.batch, seq=run.seq, loss="full")  # the harness's loss
    exact = exact_estimate("lora", s, t)
    assert abs(exact.peak_allocated_bytes - measured) / measured < 0.01, (exact.peak_allocated_bytes, measured)


# --- any architecture: described on the meta device, then traced ------------------------------------------------
NEOX = dict(model_type="gpt_neox", hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
            vocab_size=700, rotary_pct=0.25, tie_word_embeddings=False, use_parallel_residual=True, bos_token_id=0,
            eos_token_id=0, max_position_embeddings=512)


def test_describe_returns_plain_values_with_the_layer_structure():
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftplan.runtime.exact import describe

    d = describe(NEOX)
    json.dumps(d)  # plain values only: the planner reads it without torch
    cfg = dict(NEOX)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    assert (d["num_layers"], d["hidden_size"], d["num_heads"], d["num_kv_heads"], d["head_dim"]) == (3, 128, 4, 4, 32)
    names = [(lin["path"], lin["in_features"], lin["out_features"], lin["input"]) for lin in d["linears"]]
    # parallel residual: attention and MLP read two different norms of the same input, so four distinct inputs
    assert names == [("attention.query_key_value", 128, 384, "attn_in"), ("attention.dense", 128, 128, "in1"),
                     ("mlp.dense_h_to_4h", 128, 512, "in2"), ("mlp.dense_4h_to_h", 512, 128, "in3")]
    assert d["inputs_from"] == "forward" and len(d["norms"]) == 2 and not d["tie_embeddings"]
    assert d["layer_params"] == [sum(p.numel() for p in layer.parameters()) for layer in model.gpt_neox.layers]


@pytest.mark.slow
def test_an_unknown_architecture_is_described_then_traced(tmp_path, monkeypatch):
    """`estimate` on a model_type the closed form does not know: shapes from the meta model, every method traced;
    the traced LoRA step matches a real measured step of the same model."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    import tomli_w

    from peftplan.planner import resolve
    from peftplan.planner.exact import trace_estimates
    from peftplan.planner.report import estimate_spec
    from peftplan.runtime.exact import describe
    from peftplan.schemas import load_spec

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(NEOX))
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(tomli_w.dumps({
        "model": {"name": "model", "dtype": "bfloat16"}, "data": {"num_examples": 100, "seq_len": 128, "packing": True},
        "hardware": {"gpu": "cpu", "memory_gib": 8}, "method": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"micro_batch_size": 2, "gradient_checkpointing": False,
                     "loss": "full"}}))  # the calibration harness measures transformers' own loss
    monkeypatch.setattr(resolve, "_describer", describe)
    report = estimate_spec(load_spec(spec_path), base_dir=tmp_path)
    assert report.model.described and not report.model.shape.calibrated
    assert any("'gpt_neox' is not one the closed form knows" in n for n in report.model.notes)
    traced = trace_estimates(report, trace, automatic=True)
    assert set(traced.estimates) == {"full", "lora", "qlora", "dora", "qdora"}
    assert all(e.phase == "traced" for e in traced.estimates.values())
    assert any("every method was traced" in n for n in traced.resolved.notes)

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("calibrate", root / "benchmarks" / "calibrate.py")
    cal = sys.modules.setdefault("calibrate", importlib.util.module_from_spec(spec))
    if not hasattr(cal, "Run"):
        spec.loader.exec_module(cal)
    monkeypatch.setitem(cal.FAMILIES, "gpt_neox-test", NEOX)
    measured = cal.measure(cal.Run("gpt_neox-test", "lora", batch=2, seq=128, rank=8, loss="full"),
                           tmp_path / "m")["measured_peak"]
    exact = traced.estimates["lora"].peak_allocated_bytes
    assert abs(exact - measured) / measured < 0.02, (exact, measured)
