"""Hyperparameters from model size, data size and method, each with a one-line rationale and source.

Sources:
- QLoRA: Dettmers et al. 2023, and its Guanaco scripts (artidoro/qlora scripts/finetune_guanaco_7b.sh,
  _65b.sh): LoRA on all linear layers, r=64, α=16, learning rate 2e-4 (7B/13B) and 1e-4 (33B/65B),
  dropout 0.1 (7B/13B) and 0.05 (33B/65B), warmup ratio 0.03, batch 16 (4 × 4 accumulation) for every
  size, max grad norm 0.3, paged AdamW.
- LoRA: Hu et al. 2021; α = 2r is the common default in peft examples and Raschka's LoRA sweeps
  ("Practical Tips for Finetuning LLMs Using LoRA", 2023: r=16, α=32 worked best on all layers).
- DoRA: Liu et al. 2024 — same learning rates as LoRA in their LLaMA runs; dropout 0 here because
  peft's DoRA with dropout keeps a 16-bit copy of every adapted weight (measured, see assumptions).
- Full fine-tuning: 1e-5 to 2e-5 with cosine decay (Llama 2 SFT used 2e-5; Alpaca 2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil


@dataclass(frozen=True)
class Choice:
    value: object
    why: str
    user_set: bool = False


def billions(parameters: int) -> float:
    return parameters / 1e9


def choose_hyperparameters(method: str, parameters: int, num_examples: int | None, spec_method, spec_training,
                           objective: str) -> dict[str, Choice]:
    """Every hyperparameter with its reason; a key the user set is kept and marked."""
    b = billions(parameters)
    big = b >= 30
    out: dict[str, Choice] = {}

    def keep(name, value, default, why):
        out[name] = Choice(value, "set in the spec", True) if value is not None else Choice(default, why)

    adapter = method != "full"
    if adapter:
        rank = 64 if objective == "quality" and b >= 13 else 16
        keep("rank", spec_method.rank, rank,
             "r=16 on every linear layer: QLoRA (Dettmers et al. 2023) found covering all layers matters more than r"
             if rank == 16 else "r=64 for a large model with quality as the objective (QLoRA paper's setting)")
        r = spec_method.rank or rank
        keep("alpha", spec_method.alpha, float(2 * r), "α = 2r, the common peft default (Raschka 2023 sweeps: r=16, α=32)")
        if method in ("dora", "qdora"):
            keep("dropout", spec_method.dropout, 0.0,
                 "0: with dropout peft's DoRA recomputes the base output and keeps a 16-bit copy of every adapted weight")
        else:
            keep("dropout", spec_method.dropout, 0.05 if big else 0.1,
                 "QLoRA paper: 0.1 for 7B/13B, 0.05 for 33B/65B")
        keep("target_modules", spec_method.target_modules, "all-linear",
             "all linear layers (attention and MLP): QLoRA paper §4, needed to match full fine-tuning")
        lr = 1e-4 if big else 2e-4
        keep("learning_rate", spec_training.learning_rate, lr, "QLoRA paper: 2e-4 for 7B/13B, 1e-4 for 33B/65B")
    else:
        keep("learning_rate", spec_training.learning_rate, 1e-5 if b >= 3 else 2e-5,
             "full fine-tuning: 1e-5–2e-5 (Llama 2 SFT and Alpaca used 2e-5; larger models lower)")
    keep("lr_scheduler", spec_training.lr_scheduler, "cosine", "cosine decay after warmup, the HF/torchtune recipe default")
    keep("warmup_ratio", spec_training.warmup_ratio, 0.03, "3% warmup (QLoRA paper)")
    n = num_examples or 0
    epochs = 5 if n and n < 1000 else 3 if n < 10_000 else 2 if n < 100_000 else 1
    keep("epochs", spec_training.epochs, float(epochs),
         "more passes over little data, one pass over a large set (QLoRA/Alpaca used 3 epochs on ~10k–50k examples)")
    out["effective_batch_size"] = Choice(16, "16 sequences per optimizer step (QLoRA's Guanaco scripts, 7B to 65B)")
    return out


def accumulation_for(effective: int, micro_batch: int, devices: int) -> int:
    return max(1, ceil(effective / (micro_batch * devices)))


def steps_per_epoch(num_examples: int | None, micro_batch: int, accumulation: int, devices: int) -> int | None:
    if not num_examples:
        return None
    return max(1, ceil(num_examples / (micro_batch * accumulation * devices)))
