"""Terms known exactly, checked one by one against hand arithmetic from each calibration row's model config, and
against the table's measured columns where it records them — no torch (the tables hold the measurements).

A missing term that a ±10% peak bound lets pass (LoRA's AdamW state is 8 bytes per adapter parameter, a few percent
of a tiny model's peak) fails here outright: the estimator's `optimizer` term must be 8 × N_adapter with N_adapter
counted here from the config, and the bytes the measured step starts with (weights, NF4 storage, adapters, AdamW
state: `measured_static`) must equal the same hand sum, byte for byte.
"""

from __future__ import annotations

import json
from math import ceil

import pytest
from test_calibration_tables import calibrate, rows

from peftplan.planner import estimate

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "granite", "smollm3"}  # model_type: q/k/v/o + gate/up/down


def linears(c: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder-layer linear module of a Llama-style config."""
    h, a = c["hidden_size"], c["num_attention_heads"]
    kv, d, i = c.get("num_key_value_heads", a), c.get("head_dim") or h // a, c["intermediate_size"]
    return {"q_proj": (h, a * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (a * d, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_tensors(c: dict) -> list[tuple[str, int]]:
    """(kind, elements) of every parameter tensor: "linear" for the decoder's linear weights (what NF4 stores)."""
    h, a, L, V = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"], c["vocab_size"]
    kv, d = c.get("num_key_value_heads", a), c.get("head_dim") or h // a
    out = [("embedding", V * h), ("final norm", h)]
    if not c["tie_word_embeddings"]:
        out.append(("lm_head", V * h))
    for _ in range(L):
        out += [("linear", n_in * n_out) for n_in, n_out in linears(c).values()]
        out += [("norm", h), ("norm", h)]  # input and post-attention RMSNorm
        if c["model_type"] == "qwen2":
            out += [("bias", a * d), ("bias", kv * d), ("bias", kv * d)]  # q, k, v biases
        if c["model_type"] == "qwen3":
            out += [("qk norm", d), ("qk norm", d)]
    return out


def nf4(n: int) -> tuple[int, int]:
    """bitsandbytes NF4 with double quantization, one weight of n elements: (packed data, constants). Two 4-bit
    codes per byte; per block of 64 a uint8 absmax; per 256 absmax an fp32 absmax; an fp32 16-entry NF4 code, an
    fp32 256-entry code of the nested quantization and an fp32 offset."""
    blocks = ceil(n / 64)
    return ceil(n / 2), blocks + 4 * ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4


def by_hand(row: dict) -> dict:
    """The static terms of a row, counted from its config: weights, quantization constants, adapters, AdamW state,
    and the number of trainable tensors."""
    c, method, r = json.loads(row["config"]), row["method"], int(row["rank"])
    tensors = parameter_tensors(c)
    P = sum(n for _, n in tensors)
    L = c["num_hidden_layers"]
    targets = (row.get("targets") or "").split() or list(linears(c))
    adapted = [linears(c)[t] for t in targets]
    out = {"P": P}
    if method == "full":  # pure bf16: weights, two bf16 AdamW states
        out.update(weights=2 * P, quant_constants=0, adapter=0, optimizer=2 * 2 * P, trainable_tensors=len(tensors),
                   gradients=2 * P)
        return out
    N = L * sum(r * (n_in + n_out) for n_in, n_out in adapted)  # lora_A (r × in) and lora_B (out × r)
    count = 2 * L * len(adapted)
    if method in ("dora", "qdora"):
        N += L * sum(n_out for _, n_out in adapted)  # the magnitude vector
        count += L * len(adapted)
    if method in ("qlora", "qdora"):
        lin = [n for kind, n in tensors if kind == "linear"]
        weights = sum(nf4(n)[0] for n in lin) + 2 * (P - sum(lin))
        consts = sum(nf4(n)[1] for n in lin)
    else:
        weights, consts = 2 * P, 0
    out.update(weights=weights, quant_constants=consts, adapter=4 * N, optimizer=2 * 4 * N, trainable_tensors=count,
               gradients=4 * N, N=N)
    return out


def llama_rows() -> list[dict]:
    return [r for r in rows() if json.loads(r["config"])["model_type"] in LLAMA_LIKE
            and r["optimizer"] == "adamw_torch" and r["dtype"] == "bfloat16"]


def test_the_hand_count_matches_the_model_type_s_parameter_count():
    """The hand count agrees with the estimator's parameter count (planner.shapes, from the same config): the two are
    different routes to P, the measured static bytes below check both against a real model."""
    from peftplan.planner import shape_from_config

    seen = set()
    for r in llama_rows():
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        assert by_hand(r)["P"] == shape_from_config(json.loads(r["config"])).parameters, r["run"]
    assert len(seen) >= 10


def test_the_estimator_s_static_terms_equal_the_hand_count():
    """weights, NF4 constants, adapter and AdamW state of every Llama-style row (all splits), term by term."""
    checked = {m: 0 for m in ("full", "lora", "qlora", "dora", "qdora")}
    for r in llama_rows():
        run = calibrate.run_of(r)
        est = estimate(run.method, calibrate.setup_of(run, "cpu"))
        got, want = est.components(), by_hand(r)
        for term in ("weights", "quant_constants", "adapter", "optimizer"):
            assert got[term] == want[term], f"{r['run']}: {term} {got[term]:,} != {want[term]:,} by hand"
        if est.phase == "optimizer" or (run.accumulation > 1 and est.phase != "recompute"):
            assert got["gradients"] == want["gradients"], f"{r['run']}: gradients {got['gradients']:,}"
        checked[r["method"]] += 1
    assert min(checked.values()) >= 20, checked


def test_measured_static_bytes_equal_the_hand_count():
    """The bytes alive when the measured step starts (model tensors, bitsandbytes' quantization state, AdamW state)
    equal the hand count plus what the count leaves out on purpose: AdamW's `step` (one fp32 scalar per trainable
    tensor) and the rotary tables (inv_freq and original_inv_freq, head_dim / 2 fp32 each)."""
    measured_rows = [r for r in llama_rows() if r.get("measured_static")]
    assert len(measured_rows) >= 30
    for r in measured_rows:
        c, want = json.loads(r["config"]), by_hand(r)
        d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        static = want["weights"] + want["quant_constants"] + want["adapter"] + want["optimizer"]
        extra = 4 * want["trainable_tensors"] + 2 * 4 * (d // 2)
        assert int(r["measured_static"]) == static + extra, (r["run"], int(r["measured_static"]) - static - extra)


def _gc0_pairs():
    """(row with accumulation > 1, its accumulation-1 twin) for rows without checkpointing, measured in two runs."""
    by_run = {r["run"]: r for r in rows()}
    pairs = []
    for r in rows():
        if int(r.get("accumulation") or 1) > 1 and r["gradient_checkpointing"] == "False":
            twin = by_run.get(r["run"].rsplit("-ga", 1)[0])
            if twin is not None:
                pairs.append((r, twin))
    return pairs


def test_accumulation_holds_exactly_the_gradients():
    """Without checkpointing the peak is the loss moment of a later micro-batch: the measured peak grows by the
    gradients' bytes exactly (fp32 for adapters, bf16 for full fine-tuning) over the accumulation-1 run, plus the
    4-byte loss / N scalar; 2 and 4 micro-batches peak alike. The estimator adds the same bytes."""
    pairs = _gc0_pairs()
    assert {p[0]["method"] for p in pairs} == {"lora", "qlora", "full"} and len(pairs) >= 7
    measured = {}
    for ga, one in pairs:
        grads = by_hand(ga)["gradients"]
        grown = int(ga["measured_peak"]) - int(one["measured_peak"])
        assert 0 <= grown - grads <= 16, (ga["run"], grown, grads)
        est = {row["run"]: estimate(row["method"], calibrate.setup_of(calibrate.run_of(row), "cpu"))
               for row in (ga, one)}
        assert est[ga["run"]].peak_allocated_bytes - est[one["run"]].peak_allocated_bytes == grads, ga["run"]
        measured.setdefault(one["run"], set()).add(int(ga["measured_peak"]))
    assert all(len(v) == 1 for v in measured.values()), measured  # ga 2 and ga 4 measure the same peak


def test_the_de_quantized_weight_is_the_largest_transient_where_the_rows_say_so():
    """The wide-MLP rows (hidden 512, intermediate 4096, 64-128 tokens): the peak moment's largest transient is the
    de-quantized gate/up/down weight, 2 × 512 × 4096 bytes, and it is at least 14% of the measured peak — so a
    missing de-quantization term would move these rows by twice the ±7% they are held to."""
    wide = [r for r in rows() if "-wide-" in r["run"]]
    assert {r["method"] for r in wide} == {"qlora", "qdora"} and len(wide) >= 7
    for r in wide:
        c = json.loads(r["config"])
        dq = 2 * max(n_in * n_out for n_in, n_out in linears(c).values())
        assert dq == 2 * 512 * 4096
        est = estimate(r["method"], calibrate.setup_of(calibrate.run_of(r), "cpu"))
        transients = [t for t in est.phase_terms[est.phase] if t.component == "transient"]
        largest = max(transients, key=lambda t: t.bytes)
        assert largest.bytes == dq and "de-quantized" in largest.label, (r["run"], transients)
        assert dq >= 0.14 * int(r["measured_peak"]), r["run"]


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "qdora"])
def test_the_adamw_state_is_16_bytes_per_adapter_parameter_with_its_weight_and_gradient(method):
    """fp32 adapters: weight 4 + gradient 4 + AdamW's two fp32 states 8 = 16 bytes per adapter parameter, on the
    tiny Llama of the tables (N counted by hand: 4 layers × r(in + out) over 7 modules, + out for DoRA)."""
    r = next(r for r in llama_rows() if r["run"] == f"llama-{method}-b2s128-gc0-do0.0-sdpa-adamw_torch")
    N = 4 * 8 * ((256 + 256) + 2 * (256 + 64) + (256 + 256) + 2 * (256 + 688) + (688 + 256))
    if method in ("dora", "qdora"):
        N += 4 * (256 + 64 + 64 + 256 + 688 + 688 + 256)
    assert by_hand(r)["N"] == N
    est = estimate(method, calibrate.setup_of(calibrate.run_of(r), "cpu"))
    grads = next(t.bytes for t in est.phase_terms["optimizer"] if t.component == "gradients")
    c = est.components()
    assert c["adapter"] + c["optimizer"] + grads == 16 * N
