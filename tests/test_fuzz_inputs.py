"""Property-based tests beyond specs: random and mutated config.json and plan.toml files.

Whatever a model's config.json or a project's plan.toml holds, `estimate` / `validate` / `generate` and the
runtime's plan reader answer with one of the documented outcomes (exit 0, 2, 3; ConfigError in the runtime),
never a traceback, and never a negative or non-integer byte count. Each test states how many inputs it tries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
from abuse_support import PY_EXCEPTION, TINY_CONFIG, cli, offline_empty_hf_cache  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftplan.runtime.config import ConfigError, load_config

CONFIG_EXAMPLES = 150
PLAN_EXAMPLES = 300

STRUCTURAL = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "model_type",
              "num_local_experts", "num_experts_per_tok", "final_logit_softcapping", "sliding_window",
              "attention_bias", "hidden_act", "rope_theta", "architectures"]
KNOWN_TYPES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "phi", "mixtral"]

json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400, 7]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=6)


def _dump_config(cfg: dict) -> str:
    """JSON as a hand-edited file may hold it: NaN / Infinity written bare (json's default allows them)."""
    return json.dumps(cfg, allow_nan=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzzcfg")
    (d / "model").mkdir()
    spec = {"model": {"name": str(d / "model")}, "data": {"num_examples": 100, "seq_len": 128},
            "hardware": {"gpu": "A10G"}}
    (d / "spec.toml").write_text(tomli_w.dumps(spec))
    return d


def _check(rc: int, out: str, err: str, what: str) -> None:
    shown = f"{what}\nexit {rc}\nstderr: {err[-1500:]}\nstdout: {out[:500]}"
    assert rc in (0, 2, 3), shown
    assert not PY_EXCEPTION.search(err) and not PY_EXCEPTION.search(out), shown
    if rc == 2:
        assert err.strip() and all(line.startswith(("/", "peftplan")) or line.strip() == "" or ":" in line
                                   for line in err.splitlines()), shown
    if rc in (0, 3) and out.strip().startswith("{"):
        data = json.loads(out)
        for m in data["methods"].values():
            for key in ("peak_allocated_bytes", "device_total_bytes"):
                assert isinstance(m[key], int) and m[key] >= 0, shown


@settings(max_examples=CONFIG_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.dictionaries(st.sampled_from(STRUCTURAL), json_value, min_size=1, max_size=4),
       model_type=st.sampled_from(KNOWN_TYPES), drop=st.sets(st.sampled_from(STRUCTURAL), max_size=3))
def test_mutated_config_json(ws, mutations, model_type, drop):
    cfg = {**TINY_CONFIG, "model_type": model_type, **mutations}
    for key in drop:
        cfg.pop(key, None)
    text = _dump_config(cfg)
    (ws / "model" / "config.json").write_text(text)
    for command in (("estimate", "--json"), ("validate",)):
        rc, out, err = cli(command[0], ws / "spec.toml", *command[1:])
        _check(rc, out, err, f"{command[0]} with config.json {text[:600]}")


@pytest.mark.parametrize("raw", [
    b"\xff\xfe{}", b"[1, 2]", b'{"model_type": "llama"' + b"[" * 100000, b"{" * 5000 + b"}" * 5000,
    b'{"hidden_size": 1' + b"0" * 5000 + b"}", b"", b"null", b'{"model_type": NaN}',
])
def test_unusable_config_json_bytes(ws, raw):
    (ws / "model" / "config.json").write_bytes(raw)
    rc, out, err = cli("estimate", ws / "spec.toml")
    assert rc == 2, err
    assert not PY_EXCEPTION.search(err) and "config.json" in err, err


@pytest.mark.parametrize("key,value,words", [
    ("num_hidden_layers", 0, "num_hidden_layers must be between 1"),
    ("num_attention_heads", "8", "num_attention_heads must be a whole number"),
    ("vocab_size", -5, "vocab_size must be between 1"),
    ("hidden_size", None, ""),  # absent-like: the model type's default or a clear error, never a crash
    ("intermediate_size", [1, 2], "intermediate_size must be a whole number"),
    ("final_logit_softcapping", math.inf, "Infinity is not a number JSON allows"),
    ("final_logit_softcapping", 1e300, "final_logit_softcapping must be a finite number"),
    ("num_local_experts", -8, "num_local_experts must be between 0"),  # 0 is a dense model (Granite 4.0 micro)
])
def test_each_malformed_number_is_named(ws, key, value, words):
    cfg = {**TINY_CONFIG, key: value}
    (ws / "model" / "config.json").write_text(_dump_config(cfg))
    rc, out, err = cli("estimate", ws / "spec.toml")
    assert rc == 2, (rc, err, out[:300])
    assert words in err and "config.json" in err, err
    assert not PY_EXCEPTION.search(err), err


@pytest.mark.parametrize("changes,words", [
    ({"num_local_experts": 4, "num_experts_per_tok": 0}, "1 ≤ experts per token ≤ experts, got 0 of 4"),
    ({"num_local_experts": 0}, "1 ≤ experts per token ≤ experts, got 2 of 0"),  # 0 is dense, but not for Mixtral
    ({"num_local_experts": 2, "num_experts_per_tok": 3}, "got 3 of 2"),
])
def test_a_mixture_of_experts_needs_its_experts(ws, changes, words):
    cfg = {**TINY_CONFIG, "model_type": "mixtral", "num_experts_per_tok": 2, **changes}
    (ws / "model" / "config.json").write_text(_dump_config(cfg))
    rc, out, err = cli("estimate", ws / "spec.toml")
    assert rc == 2 and words in err and "config.json" in err, err
    assert not PY_EXCEPTION.search(err), err


@pytest.mark.parametrize("model_type,key", [("smollm3", "no_rope_layer_interval"),
                                            ("llama4_text", "no_rope_layer_interval"),
                                            ("gemma3_text", "sliding_window_pattern")])
def test_a_zero_layer_interval_is_named(ws, model_type, key):
    cfg = {**TINY_CONFIG, "model_type": model_type, key: 0}
    (ws / "model" / "config.json").write_text(_dump_config(cfg))
    rc, out, err = cli("estimate", ws / "spec.toml")
    assert rc == 2 and f"{key} must be between 1" in err, err


# ------------------------------------------------------------------------------------------- plan.toml
@pytest.fixture(scope="module")
def plan_text(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("fuzzplan")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (d / "data.jsonl").write_text('{"text": "hello"}\n')
    (d / "spec.toml").write_text(tomli_w.dumps({
        "model": {"name": str(d / "model")}, "data": {"path": "data.jsonl", "num_examples": 8, "seq_len": 64},
        "hardware": {"gpu": "cpu", "memory_gib": 8}, "method": {"name": "lora", "rank": 4}}))
    rc, _, err = cli("generate", d / "spec.toml", "-o", d / "proj")
    assert rc == 0, err
    return (d / "proj" / "plan.toml").read_text()


toml_value = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True),
    st.text(max_size=30), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                max_size=2),
)
TABLES = ["model", "method", "data", "training", "output", "prediction", "launch", "provenance"]


@settings(max_examples=PLAN_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.sampled_from(TABLES), key=st.one_of(st.sampled_from(
    ["name", "rank", "alpha", "dropout", "target_modules", "path", "format", "seq_len", "packing", "eval_fraction",
     "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "optimizer", "learning_rate",
     "epochs", "precision", "dir", "parallelism", "devices_per_node", "nodes", "attention", "trust_remote_code"]),
    st.text(min_size=1, max_size=8)), value=toml_value, drop_table=st.sampled_from([None, *TABLES]))
def test_mutated_plan_toml(tmp_path, plan_text, table, key, value, drop_table):
    import tomllib

    doc = tomllib.loads(plan_text)
    doc.setdefault(table, {})
    if isinstance(doc[table], dict):
        doc[table][key] = value
    if drop_table:
        doc.pop(drop_table, None)
    path = tmp_path / "plan.toml"
    path.write_text(tomli_w.dumps(doc))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    # accepted: every value the runtime reads has the type it uses
    assert isinstance(cfg.training["micro_batch_size"], int) and cfg.training["micro_batch_size"] >= 1
    assert cfg.training["precision"] in ("bf16", "fp16", "fp32")
    assert math.isfinite(cfg.training["learning_rate"]) and cfg.training["learning_rate"] > 0
    assert isinstance(cfg.launch["devices_per_node"], int) and cfg.launch["devices_per_node"] >= 1


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"[model\n", b"a = [" * 3000, b"x = 1\n" * 3 + b"\x00"])
def test_unreadable_plan_toml_bytes(tmp_path, raw):
    path = tmp_path / "plan.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=str(path).replace("/", "\\/")):
        load_config(path)
