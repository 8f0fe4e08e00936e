"""Hyperparameters from model size, data size, devices and method: each with a value, a reason and a source.

Each method family follows ONE published recipe, its values taken together — never the learning rate of
one recipe with the α of another. peft scales the adapter's product B·A by α/r (Hu et al. 2021, eq. 4);
with Adam the step on each adapter weight is about the learning rate whatever the gradient's scale, so
the step on the adapted weight grows with (α/r) × learning rate. Pairing a rate with another recipe's
α/r changes the step by their ratio (α=2r with the QLoRA rates: 8×).

- LoRA / QLoRA: the QLoRA paper's Guanaco scripts (Dettmers et al. 2023; artidoro/qlora
  scripts/finetune_guanaco_7b.sh and finetune_guanaco_65b.sh): every linear layer, r=64, α=16
  (α/r = 0.25), learning rate 2e-4 for 7B/13B and 1e-4 for 33B/65B, dropout 0.1 (7B/13B) and
  0.05 (33B/65B), warmup ratio 0.03, 16 sequences per step on OASST1 (9,846 examples), 1,024
  examples held out for evaluation.
- DoRA / QDoRA: the DoRA authors' commonsense-reasoning runs (Liu et al. 2024; NVlabs/DoRA
  commonsense_reasoning/README.md, llama3_8B_DoRA.sh, finetune.py): α = 2r; r=32 ("start with half of
  the rank of the LoRA configuration", NVlabs/DoRA README); learning rate 1e-4 at r=32 for LLaMA-7B and
  Llama-3-8B where their LoRA baselines use 3e-4 ("a slightly lower learning rate than that of LoRA",
  README; 2e-4 at r=16 for LLaMA-7B and Llama-2-7B); lora_dropout 0.05 (finetune.py's default, used by
  every run). Judgement: there are no published DoRA runs above 13B; above 30B the rate is halved to
  5e-5, as the QLoRA recipe halves its own between 13B and 33B.
- Full fine-tuning: 2e-5 (Llama 2 SFT, Touvron et al. 2023 §3.1.1; Stanford Alpaca's README; torchtune
  recipes/configs/llama3_1/8B_full.yaml), 1e-5 at 30B and above (LIMA's 65B, Zhou et al. 2023).

Data-sized choices (effective batch, epochs, held-out split) are rules with their sources below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil

from .methods import METHODS


@dataclass(frozen=True)
class Choice:
    value: object
    why: str
    user_set: bool = False
    warning: str | None = None  # something the user should know about this value (printed with the plan)


@dataclass(frozen=True)
class Recipe:
    """One published recipe's values, taken together."""

    source: str
    rank: int
    alpha: float
    learning_rate: tuple[float, float]  # (below LARGE_MODEL_B, from LARGE_MODEL_B up)
    dropout: tuple[float, float]

    @property
    def ratio(self) -> float:
        return self.alpha / self.rank


LARGE_MODEL_B = 30  # the QLoRA recipe's split: 7B/13B versus 33B/65B
QLORA = Recipe("QLoRA recipe (Dettmers et al. 2023, artidoro/qlora Guanaco scripts)", 64, 16.0, (2e-4, 1e-4),
               (0.1, 0.05))
DORA = Recipe("DoRA authors' recipe (Liu et al. 2024, NVlabs/DoRA commonsense_reasoning)", 32, 64.0, (1e-4, 5e-5),
              (0.05, 0.05))
FULL_LR = (2e-5, 1e-5)

# Effective batch (sequences per optimizer step): the largest power of two from MIN to MAX that still
# gives STEPS optimizer steps per epoch. Published recipes across data sizes: 16 at 9,846 examples
# (QLoRA, OASST1: 615 steps/epoch), 64 at 27,540 (Llama 2 SFT: 430), 128 at 52,002 (Alpaca: 406), 128 at
# 125k-326k (Vicuna, Tulu 2); 8 at 1,000-2,000 (LLaMA-Factory examples/train_lora/llama3_lora_sft.yaml: 1 × 8
# accumulation, max_samples 1000; axolotl examples/llama-3/lora-8b.yml: 2 × 4 on alpaca_2k_test). 400 steps per
# epoch reproduces the first three exactly.
BATCH_MIN, BATCH_MAX, BATCH_STEPS_PER_EPOCH = 8, 128, 400
BATCH_UNKNOWN_DATA = 16  # the QLoRA recipe's batch, when data.num_examples is not given

# Held-out split: 10% of the examples (LLaMA-Factory examples/train_lora/llama3_lora_sft.yaml, its eval block:
# val_size 0.1; axolotl's examples/llama-3/lora-8b.yml holds out 5% of 2,000), at most 1,000
# (the QLoRA scripts hold out 1,024 and evaluate at most 1,000: a mean loss over 1,000 examples of
# hundreds of tokens each is already stable to a few parts in a thousand), none when that would be fewer
# than 30 examples (judgement: below 300 examples every one is needed for training, and a loss over a
# handful of examples is too noisy to compare checkpoints by; set data.eval_fraction to hold out anyway).
EVAL_SHARE, EVAL_MAX, EVAL_MIN = 0.10, 1000, 30
# when data.num_examples is not given (axolotl examples/llama-3/lora-8b.yml: val_set_size 0.05)
EVAL_UNKNOWN_DATA = 0.05


def billions(parameters: int) -> float:
    return parameters / 1e9


def recipe_for(method: str) -> Recipe | None:
    m = METHODS[method]
    if not m.adapter:
        return None
    return DORA if m.dora else QLORA


def effective_batch(num_examples: int | None, devices: int) -> Choice:
    """Sequences per optimizer step, from the data size and the number of devices."""
    if not num_examples:
        b, why = BATCH_UNKNOWN_DATA, (f"data.num_examples not set: {BATCH_UNKNOWN_DATA}, the QLoRA recipe's batch; "
                                      "set num_examples to size it to the data")
    else:
        b = BATCH_MIN
        while b * 2 <= BATCH_MAX and num_examples / (b * 2) >= BATCH_STEPS_PER_EPOCH:
            b *= 2
        why = (f"{b}: the largest power of two from {BATCH_MIN} to {BATCH_MAX} giving ≥ {BATCH_STEPS_PER_EPOCH} "
               f"optimizer steps per epoch ({num_examples:,} / {b} = {ceil(num_examples / b):,}); recipes: 16 at 9.8k "
               "examples (QLoRA), 64 at 27.5k (Llama 2 SFT), 128 at 52k (Alpaca)")
    if devices > 1:
        per = per_device_share(b, devices)
        if per * devices != b:
            why += (f"; raised to {per * devices} so that each of the {devices} devices gets {per} whole sequences, "
                    "a number micro-batches divide")
            b = per * devices
    return Choice(b, why)


def per_device_share(batch: int, devices: int) -> int:
    """Sequences per device per optimizer step for an effective batch of `batch` over `devices`: whole sequences,
    rounded up to a multiple of the largest power of two (at most 8) not above a quarter of the share, so that
    micro-batches of 2, 4 or 8 divide it (micro-batch × accumulation is then exactly the share) for at most 25% more
    than the rule's batch: 128 over 3 devices is 48 each (not 43, which only micro-batch 1 divides)."""
    per = ceil(max(batch, devices) / devices)
    quantum = 1
    while quantum * 2 <= min(8, per / 4):
        quantum *= 2
    return ceil(per / quantum) * quantum


def eval_fraction(num_examples: int | None, user_value: float | None, eval_path: bool = False) -> Choice:
    """Fraction of the examples held out for evaluation (data.eval_fraction)."""
    if user_value is not None:
        return Choice(float(user_value), "set in the spec", True)
    if eval_path:
        return Choice(0.0, "none held out of the training data: data.eval_path is the held-out split")
    if not num_examples:
        return Choice(EVAL_UNKNOWN_DATA, f"data.num_examples not set: {EVAL_UNKNOWN_DATA:.0%} held out; set "
                                         "num_examples to size the split")
    held = min(round(EVAL_SHARE * num_examples), EVAL_MAX)
    if held < EVAL_MIN:
        return Choice(0.0, f"none: {num_examples:,} examples would leave only {held} held out (< {EVAL_MIN}), too few "
                           "to compare checkpoints by; every example trains. Set data.eval_fraction to hold out anyway")
    fraction = round(held / num_examples, 6)
    share = "10% (LLaMA-Factory's val_size 0.1)" if EVAL_SHARE * num_examples <= EVAL_MAX else \
        "10% (LLaMA-Factory's val_size 0.1) capped at 1,000 (the QLoRA scripts hold out 1,024)"
    return Choice(fraction, f"{held:,} of {num_examples:,} examples held out: {share}; evaluated at every checkpoint")


def epochs_for(num_examples: int | None) -> tuple[float, str]:
    """The epoch ladder. Its points are published runs (LIMA 15 epochs on 1k examples, the QLoRA scripts ~3 on 9.8k,
    Alpaca 3 on 52k, Llama 2 SFT 2 on 27.5k); the thresholds between them (1k, 10k, 100k) and 5 epochs below 1k
    (fewer than LIMA's 15, which its authors tuned for a curated set) are a judgement."""
    n = num_examples or 0
    epochs = 5 if n and n < 1000 else 3 if n < 10_000 else 2 if n < 100_000 else 1
    why = ("more passes over little data, one over a large set: LIMA 15 epochs on 1k, QLoRA ~3 on 9.8k, Alpaca 3 on "
           "52k, Llama 2 SFT 2 on 27.5k; the held-out loss shows when more passes stop helping")
    if not n:
        why = "data.num_examples not set: 3 passes; " + why
    return float(epochs), why


def dora_dropout_why(p: float, scarce: bool) -> str:
    """The reason for DoRA's adapter dropout; choose.py weighs its time against LoRA's and may turn it off."""
    cost = ("with dropout on, peft runs every adapted module's base matmul a second time on the dropped input "
            "(≈ +90% of the step's FLOPs with all-linear targets, counted in the time) and keeps a 16-bit copy of "
            "each adapted weight for its backward (all layers' without gradient checkpointing, one layer's with it)")
    if scarce:
        return f"{p:g}: the DoRA authors' value, a regularizer where data is scarce; {cost}"
    return (f"0: the set is large enough that over its 1-2 epochs the regularizer matters less than its cost — {cost}. "
            "(The DoRA authors used 0.05.)")


def adapter_defaults(method: str, parameters: int, scarce: bool, rank: int | None = None) -> tuple[int, float, float]:
    """(rank, α, dropout) of the method's recipe; α keeps the recipe's α/r for a rank the user set."""
    recipe = recipe_for(method) or QLORA
    big = billions(parameters) >= LARGE_MODEL_B
    r = rank or recipe.rank
    if recipe is DORA:
        dropout = recipe.dropout[0] if scarce else 0.0
    else:
        dropout = recipe.dropout[1 if big else 0]
    return recipe.rank, recipe.ratio * r, dropout


def step_warning(recipe: Recipe, recipe_lr: float, ratio: float, lr: float) -> str | None:
    """Say so when the adapter's step, (α/r) × learning rate, is off the recipe's by 2× or more."""
    factor = (ratio * lr) / (recipe.ratio * recipe_lr)
    if 0.5 < factor < 2:
        return None
    return (f"α/r = {ratio:g} at learning rate {lr:g} makes the adapter's step {factor:.3g}× the recipe's "
            f"(α/r = {recipe.ratio:g} at {recipe_lr:g}); "
            f"training.learning_rate = {recipe_lr * recipe.ratio / ratio:.2g} keeps the recipe's step")


def choose_hyperparameters(method: str, parameters: int, num_examples: int | None, spec_method, spec_training,
                           *, devices: int = 1, spec_eval_fraction: float | None = None,
                           scarce: bool = False, eval_path: bool = False) -> dict[str, Choice]:
    """Every hyperparameter with its reason; a key the user set is kept and marked."""
    b = billions(parameters)
    big = b >= LARGE_MODEL_B
    out: dict[str, Choice] = {}

    def keep(name, value, default, why, warning=None):
        out[name] = Choice(value, "set in the spec", True, warning) if value is not None else Choice(default, why)

    recipe = recipe_for(method)
    if recipe is not None:
        size = "33B/65B" if big else "7B/13B"
        rank, alpha, p = adapter_defaults(method, parameters, scarce, spec_method.rank)
        r = spec_method.rank or rank
        keep("rank", spec_method.rank, rank, f"r={recipe.rank} on every linear layer: {recipe.source}")
        keep("alpha", spec_method.alpha, alpha,
             f"α = {recipe.ratio:g}·r, the recipe's α/r (its learning rate assumes this scale): {recipe.source}")
        if recipe is DORA:
            keep("dropout", spec_method.dropout, p, dora_dropout_why(recipe.dropout[0], scarce))
        else:
            keep("dropout", spec_method.dropout, p, f"{recipe.source}: 0.1 for 7B/13B, 0.05 for 33B/65B")
        keep("target_modules", spec_method.target_modules, "all-linear",
             "all linear layers (attention and MLP): QLoRA paper §4, needed to match full fine-tuning")
        lr = recipe.learning_rate[1 if big else 0]
        lr_why = (f"{recipe.source}: {recipe.learning_rate[0]:g} below 30B, {recipe.learning_rate[1]:g} from 30B "
                  f"({size} here), at its α/r = {recipe.ratio:g}")
        used_alpha = spec_method.alpha if spec_method.alpha is not None else alpha
        keep("learning_rate", spec_training.learning_rate, lr, lr_why)
        warning = step_warning(recipe, lr, used_alpha / r, float(out["learning_rate"].value))
        if warning:
            out["learning_rate"] = replace(out["learning_rate"], warning=warning)
    else:
        keep("learning_rate", spec_training.learning_rate, FULL_LR[1 if big else 0],
             "full fine-tuning: 2e-5 below 30B (Llama 2 SFT, Alpaca, torchtune 8B_full), 1e-5 from 30B (LIMA 65B)")
    keep("lr_scheduler", spec_training.lr_scheduler, "cosine",
         "cosine decay after warmup, as Llama 2 SFT and torchtune's LoRA/full recipes (the transformers Trainer's "
         "own default is linear; the QLoRA scripts used a constant rate)")
    keep("warmup_ratio", spec_training.warmup_ratio, 0.03, "3% of the steps warm up (the QLoRA scripts' warmup_ratio)")
    epochs, epochs_why = epochs_for(num_examples)
    keep("epochs", spec_training.epochs, epochs, epochs_why)
    out["effective_batch_size"] = effective_batch(num_examples, devices)
    out["eval_fraction"] = eval_fraction(num_examples, spec_eval_fraction, eval_path)
    return out


def accumulation_for(effective: int, micro_batch: int, devices: int) -> int:
    return max(1, ceil(effective / (micro_batch * devices)))


def steps_per_epoch(num_examples: int | None, micro_batch: int, accumulation: int, devices: int,
                    eval_fraction: float = 0.0) -> int | None:
    """Optimizer steps per epoch over the examples that train (those not held out)."""
    if not num_examples:
        return None
    held = max(1, round(num_examples * eval_fraction)) if eval_fraction > 0 else 0
    return max(1, ceil((num_examples - held) / (micro_batch * accumulation * devices)))
