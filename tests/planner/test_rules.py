"""The planner's rules, one by one, against numbers written here from their sources (planner/hyper.py,
planner/rules.py, planner/paging.py, planner/caveats.py docstrings), never read back from the planner."""

import math

import pytest

from peftplan.planner import caveats, hyper, rules
from peftplan.planner.catalog import cpu_device, find_device
from peftplan.planner.memory import estimate
from peftplan.planner.paging import host_link_gbps, needed_bytes, paging_cost
from peftplan.planner.report import GLYPHS, breakdown_bar
from peftplan.planner.shapes import shape_from_config
from peftplan.planner.terms import COMPONENTS, AdapterSettings, Geometry, Setup
from peftplan.schemas import spec_from_dict


def spec(**over):
    d = {"model": {"name": "meta-llama/Llama-3.1-8B"}, "hardware": {"gpu": "A100-80GB"}}
    for k, v in over.items():
        d.setdefault(k, {}).update(v)
    return spec_from_dict(d)


def hp(name, params=8.03e9, n=10_000, devices=1, scarce=False, **over):
    s = spec(**over)
    return hyper.choose_hyperparameters(name, int(params), n, s.method, s.training, devices=devices,
                                        spec_eval_fraction=s.data.eval_fraction, scarce=scarce)


# --- effective batch: largest power of two in [8, 128] with >= 400 steps per epoch; whole sequences per device
@pytest.mark.parametrize("n,devices,expected", [
    (300, 1, 8), (3_000, 1, 8), (9_846, 1, 16),  # QLoRA's OASST1: 16
    (27_540, 1, 64),  # Llama 2 SFT: 64
    (52_002, 1, 128),  # Alpaca: 128
    (1_000_000, 1, 128), (1_000_000, 8, 128),
    (300, 16, 16),  # 8 sequences cannot feed 16 devices: one each
    (300, 3, 9),  # 8 rounded up to whole sequences on 3 devices
    (None, 1, 16),  # unknown data: the QLoRA recipe's 16
])
def test_effective_batch_rule(n, devices, expected):
    assert hyper.effective_batch(n, devices).value == expected


# --- held-out split: 10%, at most 1,000, none below 30 held out
@pytest.mark.parametrize("n,expected", [
    (290, 0.0),  # 29 would be held out: too few
    (300, 0.1), (3_000, 0.1), (10_000, 0.1),
    (20_000, 0.05), (1_000_000, 0.001),  # capped at 1,000
    (None, 0.05),
])
def test_eval_fraction_rule(n, expected):
    c = hyper.eval_fraction(n, None)
    assert c.value == pytest.approx(expected) and not c.user_set


def test_eval_fraction_set_in_the_spec_is_kept():
    c = hyper.eval_fraction(300, 0.0)
    assert c.value == 0.0 and c.user_set


def test_an_eval_file_replaces_the_split():
    c = hyper.eval_fraction(3_000, None, eval_path=True)
    assert c.value == 0.0 and "data.eval_path" in c.why


def test_steps_per_epoch_counts_only_training_examples():
    assert hyper.steps_per_epoch(300, 2, 4, 1, 0.1) == math.ceil(270 / 8)
    assert hyper.steps_per_epoch(300, 2, 4, 1, 0.0) == math.ceil(300 / 8)


# --- one recipe per method family, values together
def test_lora_family_follows_the_qlora_scripts():
    small, big = hp("qlora"), hp("qlora", params=70.6e9)
    assert (small["rank"].value, small["alpha"].value, small["learning_rate"].value, small["dropout"].value) == \
        (64, 16.0, 2e-4, 0.1)
    assert (big["rank"].value, big["alpha"].value, big["learning_rate"].value, big["dropout"].value) == \
        (64, 16.0, 1e-4, 0.05)
    assert small["learning_rate"].warning is None and big["learning_rate"].warning is None


def test_dora_family_follows_the_dora_authors():
    small, big = hp("dora", scarce=True), hp("qdora", params=70.6e9, scarce=True)
    # NVlabs/DoRA: r=32, alpha=64, 1e-4 (Llama-3-8B); LoRA there uses 3e-4: DoRA's rate is below LoRA's
    assert (small["rank"].value, small["alpha"].value, small["learning_rate"].value, small["dropout"].value) == \
        (32, 64.0, 1e-4, 0.05)
    assert big["learning_rate"].value == 5e-5
    assert hp("dora", scarce=False)["dropout"].value == 0.0


def test_a_rank_set_in_the_spec_keeps_the_recipes_ratio():
    h = hp("lora", method={"rank": 16})
    assert h["alpha"].value == 4.0 and h["learning_rate"].warning is None


def test_alpha_off_the_recipe_is_warned_with_the_factor():
    h = hp("lora", method={"rank": 16, "alpha": 32})  # alpha/r = 2 at 2e-4: 8x the recipe's 0.25 at 2e-4
    w = h["learning_rate"].warning
    assert "8×" in w and "2.5e-05" in w
    assert hp("lora", method={"rank": 16, "alpha": 32},
              training={"learning_rate": 2.5e-5})["learning_rate"].warning is None


def test_full_fine_tuning_rates():
    assert hp("full")["learning_rate"].value == 2e-5
    assert hp("full", params=70.6e9)["learning_rate"].value == 1e-5


def test_scheduler_rationale_names_the_trainer_default_correctly():
    why = hp("lora")["lr_scheduler"].why
    assert "default is linear" in why and "HF/torchtune recipe default" not in why


# --- attention from the architecture
def test_attention_follows_the_architecture():
    gemma2 = {"model_type": "gemma2", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000,
              "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    llama = {**gemma2, "model_type": "llama"}
    del llama["attn_logit_softcapping"], llama["final_logit_softcapping"]
    assert rules.default_attention(shape_from_config(gemma2))[0] == "eager"
    assert rules.default_attention(shape_from_config(llama))[0] == "sdpa"


def test_only_nvidia_devices_are_advised():
    assert rules.advisable("nvidia") and not rules.advisable("amd") and not rules.advisable(None)


# --- paging
CFG = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
       "num_key_value_heads": 8, "intermediate_size": 1024, "vocab_size": 1000, "max_position_embeddings": 2048}


def small_setup(optimizer="paged_adamw_32bit"):
    return Setup(shape_from_config(CFG), Geometry(1, 128, True), AdapterSettings(rank=8, alpha=2, dropout=0.0),
                 optimizer=optimizer)


def test_host_link_from_the_pcie_generation():
    assert host_link_gbps(find_device("L40S"))[0] == 32.0  # Gen4 x16, per direction
    assert host_link_gbps(find_device("H100-SXM"))[0] == 64.0  # Gen5
    assert host_link_gbps(find_device("T4"))[0] == 16.0  # Gen3


def test_paging_cost_by_hand():
    dev = find_device("L40S")
    est = estimate("full", small_setup())
    paged = est.evictable_bytes
    assert paged > 0
    usable = est.device_total_bytes - paged // 2  # half of the paged state does not fit
    cost = paging_cost(est, dev, usable)
    over = paged - paged // 2
    assert cost.bytes == over
    assert cost.seconds_per_step == pytest.approx((2 * over / 32e9, 2 * over / 16e9, 2 * over / 8e9))
    assert paging_cost(est, dev, est.device_total_bytes) is None  # everything resident: free


def test_nothing_is_evictable_on_the_cpu():
    est = estimate("full", small_setup())
    assert needed_bytes(est, cpu_device(2**34)) == est.device_total_bytes
    assert needed_bytes(est, find_device("L40S")) == est.device_total_bytes - est.evictable_bytes


# --- caveats
def test_bf16_rounding_share_by_hand():
    # half a bf16 ulp is 2^-9 of |w|: at lr 1e-5 every |w| > 0.00512 keeps its value; w ~ N(0, 0.02)
    w = caveats.bf16_rounding("full", "bf16", 1e-5, "bfloat16")
    assert "0.00512" in w and "80%" in w
    assert caveats.bf16_rounding("lora", "bf16", 1e-5, "bfloat16") is None
    assert caveats.bf16_rounding("full", "fp32", 1e-5, "float32") is None


def test_moe_caveat_counts_the_experts_left_in_16_bit():
    from peftplan.planner.catalog import find_model
    from peftplan.planner.memory import MemoryEstimate
    from peftplan.planner.terms import Term

    shape = shape_from_config(find_model("mistralai/Mixtral-8x7B-v0.1").config)
    s = Setup(shape, Geometry(1, 1024, True), AdapterSettings(rank=8, alpha=2, dropout=0.0))
    experts = 32 * 8 * 3 * 4096 * 14336  # layers × experts × (gate, up, down) × h × i
    dense = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)  # q, o, k, v

    def four_bit(p_q):  # a 4-bit estimate that quantized p_q weights
        return MemoryEstimate("qlora", 0, "loss", (Term("weights", "4-bit", p_q // 2, "P_q / 2", {"P_q": p_q}),))

    lora = MemoryEstimate("lora", 0, "loss", (Term("weights", "16-bit", 2 * shape.parameters, "P × 2", {}),))
    experts_16bit = four_bit(dense)  # transformers 5 before the runtime quantized fused experts
    assert caveats.unquantized_expert_params(shape, experts_16bit) == experts
    text = " ".join(caveats.moe("mixtral", shape, s, {"qlora": experts_16bit, "lora": lora}))
    assert f"{experts / 1e9:.1f}B expert weights in 16-bit" in text
    experts_4bit = four_bit(dense + experts)  # once they are quantized, the caveat goes by itself
    assert caveats.unquantized_expert_params(shape, experts_4bit) == 0
    assert "in 16-bit" not in " ".join(caveats.moe("mixtral", shape, s, {"qlora": experts_4bit, "lora": lora}))
    assert "adapters skip the experts" in text  # all-linear does not target fused 3D parameters
    dense_shape = shape_from_config(CFG)
    assert caveats.moe("llama", dense_shape, small_setup(), {"qlora": estimate("qlora", small_setup())}) == []


# --- the breakdown bar
def test_bar_is_drawn_to_the_device_and_marks_overflow():
    device = 80 * 2**30
    half = breakdown_bar({"weights": 40 * 2**30}, device, width=20).plain
    assert half == GLYPHS["weights"] * 10 + "·" * 10
    over = breakdown_bar({"weights": 60 * 2**30, "activations": 28 * 2**30}, device, width=20).plain
    assert len(over) == 20 and over.endswith("»") and "·" not in over


def test_each_component_has_its_own_glyph():
    assert len({GLYPHS[c] for c in COMPONENTS}) == len(COMPONENTS)
    assert "·" not in GLYPHS.values() and "»" not in GLYPHS.values()


def test_margin_takes_a_roomier_geometry_by_how_tight_the_fastest_is():
    from types import SimpleNamespace as C

    from peftplan.planner.rules import with_margin

    usable = 1000
    roomy_115 = C(needed_bytes=900, seconds=115)  # 90% full, 1.15x the time
    roomy_130 = C(needed_bytes=800, seconds=130)
    # 94% full: not tight, kept
    fast = C(needed_bytes=940, seconds=100)
    assert with_margin(fast, [fast, roomy_115], usable) == (fast, None)
    # 97% full: a roomier one only within 1.10x; 1.15x is too slow
    fast = C(needed_bytes=970, seconds=100)
    assert with_margin(fast, [fast, roomy_115], usable)[0] is fast
    # 100% full: no room for any estimate error; 1.15x is taken, 1.30x is not
    fast = C(needed_bytes=1000, seconds=100)
    pick, why = with_margin(fast, [fast, roomy_115, roomy_130], usable)
    assert pick is roomy_115 and "100%" in why and "1.15x" in why
    assert with_margin(fast, [fast, roomy_130], usable)[0] is fast
    # ... and with nothing under 95% within 1.25x, one that keeps some room (96.5%) beats one that keeps none
    some_room = C(needed_bytes=965, seconds=116)
    assert with_margin(fast, [fast, some_room, roomy_130], usable)[0] is some_room
    # at 97% full (not at the edge) that candidate is not taken: it is neither under 95% nor within 1.10x
    fast = C(needed_bytes=970, seconds=100)
    assert with_margin(fast, [fast, some_room], usable)[0] is fast
