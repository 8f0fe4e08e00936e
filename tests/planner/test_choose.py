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
    # the expert review's situations (tests/planner/test_review_examples.py checks each one's point)
    "review/gemma2-9b-a100-3k.toml": ("dora", "bf16"),                # 3,000 examples: scarce; 80 GB holds 9B 16-bit
    "review/qwen2.5-72b-qlora-h100.toml": ("qlora", "bf16"),          # 72B 16-bit weights alone are 135 GiB > 80 GB
    "review/llama3.1-8b-dora-2k-a100.toml": ("dora", "bf16"),         # method.name set
    # 300 examples: scarce; 8B bf16 (15 GiB) fits 24 GB
    "review/llama3.1-8b-300-examples-4090.toml": ("dora", "bf16"),
    # 1M examples ask for full; with the chunked loss it has ≥ 20% free
    "review/llama3.1-8b-1m-examples-8xh100.toml": ("full", "bf16"),
    "review/llama3.1-8b-full-l40s-paged.toml": ("full", "bf16"),      # method.name set; fits only by paging
    "review/llama3.2-1b-full-cpu.toml": ("full", "fp32"),             # method.name set; CPU trains in fp32
    "review/mixtral-8x7b-lora-a100.toml": (None, "bf16"),             # 46.7B × 2 bytes = 87 GiB of weights > 76 usable
    "review/llama3.1-8b-fp16-on-a100.toml": ("lora", "fp16"),         # model.dtype set: respected, warned
    "review/llama3.1-8b-no-num-examples.toml": ("lora", "bf16"),      # no data size: not scarce, the default
    "review/mistral-7b-two-gpus-one-node.toml": ("lora", "bf16"),     # 10k examples: not scarce
    "review/phi3-mini-5k-l4.toml": ("lora", "bf16"),                  # 5,000 examples is not scarce (< 5,000 is)
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
    # Llama 3.1 8B QLoRA on a 12 GB card at 32k tokens: ~5 GiB of NF4 base and adapters, then one 32k-token
    # layer's working set (the 14336-wide MLP alone is 0.9 GiB per bf16 tensor) on top of the checkpoints
    r = None
    with pytest.raises(NothingFits) as exc:
        plan_spec(base(hardware={"gpu": "RTX-3060-12GB"}, data={"seq_len": 32768}))
    r = exc.value.plan
    assert any(s.startswith("data.seq_len = ") for s in r.suggestions), r.suggestions


def test_rank_falls_back_to_16_only_where_the_recipes_rank_does_not_fit():
    # 70B QLoRA on a 48 GB card: the recipe's r = 64 on all seven projections of 80 layers is
    # 80 · 64 · (2·8192+8192+1024 + 8192+1024 + 8192+8192 + 3·(8192+28672)) = 828 M adapter parameters; at r = 16,
    # 207 M. With fp32 weights and gradients and 8-bit Adam (4+4+2 bytes) that is 5.8 GiB less, which is what a 70B
    # NF4 base (~36 GiB) leaves room for on a 45.6 GiB usable card.
    assert 80 * 64 * (2 * 8192 + 8192 + 1024 + 8192 + 1024 + 8192 + 8192 + 3 * (8192 + 28672)) == 828_375_040
    spec = base(model={"name": "meta-llama/Llama-3.1-70B"}, hardware={"gpu": "RTX-A6000"},
                data={"num_examples": 2000, "seq_len": 2048})
    r = plan_spec(spec)
    assert r.chosen.method == "qlora" and r.chosen.fits
    assert r.chosen.setup.adapter.rank == 16
    assert r.hyperparameters["rank"].value == 16 and "r=64" in r.hyperparameters["rank"].why
    assert r.chosen.setup.adapter.alpha == 16 * 16 / 64  # the recipe's α/r = 16/64 kept
    # where the recipe's rank fits, it stays
    roomy = plan_spec(base(model={"name": "meta-llama/Llama-3.1-70B"}, hardware={"gpu": "H100-80GB"},
                           data={"num_examples": 2000, "seq_len": 2048}))
    assert roomy.best["qlora"].fits and roomy.best["qlora"].setup.adapter.rank == 64
    # a rank the user set is never lowered: nothing fits
    with pytest.raises(NothingFits):
        plan_spec(base(model={"name": "meta-llama/Llama-3.1-70B"}, hardware={"gpu": "RTX-A6000"},
                       data={"num_examples": 2000, "seq_len": 2048}, method={"name": "qlora", "rank": 64}))


def test_every_catalog_device_has_a_host_link_for_offloading():
    # B300 is PCIe Gen6: the offloading candidates priced its transfers from a table that stopped at Gen5 (KeyError)
    import tomllib

    from peftplan.planner import catalog
    from peftplan.planner.paging import host_link_gbps

    with (ROOT / "planner" / "data" / "gpus.toml").open("rb") as fh:  # the catalog file itself
        gens = {g["id"]: g.get("pcie_gen") for g in tomllib.load(fh)["gpus"]}
    assert 6 in gens.values()
    for dev in catalog.devices():
        gbps, _ = host_link_gbps(dev)
        gen = gens[dev.id]
        assert gbps == (16.0 * 2 ** (gen - 3) if gen else 32.0), dev.id  # each generation doubles Gen3's 16 GB/s
    r = plan_spec(base(model={"name": "meta-llama/Llama-3.2-3B"}, hardware={"gpu": "B300"},
                       data={"seq_len": 4096, "num_examples": 1000}))
    assert r.chosen.fits


def test_a_dense_model_that_writes_zero_experts_plans():
    # Granite 4.0 micro's config.json says num_local_experts = 0 (dense); the config check must not refuse it
    r = plan_spec(base(model={"name": "ibm-granite/granite-4.0-micro"}, hardware={"gpu": "A100-80GB"}))
    assert r.chosen.fits and r.report.model.shape.num_experts == 0


def test_caps_missed_while_another_method_does_not_fit_get_time_advice():
    # 70B on 8 × A100: full fine-tuning does not fit, the adapter methods fit but none within half an hour —
    # the answer is about time (packing, epochs, devices), not a shorter sequence
    spec = base(model={"name": "meta-llama/Llama-3.1-70B"}, hardware={"gpu": "A100-80GB", "count": 8},
                objective={"max_hours": 0.5}, data={"num_examples": 20000, "seq_len": 4096})
    with pytest.raises(NothingFits) as exc:
        plan_spec(spec)
    plan = exc.value.plan
    assert not plan.best["full"].fits and plan.best["lora"].fits
    assert plan.suggestions_for == "caps"
    assert "full" not in str(exc.value).split(":")[0] and "objective.max_hours = 0.5" in str(exc.value)


def test_forced_activation_offloading_turns_checkpointing_on():
    # offloading moves the checkpointed layer inputs: without checkpointing there is nothing it would move
    r = plan_spec(base(training={"activation_offloading": True}))
    assert r.chosen.setup.offload and r.chosen.setup.geometry.gradient_checkpointing


def test_a_tight_plan_is_said_even_when_an_unused_variant_is_roomier():
    # 8B LoRA on a 40 GB card at 1024 tokens: the recipe's r=64 fills ~98% of the usable memory; an r=16
    # candidate that the planner does not take (the recipe's rank fits) must not hide the warning
    r = plan_spec(base(hardware={"gpu": "A100-40GB"}, data={"num_examples": 2000, "seq_len": 1024}))
    fill = r.chosen.needed_bytes / r.report.usable_bytes
    assert r.chosen.setup.adapter.rank == 64
    assert fill > 0.95
    assert any("of the usable memory" in w for w in r.warnings), r.warnings


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
    # LoRA, Llama 3.1 8B, 20k examples × 2048 tokens (no avg_tokens: every example fills its row) × 2 epochs; 1,000
    # examples held out (5%, at most 1,000). The time model's own arithmetic is pinned in test_throughput.py; here the
    # plan's plumbing: which tokens it counts, its steps, and the cost from the time.
    r = plan_spec(base(method={"name": "lora"}, training={"gradient_checkpointing": False, "micro_batch_size": 2}))
    c = r.chosen
    train = 20000 - 1000
    assert c.time.count.num_examples == train
    assert c.time.tokens == train * 2048 * 2  # full rows: nothing to pad, nothing gained by packing
    assert not c.packing
    per_step = 2 * c.accumulation
    assert c.time.optimizer_steps == 2 * -(-train // per_step)
    assert r.steps_per_epoch == -(-train // per_step)
    assert c.cost_usd == pytest.approx(c.time.seconds / 3600 * r.report.hardware.device.price_usd_per_hour, rel=1e-6)
    assert c.time.low_seconds < c.time.seconds < c.time.high_seconds


def test_steps_per_epoch():
    # 20,000 examples: 1,000 are held out for evaluation (10%, at most 1,000), 19,000 train in steps of 16
    r = plan_spec(base(method={"name": "lora"}, training={"micro_batch_size": 4, "gradient_accumulation_steps": 4}))
    assert r.steps_per_epoch == -(-19000 // 16)


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
