"""Every hyperparameter and choice `peftplan plan --json` prints, pinned to a number written here by hand.

Each expectation comes from the rule's own source (the recipe or paper planner/hyper.py and planner/rules.py
cite, restated in the comment) or from arithmetic in the comment; nothing is read back from the function under
test. The plans go through the public entry points only: `plan_spec` and the JSON `plan --json` prints
(`plan_json`), and `estimate_spec` for the estimate at one fixed geometry. Time, steps, tokens and cost across
devices are in test_decisions_run.py.
"""

from __future__ import annotations

import json

import pytest

from peftplan.planner.choose import NothingFits, plan_spec
from peftplan.planner.plan_report import plan_json
from peftplan.planner.report import estimate_spec
from peftplan.schemas import spec_from_dict

GIB = 2**30
# A device that holds any of these models in any method: the recipe's choices do not depend on fitting here.
BIG = {"gpu": "test-gpu", "memory_gib": 4096, "tflops": 500.0, "price_per_hour": 1.0}
H100 = {"gpu": "H100-SXM"}
A100 = {"gpu": "A100-80GB"}

_plans: dict[str, tuple] = {}


def spec(model: str, hardware: dict, data: dict, **tables):
    return spec_from_dict({"model": {"name": model}, "hardware": hardware, "data": data, **tables})


def plan(model: str, hardware: dict, data: dict, **tables) -> dict:
    """The JSON `peftplan plan --json` prints for this spec (cached: several tests read one plan)."""
    key = json.dumps([model, hardware, data, tables], sort_keys=True)
    if key not in _plans:
        _plans[key] = plan_json(plan_spec(spec(model, hardware, data, **tables)))
    return _plans[key]


def chosen(model: str, hardware: dict, data: dict, **tables) -> dict:
    return plan(model, hardware, data, **tables)["chosen"]


# --- the adapter recipes, per method and model size -------------------------------------------------------------------
# LoRA / QLoRA: the QLoRA paper's Guanaco scripts (artidoro/qlora scripts/finetune_guanaco_{7b,13b,33b,65b}.sh):
# lora_r 64, lora_alpha 16, every linear layer; learning rate 2e-4 and lora_dropout 0.1 for 7B/13B, 1e-4 and 0.05 for
# 33B/65B; warmup_ratio 0.03. The huggyllama checkpoints are the very models those scripts trained.
@pytest.mark.parametrize("model,method,lr,dropout", [
    ("huggyllama/llama-7b", "lora", 2e-4, 0.1),     # 6.7B
    ("huggyllama/llama-13b", "qlora", 2e-4, 0.1),   # 13.0B
    ("huggyllama/llama-30b", "qlora", 1e-4, 0.05),  # 32.5B: the scripts' "33B"
    ("huggyllama/llama-65b", "lora", 1e-4, 0.05),   # 65.3B
])
def test_lora_family_follows_the_qlora_scripts(model, method, lr, dropout):
    out = plan(model, BIG, {"num_examples": 20_000, "seq_len": 512}, method={"name": method})
    c = out["chosen"]
    h = c["hyperparameters"]
    assert c["method"] == method
    assert (h["rank"], h["alpha"], h["dropout"], h["learning_rate"]) == (64, 16.0, dropout, lr)
    assert h["target_modules"] == "all-linear"
    assert (h["lr_scheduler"], h["warmup_ratio"]) == ("cosine", 0.03)  # cosine: Llama 2 SFT; 3%: the QLoRA scripts
    assert out["methods"][method]["geometry"]["dropout"] == dropout  # the geometry the plan estimated and timed


# DoRA / QDoRA: the DoRA authors' commonsense runs (NVlabs/DoRA commonsense_reasoning/llama3_8B_DoRA.sh): r 32,
# alpha 64 (= 2r), learning rate 1e-4, lora_dropout 0.05. Above 30B there is no published DoRA run: the rate is
# halved to 5e-5 as the QLoRA scripts halve theirs. With plentiful data (≥ 5,000 examples) the dropout is 0: the
# regularizer matters less than its cost (peft's DoRA runs the base matmul again on the dropped input).
@pytest.mark.parametrize("model,method,n,lr,dropout", [
    ("huggyllama/llama-7b", "dora", 2_000, 1e-4, 0.05),
    ("huggyllama/llama-7b", "dora", 20_000, 1e-4, 0.0),
    ("huggyllama/llama-65b", "qdora", 20_000, 5e-5, 0.0),
])
def test_dora_family_follows_the_dora_authors(model, method, n, lr, dropout):
    c = chosen(model, BIG, {"num_examples": n, "seq_len": 512}, method={"name": method})
    h = c["hyperparameters"]
    assert c["method"] == method
    assert (h["rank"], h["alpha"], h["dropout"], h["learning_rate"]) == (32, 64.0, dropout, lr)
    assert h["target_modules"] == "all-linear"


# Full fine-tuning: 2e-5 (Llama 2 SFT §3.1.1, Alpaca, torchtune 8B_full) below 30B; 1e-5 from 30B (LIMA's 65B).
@pytest.mark.parametrize("model,lr", [("huggyllama/llama-7b", 2e-5), ("huggyllama/llama-65b", 1e-5)])
def test_full_fine_tuning_rates(model, lr):
    c = chosen(model, BIG, {"num_examples": 20_000, "seq_len": 512}, method={"name": "full"})
    h = c["hyperparameters"]
    assert c["method"] == "full" and h["learning_rate"] == lr
    assert "rank" not in h and "alpha" not in h and "dropout" not in h
    assert (h["lr_scheduler"], h["warmup_ratio"]) == ("cosine", 0.03)


def test_a_rank_set_in_the_spec_keeps_the_recipes_alpha_over_r():
    data = {"num_examples": 20_000, "seq_len": 512}
    lora = chosen("meta-llama/Llama-3.2-1B", H100, data, method={"name": "lora", "rank": 16})["hyperparameters"]
    assert (lora["rank"], lora["alpha"]) == (16, 4.0)  # α/r = 16/64 = 0.25 → α = 0.25 × 16
    dora = chosen("meta-llama/Llama-3.2-1B", H100, data, method={"name": "dora", "rank": 8})["hyperparameters"]
    assert (dora["rank"], dora["alpha"]) == (8, 16.0)  # α/r = 64/32 = 2 → α = 2 × 8
    # an α the user set is kept; α/r = 32/16 = 2 at 2e-4 is 8× the recipe's step (0.25 at 2e-4): said, with the
    # rate that keeps the recipe's step, 2e-4 × 0.25 / 2 = 2.5e-5
    out = plan("meta-llama/Llama-3.2-1B", H100, data, method={"name": "lora", "rank": 16, "alpha": 32})
    assert out["chosen"]["hyperparameters"]["alpha"] == 32.0
    assert any("8×" in w and "2.5e-05" in w for w in out["warnings"]), out["warnings"]


# --- data-sized choices -----------------------------------------------------------------------------------------------
# Epochs: 5 below 1,000 examples, 3 below 10,000, 2 below 100,000, 1 from there (LIMA 15 on 1k, QLoRA ~3 on 9.8k,
# Alpaca 3 on 52k, Llama 2 SFT 2 on 27.5k); 3 when the data size is unknown.
@pytest.mark.parametrize("n,epochs", [(999, 5.0), (1_000, 3.0), (9_999, 3.0), (10_000, 2.0), (99_999, 2.0),
                                      (100_000, 1.0), (None, 3.0)])
def test_epochs_by_data_size(n, epochs):
    data = {"seq_len": 512, **({"num_examples": n} if n else {})}
    assert chosen("meta-llama/Llama-3.2-1B", H100, data)["hyperparameters"]["epochs"] == epochs


# Effective batch: the largest power of two from 8 to 128 that still gives ≥ 400 optimizer steps per epoch
# (QLoRA 16 at 9,846 examples, Llama 2 SFT 64 at 27,540, Alpaca 128 at 52,002); 16 (the QLoRA scripts') when the
# data size is unknown. 12,800 / 32 = 400 exactly (32); 12,799 / 32 = 399.97 (16).
@pytest.mark.parametrize("n,batch", [(3_000, 8), (9_846, 16), (12_799, 16), (12_800, 32), (27_540, 64),
                                     (52_002, 128), (1_000_000, 128), (None, 16)])
def test_effective_batch_by_data_size(n, batch):
    data = {"seq_len": 512, **({"num_examples": n} if n else {})}
    c = chosen("meta-llama/Llama-3.2-1B", H100, data)
    g = c["geometry"]
    assert c["hyperparameters"]["effective_batch_size"] == batch
    assert g["effective_batch_size"] == batch
    assert g["micro_batch_size"] * g["gradient_accumulation_steps"] * c["devices"] == batch


# Held out: 10% (LLaMA-Factory's val_size 0.1), at most 1,000 (the QLoRA scripts hold out 1,024), none when that
# is under 30 examples; 5% when the data size is unknown (axolotl's val_set_size 0.05).
@pytest.mark.parametrize("n,fraction", [
    (290, 0.0),           # 29 held out would be too few
    (300, 0.1),           # 30
    (2_000, 0.1),         # 200
    (20_000, 0.05),       # 1,000 (capped) / 20,000
    (27_540, 0.036311),   # 1,000 / 27,540 = 0.0363108…, rounded to 6 places
    (1_000_000, 0.001),   # 1,000 / 1,000,000
    (None, 0.05),
])
def test_held_out_split_by_data_size(n, fraction):
    data = {"seq_len": 512, **({"num_examples": n} if n else {})}
    assert chosen("meta-llama/Llama-3.2-1B", H100, data)["hyperparameters"]["eval_fraction"] == fraction


# --- the method, from the data and the memory (planner/rules.py) -----------------------------------------------------
@pytest.mark.parametrize("model,gpu,seq,n,method", [
    ("meta-llama/Llama-3.1-8B", A100, 1024, 4_999, "dora"),   # scarce: fewer than 5,000 examples
    ("meta-llama/Llama-3.1-8B", A100, 1024, 5_000, "lora"),   # 5,000 is not scarce: LoRA, the default
    ("meta-llama/Llama-3.2-1B", H100, 512, 99_999, "lora"),   # full fine-tuning wants ≥ 100,000 examples…
    ("meta-llama/Llama-3.2-1B", H100, 512, 100_000, "full"),  # …and plentiful memory: 1.2B × 16 bytes ≈ 20 GB of 80
    ("meta-llama/Llama-3.1-8B", {"gpu": "T4"}, 1024, 20_000, "qlora"),  # 8B × 2 bytes = 15 GiB > 14.25 usable
])
def test_method_by_data_and_memory(model, gpu, seq, n, method):
    assert chosen(model, gpu, {"num_examples": n, "seq_len": seq})["method"] == method


def test_dora_dropout_is_weighed_against_its_time():
    # 8B, 2,000 examples: DoRA is preferred. With its authors' dropout 0.05, peft runs every adapted module's base
    # matmul a second time on the dropped input: 4·N_layers more FLOPs per token on top of ~4·N (frozen base,
    # forward + input gradients), nearly 2× LoRA's step, over the 1.6× limit. The plan keeps DoRA without the dropout;
    # under priority = "quality" the limit is 3× and the dropout stays.
    data = {"num_examples": 2_000, "seq_len": 1024}
    balanced = chosen("meta-llama/Llama-3.1-8B", A100, data)
    assert balanced["method"] == "dora" and balanced["hyperparameters"]["dropout"] == 0.0
    assert any("limit 1.6x" in r for r in balanced["reasons"]), balanced["reasons"]
    quality = chosen("meta-llama/Llama-3.1-8B", A100, data, objective={"priority": "quality"})
    assert quality["method"] == "dora" and quality["hyperparameters"]["dropout"] == 0.05


# --- the fit: 5% of the device stays free -----------------------------------------------------------------------------
def test_the_t4_example_keeps_5_percent_free():
    # T4: 15,360 MiB (gpus.toml memory_total_mib) = 16,106,127,360 bytes; 95% of it = 15,300,820,992 usable
    out = plan("meta-llama/Llama-3.1-8B", {"gpu": "T4"}, {"num_examples": 20_000, "seq_len": 1024, "avg_tokens": 400},
               training={"gradient_checkpointing": True})
    assert out["hardware"]["memory_bytes"] == 15_360 * 2**20
    assert out["hardware"]["usable_bytes"] == 15_300_820_992
    assert out["hardware"]["headroom_fraction"] == 0.05
    assert out["chosen"]["precision"] == "fp16"  # Turing has no bf16
    for m, x in out["methods"].items():  # each method's verdict against the 95%, not the whole device
        needed = x["device_total_bytes"] - x["evictable_bytes"]
        assert x["headroom_bytes"] == 15_300_820_992 - needed, m
        assert x["fits"] == (needed <= 15_300_820_992), m
    chosen = out["methods"][out["chosen"]["method"]]  # the chosen candidate itself
    assert chosen["device_total_bytes"] == out["chosen"]["estimate"]["device_total_bytes"]
    assert chosen["fits"] and chosen["device_total_bytes"] - chosen["evictable_bytes"] <= 15_300_820_992


FIXED = {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
         "optimizer": "adamw_torch", "activation_offloading": False}


def _device_total(which: str, **tables) -> int:
    """device_total_bytes of method `which` at the fixed geometry above (estimate_spec: the memory formulas are pinned
    in test_memory.py; here only the fit decision made from them)."""
    s = spec("meta-llama/Llama-3.2-1B", H100, {"num_examples": 20_000, "seq_len": 512, "packing": False},
             training=FIXED, **tables)
    return estimate_spec(s).to_json()["methods"][which]["device_total_bytes"]


def test_a_plan_between_95_and_100_percent_of_the_device_does_not_fit():
    method = {"name": "lora", "rank": 64, "alpha": 16, "dropout": 0.1}
    need = _device_total("lora", method=method)
    data = {"num_examples": 20_000, "seq_len": 512, "packing": False}
    # memory such that the plan needs 97.5% of the device: over the 95% usable, so it must not fit
    tight = {"gpu": "H100-SXM", "memory_gib": need / 0.975 / GIB}
    with pytest.raises(NothingFits):
        plan_spec(spec("meta-llama/Llama-3.2-1B", tight, data, method=method, training=FIXED))
    # at 94% of the device it fits, with 95% of the device minus the need as headroom
    roomy = {"gpu": "H100-SXM", "memory_gib": need / 0.94 / GIB}
    out = plan("meta-llama/Llama-3.2-1B", roomy, data, method=method, training=FIXED)
    memory = int(need / 0.94 / GIB * GIB)
    assert out["chosen"]["method"] == "lora"
    assert out["methods"]["lora"]["headroom_bytes"] == int(memory * 0.95) - need


def test_full_fine_tuning_wants_20_percent_of_the_usable_memory_free():
    # 100,000 examples: full fine-tuning is preferred if it fits with ≥ 20% of the usable memory to spare
    # (rules.FULL_FT_MIN_HEADROOM). At the fixed geometry it needs `need`; usable = 95% of the device.
    need = _device_total("full")
    data = {"num_examples": 100_000, "seq_len": 512, "packing": False}

    def method_on(fill: float) -> dict:  # a device on which full fine-tuning fills `fill` of the usable memory
        return chosen("meta-llama/Llama-3.2-1B", {"gpu": "H100-SXM", "memory_gib": need / fill / 0.95 / GIB}, data,
                      training=FIXED)

    tight = method_on(0.85)  # fits, 15% free: not plentiful
    assert tight["method"] == "lora"
    assert any("not plentiful" in r for r in tight["reasons"]), tight["reasons"]
    assert method_on(0.70)["method"] == "full"  # 30% free


# --- geometry: what memory does not force stays off ------------------------------------------------------------------
def test_checkpointing_and_8bit_state_only_when_memory_needs_them():
    # 1B on an 80 GB H100: everything fits, so the plan takes the fastest: no recomputation (checkpointing off)
    # and exact 32-bit AdamW state
    roomy = chosen("meta-llama/Llama-3.2-1B", H100, {"num_examples": 20_000, "seq_len": 512})
    assert roomy["geometry"]["gradient_checkpointing"] is False
    assert roomy["geometry"]["optimizer"] == "adamw_torch"
    # 8B QLoRA on a T4 at 2,048 tokens: without checkpointing even one row does not fit (the estimate at that
    # geometry says so below), so the plan turns it on
    data = {"num_examples": 20_000, "seq_len": 2048}
    bare = estimate_spec(spec("meta-llama/Llama-3.1-8B", {"gpu": "T4"}, data, method={"name": "qlora"},
                              training={"micro_batch_size": 1, "gradient_checkpointing": False,
                                        "optimizer": "paged_adamw_8bit"})).to_json()
    assert not bare["methods"]["qlora"]["fits"]
    tight = chosen("meta-llama/Llama-3.1-8B", {"gpu": "T4"}, data, method={"name": "qlora"})
    assert tight["geometry"]["gradient_checkpointing"] is True


def test_attention_follows_the_architecture():
    # transformers refuses sdpa for Gemma 2 ("sdpa does not support softcapping"): eager; Llama: PyTorch's sdpa
    data = {"num_examples": 20_000, "seq_len": 512}
    assert chosen("google/gemma-2-2b", H100, data)["geometry"]["attention"] == "eager"
    assert chosen("meta-llama/Llama-3.2-1B", H100, data)["geometry"]["attention"] == "sdpa"


def test_the_loss_is_chunked_unless_the_spec_asks_for_the_full_one():
    # 1B, micro-batch 8 × 512 = T = 4,096 tokens, vocabulary V = 128,256. transformers' own loss holds fp32
    # log-softmax and two fp32 gradients: 12·T·V = 12 × 4,096 × 128,256 = 6,304,038,912 bytes. The chunked loss (the
    # default) never holds T × V logits.
    training = {**FIXED, "micro_batch_size": 8}
    data = {"num_examples": 20_000, "seq_len": 512, "packing": False}
    full = estimate_spec(spec("meta-llama/Llama-3.2-1B", H100, data, training={**training, "loss": "full"})).to_json()
    assert full["methods"]["lora"]["components"]["logits"] == 6_304_038_912
    default = estimate_spec(spec("meta-llama/Llama-3.2-1B", H100, data, training=training)).to_json()
    assert any(n.startswith("training.loss not set: 'chunked'") for n in default["notes"])
    assert default["methods"]["lora"]["components"]["logits"] < 6_304_038_912 / 4
