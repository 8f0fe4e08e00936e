"""Per-device memory under DDP / FSDP / ZeRO, the parallelism the planner picks, and the launch files."""

import json
import tomllib
from pathlib import Path

import pytest

from peftplan.planner import AdapterSettings, Geometry, Setup, estimate, shape_from_config
from peftplan.planner.choose import plan_spec
from peftplan.planner.parallel import Topology, comm_seconds_per_step, per_device, shard
from peftplan.schemas import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
LAYER_PARAMS = 256 * 256 * 2 + 256 * 64 * 2 + 3 * 256 * 688


def setup():
    return Setup(shape_from_config(CFG), Geometry(2, 128, False, 1, "sdpa", False), AdapterSettings(8, 16, 0.0),
                 "adamw_torch", "bfloat16", "cuda")


def by_component(est):
    out = {}
    for t in est.terms:
        out[t.component] = out.get(t.component, 0) + t.bytes
    return out


def labelled(terms, prefix):
    return [t.bytes for t in terms if t.label.startswith(prefix)]


def test_fsdp_full_fine_tuning_is_fp32_sharded():
    """accelerate upcasts trainable bf16 parameters to fp32 under FSDP2 mixed precision: weights 4 B,
    AdamW's two states 4 B each, all over 4 devices; activations and logits are the single device's."""
    s = setup()
    P = shape_from_config(CFG).parameters
    one_est = estimate("full", s)
    four = shard(one_est, s, "fsdp", 4)
    c = by_component(four)
    assert abs(c["weights"] - 4 * P / 4) <= 8
    assert abs(c["optimizer"] - 2 * 4 * P / 4) <= 8
    for moment in ("loss", "layer"):  # each device runs its own micro-batch: the same activations
        same = [(t.component, t.bytes) for t in one_est.phase_terms[moment] if t.component in ("activations", "logits")]
        assert same == [(t.component, t.bytes) for t in four.phase_terms[moment]
                        if t.component in ("activations", "logits")]
    layer = labelled(four.phase_terms["layer"], "FSDP one layer's unsharded gradients")
    assert layer == [LAYER_PARAMS * 2]


def test_fsdp_lora_shards_and_gathers_what_accelerate_gathers():
    s = setup()
    one_est = estimate("lora", s)
    one = by_component(one_est)
    four = per_device("lora", s, "fsdp", 4)
    c = by_component(four)
    P = shape_from_config(CFG).parameters
    assert abs(c["weights"] - 2 * P / 4) <= 1
    assert abs(c["optimizer"] - one["optimizer"] / 4) <= 1 and abs(c["adapter"] - one["adapter"] / 4) <= 1
    # adapters compute in bf16 under FSDP's mixed precision; on one device the runtime keeps adapter inputs 16-bit
    # as well (assumptions.LORA_INPUTS_UNCAST), so q/k/v and gate/up share their input either way
    assert one["activations"] == c["activations"]
    # lm_head + final norm (untied: the embeddings are their own unit, freed after forward) at the loss, twice with
    # the chunked loss (it runs inside lm_head's call: the all-gather's output and the unsharded view, measured on
    # two CPU ranks); two bf16 layers (current + prefetched) inside backward
    assert labelled(four.phase_terms["loss"], "FSDP tail unit") == [2 * (1000 * 256 + 256) * 2]
    assert labelled(four.phase_terms["layer"], "FSDP gathered layers") == [2 * LAYER_PARAMS * 2]
    assert not labelled(four.phase_terms["loss"], "FSDP gathered layers")


def test_estimate_reports_per_device_numbers_and_each_methods_parallelism():
    """8 × A100 80GB, Llama-3.1-70B, parallelism auto: a 16-bit base (141 GB) cannot be replicated, so LoRA
    shards it (FSDP: 2 bytes × P / 8 of weights per device); the 4-bit base (~38 GB) fits replicated (DDP)."""
    from peftplan.planner.catalog import find_model
    from peftplan.planner.report import estimate_spec

    rep = estimate_spec(load_spec(ROOT / "examples" / "llama-70b-8x-a100.toml")).to_json()
    assert rep["parallelism"] == "auto"
    lora, qlora = rep["methods"]["lora"], rep["methods"]["qlora"]
    assert (lora["parallelism"], lora["devices"]) == ("fsdp", 8)
    assert (qlora["parallelism"], qlora["devices"]) == ("ddp", 8)
    P = shape_from_config(find_model("meta-llama/Llama-3.1-70B").config).parameters
    assert abs(lora["components"]["weights"] - 2 * P / 8) <= 8
    spec = load_spec(ROOT / "examples" / "llama-70b-8x-a100.toml")
    fixed = spec.model_copy(update={"training": spec.training.model_copy(update={"parallelism": "ddp"})})
    rep = estimate_spec(fixed).to_json()
    assert {m["parallelism"] for m in rep["methods"].values()} == {"ddp"}
    assert rep["methods"]["lora"]["components"]["weights"] == 2 * P  # replicated


def test_ddp_replicates_and_adds_gradient_buckets():
    s = setup()
    one = by_component(estimate("full", s))
    two = by_component(shard(estimate("full", s), s, "ddp", 2))
    assert two["weights"] == one["weights"] and two["optimizer"] == one["optimizer"]
    assert two["transient"] - one.get("transient", 0) == one["weights"]  # buckets = gradient bytes (bf16)


def test_zero_keeps_an_fp32_master_copy():
    s = setup()
    est = estimate("lora", s)
    z2 = by_component(shard(est, s, "deepspeed-zero2", 4))
    n = est.trainable_parameters
    assert abs(z2["optimizer"] - (8 * n / 4 + 4 * n / 4)) <= 2  # AdamW fp32 states + fp32 master, sharded
    assert z2["weights"] == by_component(est)["weights"]  # ZeRO-2 keeps weights whole


def test_comm_time_by_hand():
    s = setup()
    est = estimate("full", s)
    topo = Topology(count=4, nodes=1, intra_gbps=100.0, inter_gbps=12.5)
    grads = 2 * shape_from_config(CFG).parameters
    assert comm_seconds_per_step(est, s, "ddp", topo) == pytest.approx(2 * 3 / 4 * grads / 100e9)
    two_nodes = Topology(count=4, nodes=2, intra_gbps=100.0, inter_gbps=12.5)
    assert comm_seconds_per_step(est, s, "ddp", two_nodes) == pytest.approx(2 * 7 / 8 * grads / 12.5e9)


@pytest.mark.parametrize("name,method,parallelism,devices", [
    ("llama-70b-8x-a100.toml", "lora", "fsdp", 8),
    ("llama-405b-8x-h100-qlora-fsdp.toml", "qlora", "fsdp", 8),
    ("llama-70b-two-nodes.toml", "lora", "fsdp", 16),
])
def test_examples_choose_sharding(name, method, parallelism, devices):
    r = plan_spec(load_spec(ROOT / "examples" / name))
    assert (r.chosen.method, r.chosen.parallelism, r.chosen.devices) == (method, parallelism, devices)
    assert any("per device" in x and "devices" in x for x in r.reasons)


def test_one_device_example_stays_single():
    r = plan_spec(load_spec(ROOT / "examples" / "llama3-8b-lora-a100.toml"))
    assert r.chosen.parallelism == "single" and r.chosen.devices == 1


def test_nothing_fits_suggests_more_devices():
    from peftplan.planner.choose import NothingFits

    spec = spec_from_dict({"model": {"name": "meta-llama/Llama-3.1-70B"}, "hardware": {"gpu": "A100-80GB"},
                           "method": {"name": "lora"}, "data": {"num_examples": 1000, "seq_len": 1024}})
    with pytest.raises(NothingFits) as exc:
        plan_spec(spec)
    assert any(s.startswith("hardware.count = ") and "FSDP" in s for s in exc.value.plan.suggestions)


@pytest.mark.parametrize("parallelism,stage", [("fsdp", None), ("deepspeed-zero2", 2), ("deepspeed-zero3", 3)])
def test_generated_launch_files_for_sharding(tmp_path, parallelism, stage):
    from peftplan.planner.project import generate

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(f'[model]\nname = "meta-llama/Llama-3.1-70B"\n[data]\npath = "d.jsonl"\nnum_examples = 1000\n'
                         f'seq_len = 1024\n[hardware]\ngpu = "H100-SXM"\ncount = 8\nnodes = 2\n'
                         f'[method]\nname = "qlora"\n'
                         f'[training]\nparallelism = "{parallelism}"\n')
    spec = load_spec(spec_path)
    generate(plan_spec(spec, base_dir=tmp_path), spec, spec_path, tmp_path / "p")
    p = tmp_path / "p"
    cfg = (p / "accelerate_config.yaml").read_text()
    assert "num_machines: 2" in cfg and "num_processes: 16" in cfg
    assert tomllib.loads((p / "plan.toml").read_text())["launch"] == {"parallelism": parallelism,
                                                                      "devices_per_node": 8, "nodes": 2}
    if stage is None:
        assert 'distributed_type: "FSDP"' in cfg and "fsdp_version: 2" in cfg
    else:
        assert 'distributed_type: "DEEPSPEED"' in cfg and "deepspeed_config_file: ds_config.json" in cfg
        assert json.loads((p / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage
    run = (p / "run.sh").read_text()
    assert "--machine_rank" in run and "MAIN_PROCESS_IP" in run and "accelerate launch" in run
    assert "MACHINE_RANK=1" in (p / "README.md").read_text()
