"""From the spec to the objects the runtime trains with: `peftplan generate` writes plan.toml (planner only), then
the runtime's own builders read it — load_config, build_trainer (MethodSetup, load_model, TrainingArguments),
Trainer.create_optimizer, runtime.optim.build_optimizer, runtime.model.quantization_config — and the values they
hold are compared with numbers written here from the planner's rules (planner/hyper.py: the QLoRA scripts for
LoRA, the DoRA authors' runs for DoRA; the batch rule; 32-bit AdamW when memory allows), not with each other's
memory estimate.

A tiny Llama (hidden 64, 2 layers, runtime.testing) and 96 chat records, on the CPU: float32, no bf16.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra")
pytest.importorskip("peft", reason="needs the [train] extra")

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("plan2rt")
    build_tiny_model(root / "model", family="llama")
    write_dataset(root / "data.jsonl", "chat", 96)
    return root


def generate(root: Path, name: str, method: str, training: str, model: str = "") -> Path:
    """`peftplan generate` on a spec that leaves every hyperparameter to the planner."""
    from peftplan.cli import main

    spec = root / f"{name}.toml"
    spec.write_text(f'[model]\nname = "model"\n{model}\n[data]\npath = "data.jsonl"\nseq_len = 64\npacking = false\n'
                    f'[hardware]\ngpu = "cpu"\nmemory_gib = 8\n[method]\nname = "{method}"\n[training]\n{training}\n')
    out = root / name
    assert main(["generate", str(spec), "-o", str(out)]) == 0
    return out / "plan.toml"


def build(plan: Path):
    from peftplan.runtime.config import load_config
    from peftplan.runtime.train import build_trainer

    config = load_config(plan)
    trainer, _, _, _ = build_trainer(config, None, None)
    return config, trainer


@pytest.fixture(scope="module")
def lora(workspace):
    # micro-batch 4 set; everything else the planner's. 96 examples (read from the data): effective batch 8 (the
    # smallest, 96 / 8 = 12 steps per epoch < 400), 5 epochs (< 1,000 examples), none held out (10% = 10 < 30).
    return build(generate(workspace, "lora", "lora", "micro_batch_size = 4"))


@pytest.fixture(scope="module")
def qdora(workspace):
    return build(generate(workspace, "qdora", "qdora",
                          'micro_batch_size = 2\ngradient_checkpointing = true\noptimizer = "adamw_8bit"'))


def test_plan_toml_holds_the_planners_choices(workspace, lora):
    config, _ = lora
    with config.path.open("rb") as fh:
        plan = tomllib.load(fh)
    # QLoRA scripts: r 64, α 16, dropout 0.1 below 30B, lr 2e-4; cosine; warmup 3%
    assert {k: plan["method"][k] for k in ("name", "rank", "alpha", "dropout", "target_modules")} == \
        {"name": "lora", "rank": 64, "alpha": 16.0, "dropout": 0.1, "target_modules": "all-linear"}
    t = plan["training"]
    assert (t["micro_batch_size"], t["gradient_accumulation_steps"]) == (4, 2)  # 8 / 4 on one device
    assert (t["learning_rate"], t["lr_scheduler"], t["warmup_ratio"], t["epochs"], t["max_steps"]) == \
        (2e-4, "cosine", 0.03, 5.0, -1)
    # 8 GiB holds a 64-wide model many times over: no recomputation, exact 32-bit AdamW, float32 on the CPU,
    # and the chunked loss unless the spec asks for transformers' own
    assert (t["gradient_checkpointing"], t["optimizer"], t["precision"], t["loss"]) == \
        (False, "adamw_torch", "fp32", "chunked")
    assert plan["data"]["eval_fraction"] == 0.0


def test_lora_config_from_the_plan(lora):
    _, trainer = lora
    model = trainer.model
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (64, 16.0, 0.1, False)
    # all-linear: every decoder linear of both layers, not the output head (peft lists the expanded module paths)
    assert sorted(t.rsplit(".", 1)[-1] for t in cfg.target_modules) == sorted(2 * list(LINEARS))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == LINEARS
    some = next(m for m in model.modules() if hasattr(m, "lora_A"))
    assert some.scaling["default"] == 16.0 / 64  # peft scales B·A by α / r
    assert some.lora_dropout["default"].p == 0.1
    assert not model.get_base_model().is_gradient_checkpointing
    from peftplan.runtime.loss import causal_lm

    assert causal_lm(model)._peftplan_loss[1].enabled  # plan.toml's loss = "chunked" installed


def test_training_arguments_from_the_plan(lora):
    _, trainer = lora
    a = trainer.args
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps) == (4, 2)
    assert (a.learning_rate, a.lr_scheduler_type, a.num_train_epochs, a.max_steps) == (2e-4, "cosine", 5.0, -1)
    assert a.warmup_steps == 0.03  # a float below 1: the Trainer reads it as a ratio of the total steps
    assert a.get_warmup_steps(100) == 3  # ceil(3% of 100)
    assert (a.bf16, a.fp16, a.seed, a.optim) == (False, False, 42, "adamw_torch_fused")


def test_optimizer_from_the_plan(lora):
    from peftplan.runtime.optim import build_optimizer

    _, trainer = lora
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.AdamW
    for group in opt.param_groups:  # the Trainer's defaults, which the QLoRA scripts also used (no weight decay)
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-4, (0.9, 0.999), 1e-8, 0.0)
        assert group["fused"]
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    # r = 64 on 2 layers: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64 → Σ(in+out) = 1,024
    assert trainable == 2 * 64 * 1_024
    own = build_optimizer("adamw_torch", trainer.model.parameters(), lr=2e-4)
    assert type(own) is type(opt) and own.param_groups[0]["fused"]


def test_qdora_from_the_plan(qdora):
    import bitsandbytes as bnb

    config, trainer = qdora
    model = trainer.model
    cfg = model.peft_config["default"]
    # the DoRA authors: r 32, α 64 = 2r; 96 examples are scarce (< 5,000): their dropout 0.05 is kept
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (32, 64.0, 0.05, True)
    assert sorted(t.rsplit(".", 1)[-1] for t in cfg.target_modules) == sorted(2 * list(LINEARS))
    q = model.get_base_model().config.quantization_config
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.float32  # precision fp32 on the CPU
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four) == 2 * 7  # every decoder linear, not the head
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in four)
    assert model.get_base_model().is_gradient_checkpointing  # set in the spec
    a = trainer.args
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.learning_rate) == (2, 4, 1e-4)
    assert a.optim == "adamw_bnb_8bit"
    # the Trainer builds bitsandbytes' AdamW with optim_bits = 8; runtime.optim builds AdamW8bit: the same
    # two-state blockwise 8-bit Adam, not paged (8-bit AdamW from bitsandbytes, Dettmers et al. 2022)
    from bitsandbytes.optim.optimizer import Optimizer2State

    from peftplan.runtime.optim import build_optimizer

    for opt in (trainer.create_optimizer(), build_optimizer("adamw_8bit", model.parameters(), lr=1e-4)):
        assert isinstance(opt, Optimizer2State)
        assert (opt.optimizer_name, opt.args.optim_bits, opt.is_paged) == ("adam", 8, False)
        for group in opt.param_groups:
            assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 0.0)


def test_4bit_compute_dtype_follows_the_plans_precision(workspace):
    # model.dtype = "bfloat16" on the CPU: plan.toml's precision is bf16, and the runtime's quantization config
    # computes in bfloat16 (no model is loaded here)
    from peftplan.runtime.config import load_config
    from peftplan.runtime.model import MethodSetup, quantization_config

    config = load_config(generate(workspace, "qlora-bf16", "qlora", "micro_batch_size = 2",
                                  model='dtype = "bfloat16"'))
    assert config.training["precision"] == "bf16" and config.dtype == "bfloat16"
    q = quantization_config(MethodSetup(method=config.method["name"], dtype=config.dtype))
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == \
        ("nf4", True, torch.bfloat16)
    assert quantization_config(MethodSetup(method="lora", dtype=config.dtype)) is None  # 16-bit base
