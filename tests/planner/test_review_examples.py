"""The expert review's situations (examples/review/*.toml), each planned, with what an expert expects written
here by hand from the sources in planner/hyper.py, planner/rules.py and planner/caveats.py."""

import math
import tomllib
from pathlib import Path

import pytest

from peftplan.planner.choose import NothingFits, plan_spec
from peftplan.planner.memory import estimate
from peftplan.planner.plan_report import plan_json
from peftplan.planner.report import estimate_spec
from peftplan.schemas import SpecError, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
REVIEW = ROOT / "examples" / "review"
EXPECTED_FILES = {
    "gemma2-9b-a100-3k.toml", "qwen2.5-72b-qlora-h100.toml", "llama3.1-8b-dora-2k-a100.toml",
    "llama3.1-8b-300-examples-4090.toml", "llama3.1-8b-1m-examples-8xh100.toml", "llama3.1-8b-full-l40s-paged.toml",
    "llama3.2-1b-full-cpu.toml", "mixtral-8x7b-lora-a100.toml", "llama3.1-8b-fp16-on-a100.toml",
    "llama3.1-8b-no-num-examples.toml", "mistral-7b-two-gpus-one-node.toml", "phi3-mini-5k-l4.toml",
}
# Llama 3.1 8B: weights of the decoder linears of one layer (q, o 4096²; k, v 4096×1024; gate, up, down 4096×14336)
LLAMA8B_LAYER_LINEARS = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336


def plan(name):
    return plan_spec(load_spec(REVIEW / name))


def generate_with_data(name, tmp_path, data_extra=""):
    """The example's spec with a data file next to it, generated into tmp_path/p."""
    from peftplan.planner.project import generate

    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    text = (REVIEW / name).read_text().replace("[data]\n", f'[data]\npath = "d.jsonl"\n{data_extra}', 1)
    spec_path = tmp_path / name
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    generate(plan_spec(spec, base_dir=tmp_path), spec, spec_path, tmp_path / "p")
    return tmp_path / "p"


def test_every_review_situation_is_an_example():
    assert {p.name for p in REVIEW.glob("*.toml")} == EXPECTED_FILES


# 1. Gemma 2: the attention comes from the architecture, in the plan, the estimate and plan.toml
def test_gemma2_plans_eager_attention_everywhere(tmp_path):
    r = plan("gemma2-9b-a100-3k.toml")
    assert plan_json(r)["chosen"]["geometry"]["attention"] == "eager"
    assert estimate_spec(load_spec(REVIEW / "gemma2-9b-a100-3k.toml")).resolved.setup.geometry.attention == "eager"
    assert tomllib.loads((generate_with_data("gemma2-9b-a100-3k.toml", tmp_path) / "plan.toml").read_text())[
        "model"]["attention"] == "eager"


def test_gemma2_with_sdpa_set_is_refused_naming_the_key():
    s = spec_from_dict({"model": {"name": "google/gemma-2-9b"}, "hardware": {"gpu": "A100-80GB"},
                        "training": {"attention": "sdpa"}})
    with pytest.raises(SpecError) as exc:
        estimate_spec(s)
    assert [p.key for p in exc.value.problems] == ["training.attention"]


# 2. alpha and learning rate from one recipe: QLoRA's r=64, alpha=16 at 1e-4 for 65-72B
def test_72b_qlora_uses_the_qlora_pairing():
    h = plan("qwen2.5-72b-qlora-h100.toml").hyperparameters
    assert (h["rank"].value, h["alpha"].value, h["learning_rate"].value) == (64, 16.0, 1e-4)
    assert h["alpha"].value / h["rank"].value * h["learning_rate"].value == pytest.approx(0.25 * 1e-4)
    assert h["learning_rate"].warning is None


# 3. DoRA's learning rate is below LoRA's, as in the DoRA authors' runs
def test_dora_learning_rate_is_the_dora_authors():
    r = plan("llama3.1-8b-dora-2k-a100.toml")
    assert r.chosen.method == "dora"
    assert r.hyperparameters["learning_rate"].value == 1e-4  # NVlabs/DoRA: Llama-3-8B, r=32
    assert (r.hyperparameters["rank"].value, r.hyperparameters["alpha"].value) == (32, 64.0)
    assert "NVlabs/DoRA" in r.hyperparameters["learning_rate"].why


# 4. the effective batch follows the data and the devices
def test_effective_batch_scales_with_data_and_devices():
    small = plan("llama3.1-8b-300-examples-4090.toml").chosen
    big = plan("llama3.1-8b-1m-examples-8xh100.toml").chosen
    assert small.effective_batch == 8
    assert big.effective_batch == 128 and big.devices == 8
    assert big.micro_batch * big.accumulation * 8 == 128


# 5. held-out evaluation by default where data is scarce, and evaluate.py never evaluates on training data quietly
def test_small_data_gets_a_held_out_split(tmp_path):
    r = plan("llama3.1-8b-300-examples-4090.toml")
    assert r.hyperparameters["eval_fraction"].value == pytest.approx(0.1)
    c = r.chosen
    assert c.time.count.num_examples == 270  # 30 held out, 270 train
    per_step = c.micro_batch * c.accumulation
    if c.packing:  # rows of seq_len tokens packed from 270 examples of the assumed mean length
        rows = math.ceil(270 * r.lengths.mean / c.setup.geometry.seq_len)
        assert r.steps_per_epoch == math.ceil(rows / per_step)
    else:
        assert r.steps_per_epoch == math.ceil(270 / per_step)
    p = generate_with_data("llama3.1-8b-300-examples-4090.toml", tmp_path)
    assert tomllib.loads((p / "plan.toml").read_text())["data"]["eval_fraction"] == pytest.approx(0.1)
    readme = (p / "README.md").read_text()
    assert "held-out split (10.0% of the examples)" in readme and "No held-out split" not in readme


def test_no_held_out_split_is_said_and_evaluate_refuses(tmp_path, capsys):
    p = generate_with_data("llama3.1-8b-300-examples-4090.toml", tmp_path, "eval_fraction = 0.0\n")
    readme = (p / "README.md").read_text()
    assert "No held-out split" in readme and "--split train" in readme
    from peftplan.runtime.evaluate import main

    (p / "outputs" / "final").mkdir(parents=True)
    assert main(["--config", str(p / "plan.toml")]) == 2
    err = capsys.readouterr().err
    assert "no held-out split" in err and "--split train" in err


# 6. DoRA's dropout: its memory reason holds only without gradient checkpointing; its time is counted
def test_dora_dropout_memory_only_without_checkpointing():
    r = plan("llama3.1-8b-dora-2k-a100.toml")
    s = r.chosen.setup
    assert s.adapter.dropout == 0.05 and s.geometry.gradient_checkpointing  # method set, dropout left to the recipe
    no_drop = type(s.adapter)(s.adapter.rank, s.adapter.alpha, 0.0, s.adapter.target_modules)

    def total(gc, adapter):
        g = type(s.geometry)(**{**s.geometry.__dict__, "gradient_checkpointing": gc})
        return estimate("dora", type(s)(**{**s.__dict__, "geometry": g, "adapter": adapter})).device_total_bytes

    copy = 2 * LLAMA8B_LAYER_LINEARS  # one layer's adapted weights in bf16
    # one recomputed layer's dropout: a 1-byte mask and the 2-byte dropped input per adapted module's input
    # q, k, v, o, gate, up read 4096 features; down reads 14336 of Llama-3.1-8B (hidden 4096, mlp 14336)
    inputs = 4096 * 6 + 14336
    dropped = s.geometry.tokens * inputs * 3
    with_gc = total(True, s.adapter) - total(True, no_drop)
    assert 0 <= with_gc <= 1.1 * (copy + dropped)  # at most one recomputed layer's (+10% allocator reserve)
    without_gc = total(False, s.adapter) - total(False, no_drop)
    assert without_gc >= 0.95 * 32 * copy  # every layer keeps its copies


def test_dora_dropout_time_counts_the_second_matmul():
    from peftplan.planner import choose

    r = plan("llama3.1-8b-dora-2k-a100.toml")
    c = r.chosen
    cands = choose._candidates(load_spec(REVIEW / "llama3.1-8b-dora-2k-a100.toml"), r.report, "dora", r.hyperparameters,
                               r.lengths)
    same = [x for x in cands if x.setup.geometry == c.setup.geometry and x.setup.optimizer == c.setup.optimizer
            and x.packing == c.packing]
    by_dropout = {x.setup.adapter.dropout: x for x in same}
    # the second base matmul adds 6·N_adapted per token (forward, recompute, input gradient) to a step of about
    # 6·N (forward, recompute, backward of a frozen base): close to doubling, a little less (attention, head)
    ratio = by_dropout[0.05].seconds / by_dropout[0.0].seconds
    assert 1.6 < ratio < 2.0
    assert any("on the dropped input" in a for a in c.time.assumptions)


def test_scarce_data_weighs_dora_with_and_without_dropout():
    r = plan("llama3.1-8b-300-examples-4090.toml")
    assert r.chosen.method == "dora" and r.chosen.setup.adapter.dropout == 0.0
    why = r.hyperparameters["dropout"].why
    assert "base matmul" in why and "lora's time" in why
    assert any("without dropout" in x for x in r.reasons)


# 7. paging that is required to fit is said plainly and costs time; bf16 rounding is warned
def test_full_fine_tune_on_l40s_fits_only_by_paging():
    r = plan("llama3.1-8b-full-l40s-paged.toml")
    c = r.chosen
    assert c.method == "full" and c.setup.optimizer.startswith("paged_")
    assert c.paging is not None
    assert c.paging.bytes == c.estimate.device_total_bytes - r.report.usable_bytes
    assert c.paging.seconds_per_step[1] == pytest.approx(2 * c.paging.bytes / 16e9)  # Gen4 x16: 32 GB/s, half
    steps = c.time.tokens / (1024 * c.effective_batch)
    assert any(x.startswith("fits only by paging") for x in r.reasons)
    assert any("paged" in w for w in r.warnings)
    assert any("61%" in w for w in r.warnings)  # 2e-5: |w| > 0.01 of N(0, 0.02) keep their value
    assert c.time.seconds > steps * c.paging.seconds_per_step[1]


def test_on_the_cpu_nothing_counts_as_paged():
    c = plan("llama3.2-1b-full-cpu.toml").chosen
    assert c.needed_bytes == c.estimate.device_total_bytes and c.paging is None


# 8. mixture of experts: said why, and only supported devices suggested
def test_mixtral_advice_names_nvidia_devices_only():
    with pytest.raises(NothingFits) as exc:
        plan("mixtral-8x7b-lora-a100.toml")
    r = exc.value.plan
    larger = [s for s in r.suggestions if s.startswith("a larger device")]
    # ~98 GiB with nothing paged: H100 NVL (93.6 GiB) and GH200 (96 GiB) are too small; the MI250X's "128 GB" is
    # two 64 GB devices to PyTorch and AMD is not advised: the H200 (140 GiB) is the smallest that holds it
    assert larger and larger[0].startswith("a larger device: H200 ")
    assert any(s.startswith('method.name = "qlora"') for s in r.suggestions)
    warnings = [p.message for p in r.report.resolved.warnings]
    assert any("adapters skip the experts" in w for w in warnings)


@pytest.mark.parametrize("runtime_quantizes_experts", [True, False])
def test_mixtral_4bit_caveat_agrees_with_the_estimate(monkeypatch, runtime_quantizes_experts):
    """The 16-bit-experts caveat is there exactly when the 4-bit estimate leaves the experts in 16-bit: absent with
    the runtime's NF4 experts, said when a runtime leaves them in 16-bit (assumptions.QUANTIZE_FUSED_EXPERTS)."""
    from peftplan.planner import assumptions
    from peftplan.planner.caveats import quantized_params

    monkeypatch.setattr(assumptions, "QUANTIZE_FUSED_EXPERTS", runtime_quantizes_experts)
    rep = estimate_spec(load_spec(REVIEW / "mixtral-8x7b-lora-a100.toml"))
    experts = 32 * 8 * 3 * 4096 * 14336  # layers × experts × (gate, up, down) × h × i = 45.1B
    dense_linears = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)  # attention q, o, k, v
    left_in_16bit = quantized_params(rep.estimates["qlora"]) < dense_linears + experts
    said = any("expert weights in 16-bit" in p.message for p in rep.resolved.warnings)
    assert left_in_16bit == (not runtime_quantizes_experts)
    assert said == left_in_16bit


# 9. the smaller items
def test_json_notes_state_the_values_the_plan_chose():
    out = plan_json(plan("llama3.1-8b-fp16-on-a100.toml"))
    h = out["chosen"]["hyperparameters"]
    assert f"method.dropout not set: {h['dropout']!r}" in " ".join(out["notes"])
    assert h["dropout"] == 0.1  # QLoRA recipe, 8B
    assert not any(n.startswith("method.dropout not set: 0.05") for n in out["notes"])
    assert any(n.startswith(f"training.micro_batch_size not set: {out['chosen']['geometry']['micro_batch_size']}")
               for n in out["notes"])


def test_rejected_methods_name_their_own_geometry():
    r = plan("gemma2-9b-a100-3k.toml")
    different = [x for x in r.rejected if "at its own best geometry" in x["why"]]
    assert different  # at least one alternative was compared at another geometry, and says so


def test_fp16_on_a_bf16_card_is_warned():
    r = plan("llama3.1-8b-fp16-on-a100.toml")
    assert r.report.resolved.precision == "fp16"
    assert any(p.key == "model.dtype" and p.severity == "warning" for p in r.report.resolved.warnings)


def test_estimate_says_when_nothing_fits():
    assert estimate_spec(load_spec(ROOT / "examples" / "nothing-fits-405b-on-4090.toml")).nothing_fits
    assert not estimate_spec(load_spec(REVIEW / "qwen2.5-72b-qlora-h100.toml")).nothing_fits


def test_one_node_two_gpus_readme_has_no_node_ranks(tmp_path):
    readme = (generate_with_data("mistral-7b-two-gpus-one-node.toml", tmp_path) / "README.md").read_text()
    assert "MACHINE_RANK" not in readme and "run `./run.sh` once" in readme


def test_without_num_examples_the_geometry_is_still_ranked_and_the_gaps_are_said():
    r = plan("llama3.1-8b-no-num-examples.toml")
    assert r.chosen.time is None and r.chosen.cost_usd is None and r.steps_per_epoch is None
    assert any(w.startswith("data.num_examples not set") for w in r.warnings)
    # the same spec with a data size whose batch rule gives the same 16 sequences picks the same geometry
    sized = plan_spec(spec_from_dict({"model": {"name": "meta-llama/Llama-3.1-8B"}, "hardware": {"gpu": "A100-80GB"},
                                      "data": {"seq_len": 2048, "num_examples": 9846}}))
    a, b = r.chosen, sized.chosen
    assert (a.method, a.micro_batch, a.setup.geometry.gradient_checkpointing, a.setup.optimizer) == \
        (b.method, b.micro_batch, b.setup.geometry.gradient_checkpointing, b.setup.optimizer)


def test_estimate_and_plan_agree_at_the_same_geometry():
    s = load_spec(ROOT / "examples" / "llama3-8b-lora-a100.toml")  # micro-batch, checkpointing, adapter all set
    r = plan_spec(s)
    assert r.best["lora"].setup.optimizer == "adamw_torch"
    assert r.best["lora"].estimate.device_total_bytes == estimate_spec(s).estimates["lora"].device_total_bytes
