"""Decisions of `peftplan plan`: every example, forced keys, precision, nothing-fits, time and cost.

Expected choices are written here from the rules in planner/rules.py and the memory each setting
obviously needs (e.g. a 70B model's 16-bit weights alone are 131 GiB), not read back from the planner.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftplan.planner.choose import NothingFits, plan_spec
from peftplan.planner.plan_report import plan_json
from peftplan.schemas import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# example file -> (chosen method or None when nothing fits, precision)
EXPECTED = {
    "dora-little-data.toml": ("dora", "bf16"),            # 2,000 examples, quality first, 80 GB
    "llama-1b-on-cpu.toml": ("dora", "fp32"),             # 500 examples; CPU trains in fp32
    "llama-70b-8x-a100.toml": ("lora", "bf16"),           # FSDP over 8: 141 GB of 16-bit weights / 8 per device
    "llama-70b-on-one-80gb.toml": ("qlora", "bf16"),      # the QLoRA use case
    "llama-8b-on-t4.toml": ("qlora", "fp16"),             # 16 GB, no bf16, 20k examples
    "llama3-8b-lora-a100.toml": ("lora", "bf16"),         # method.name set
    "nothing-fits-405b-on-4090.toml": (None, "bf16"),     # 405B even in 4-bit is ~200 GB
    "qlora-paper-65b-on-48gb.toml": ("qlora", "bf16"),    # the QLoRA paper's headline
    "qwen-7b-long-context-32k.toml": ("dora", "bf16"),    # 2,000 examples, 141 GB H200
    "vicuna-7b-qdora-24gb.toml": ("qdora", "bf16"),       # method.name set
    "quickstart/spec.toml": ("lora", "fp32"),             # the offline CPU quickstart (method.name set)
    "llama-405b-8x-h100-qlora-fsdp.toml": ("qlora", "bf16"),  # 4-bit 405B ≈ 203 GB: /8 per device
    "llama-70b-two-nodes.toml": ("lora", "bf16"),         # 16 × H100: the 16-bit base sharded, 50k examples
}


def all_examples():
    found = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.toml"))
    walked = sorted(os.path.relpath(os.path.join(d, f), EXAMPLES) for d, _, fs in os.walk(EXAMPLES)
                    for f in fs if f.endswith(".toml"))
    return found, walked


def test_every_example_has_an_expectation():
    found, walked = all_examples()
    assert found == walked
    assert len(found) >= 10
    assert set(found) == set(EXPECTED), set(found) ^ set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_plan(name, tmp_path):
    method, precision = EXPECTED[name]
    path = EXAMPLES / name
    if not path.exists():
        pytest.fail(f"{name} is expected but missing")
    if name.startswith("quickstart/"):  # its model and data are built by examples/quickstart/build.py
        pytest.importorskip("torch", reason="building the quickstart model needs the [train] extra")
        import runpy

        runpy.run_path(str(EXAMPLES / "quickstart" / "build.py"))["main"](tmp_path)
        (tmp_path / "spec.toml").write_text(path.read_text())
        path = tmp_path / "spec.toml"
    spec = load_spec(path)
    if method is None:
        with pytest.raises(NothingFits) as exc:
            plan_spec(spec, base_dir=path.parent)
        assert "short" in str(exc.value)
        assert exc.value.plan.suggestions
        return
    result = plan_spec(spec, base_dir=path.parent)
    assert result.chosen.method == method, (result.chosen.method, result.reasons)
    assert result.chosen.fits
    assert result.report.resolved.precision == precision
    assert result.chosen.needed_bytes <= result.report.usable_bytes


def base(**over):
    spec = {"model": {"name": "meta-llama/Llama-3.1-8B"}, "hardware": {"gpu": "A100-80GB"},
            "data": {"num_examples": 20000, "seq_len": 2048}}
    for k, v in over.items():
        spec.setdefault(k, {}).update(v)
    return spec_from_dict(spec)


def test_user_set_keys_are_respected():
    r = plan_spec(base(training={"micro_batch_size": 3, "gradient_checkpointing": True, "optimizer": "adamw_8bit",
                                 "gradient_accumulation_steps": 5}, method={"rank": 8, "alpha": 8}))
    c = r.chosen
    assert c.setup.geometry.micro_batch_size == 3 and c.setup.geometry.gradient_checkpointing
    assert c.setup.optimizer == "adamw_8bit" and c.accumulation == 5
    if c.method != "full":
        assert r.hyperparameters["rank"].value == 8 and r.hyperparameters["rank"].user_set
        assert c.setup.adapter.rank == 8 and c.setup.adapter.alpha == 8


def test_default_with_enough_memory_and_data_is_lora():
    assert plan_spec(base()).chosen.method == "lora"


def test_qlora_when_16bit_base_does_not_fit():
    # 8B in bf16 is 15 GiB of weights alone: not on a 16 GB card with activations
    r = plan_spec(base(hardware={"gpu": "T4"}))
    assert r.chosen.method == "qlora"
    assert any(x["method"] == "lora" and "over" in x["why"] for x in r.rejected)


def test_fp16_on_devices_without_bf16():
    r = plan_spec(base(hardware={"gpu": "V100-32GB"}))
    assert r.report.resolved.precision == "fp16"
    assert r.chosen.setup.dtype == "float16"


def test_forced_method_that_does_not_fit_exits_3_naming_the_key(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[model]\nname = "meta-llama/Llama-3.1-70B"\n[hardware]\ngpu = "A100-80GB"\n'
                    '[method]\nname = "full"\n[data]\nnum_examples = 1000\nseq_len = 1024\n')
    proc = subprocess.run([sys.executable, "-m", "peftplan", "plan", str(spec)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 3, proc.stderr
    assert "method.name = 'full' does not fit" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "qlora" in proc.stderr  # what would fit


def test_nothing_fits_suggests_a_shorter_sequence():
    # Llama 3.1 8B QLoRA on a 12 GB card at 32k tokens: the logits alone are 12 B × 32k × 128k = 47 GiB
    r = None
    with pytest.raises(NothingFits) as exc:
        plan_spec(base(hardware={"gpu": "RTX-3060-12GB"}, data={"seq_len": 32768}))
    r = exc.value.plan
    assert any(s.startswith("data.seq_len = ") for s in r.suggestions), r.suggestions


def test_objective_limits_reject_slow_plans():
    with pytest.raises(NothingFits) as exc:
        plan_spec(base(objective={"max_hours": 0.01}))
    assert "objective.max_hours" in str(exc.value)


def test_priority_memory_picks_smallest_and_speed_fastest():
    mem = plan_spec(base(objective={"priority": "memory"}))
    fast = plan_spec(base(objective={"priority": "speed"}))
    assert mem.chosen.needed_bytes == min(c.needed_bytes for c in mem.best.values() if c.fits)
    assert fast.chosen.seconds == min(c.seconds for c in fast.best.values() if c.fits)
    assert mem.chosen.method in ("qlora", "qdora")


def test_time_and_cost_by_hand():
    # LoRA, Llama 3.1 8B, 20k examples × 2048 tokens × 2 epochs (20k examples → 2 epochs)
    r = plan_spec(base(method={"name": "lora"}, training={"gradient_checkpointing": False, "micro_batch_size": 2}))
    c = r.chosen
    tokens = 20000 * 2048 * 2
    assert c.time.tokens == tokens
    n = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 128256 * 4096  # multiplied weights
    attn = 2 * 2 * 32 * 2048 * 32 * 128 * 0.5
    fwd = 2 * n + attn
    lora = 2 * 16 * 32 * sum(i + o for i, o in ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                                      (4096, 14336), (4096, 14336), (14336, 4096)))
    per_token = 2 * fwd + 3 * lora
    mfu_mid = (0.25 + 0.42) / 2
    seconds = tokens * per_token / (312e12 * mfu_mid)
    assert c.time.seconds == pytest.approx(seconds, rel=1e-6)
    assert c.cost_usd == pytest.approx(seconds / 3600 * r.report.hardware.device.price_usd_per_hour, rel=1e-6)
    assert c.time.low_seconds < c.time.seconds < c.time.high_seconds


def test_steps_per_epoch():
    r = plan_spec(base(method={"name": "lora"}, training={"micro_batch_size": 4, "gradient_accumulation_steps": 4}))
    assert r.steps_per_epoch == -(-20000 // 16)


def test_plan_json_contract():
    out = plan_json(plan_spec(base()))
    json.dumps(out)
    for key in ("model", "hardware", "geometry", "methods", "chosen", "rejected"):
        assert key in out
    ch = out["chosen"]
    for key in ("method", "reasons", "hyperparameters", "geometry", "parallelism", "precision", "estimate", "time",
                "cost_usd"):
        assert key in ch
    assert set(ch["time"]) >= {"tokens", "seconds", "low_seconds", "high_seconds"}
    assert set(out["methods"]) == {"full", "lora", "qlora", "dora", "qdora"}
    assert all(isinstance(r["why"], str) and r["why"] for r in out["rejected"])
