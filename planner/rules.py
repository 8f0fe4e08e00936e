"""The trade-offs practitioners use to pick a method, in one place, read top to bottom.

Each rule orders the methods for a situation and says why; the candidates' numbers (fit, time,
cost) then decide: a preferred method that does not fit, or costs disproportionately more time,
loses to the next one, and the plan records why.

- QLoRA when the 16-bit base does not fit: a 4-bit NF4 base is what makes 65-70B models trainable
  on one 48-80 GB card (Dettmers et al. 2023).
- DoRA when data is scarce and memory allows: it learns more per step than LoRA at some compute and
  memory cost (Liu et al. 2024, gains largest at low rank / few examples).
- LoRA as the robust default: every inference engine serves it, merged into the base with no added
  latency.
- Full fine-tuning only when memory is plentiful and the data large enough to justify updating
  every weight (and keeping a full copy of the model per run).
"""

from __future__ import annotations

from dataclasses import dataclass

SCARCE_EXAMPLES = 5_000  # below this, sample efficiency matters more than speed
FULL_FT_MIN_EXAMPLES = {"balanced": 100_000, "quality": 20_000}
FULL_FT_MIN_HEADROOM = 0.20  # "plentiful" memory: full fine-tuning fits with 20% of the device to spare
DORA_MAX_SLOWDOWN = 1.6  # DoRA is preferred for scarce data only if it costs at most this much more time


@dataclass(frozen=True)
class Situation:
    priority: str  # balanced | quality | memory | speed | cost
    num_examples: int | None

    @property
    def scarce(self) -> bool:
        return self.num_examples is not None and self.num_examples < SCARCE_EXAMPLES


def preference(s: Situation) -> list[tuple[str, str]]:
    """Methods in order of preference for the situation, each with its reason."""
    n = s.num_examples
    full_ok = n is not None and n >= FULL_FT_MIN_EXAMPLES.get(s.priority, 10**12)
    full = ("full", f"{n:,} examples justify updating every weight, and memory is plentiful") if full_ok else None
    dora = ("dora", f"only {n:,} examples: DoRA learns more per step than LoRA (Liu et al. 2024)") if s.scarce else None
    qdora = ("qdora", "scarce data and only a 4-bit base fits: DoRA's sample efficiency on an NF4 base") if s.scarce else None
    lora = ("lora", "LoRA is the robust default; merged, it serves with no added latency in every engine")
    qlora = ("qlora", "the 16-bit base does not fit: a 4-bit NF4 base with LoRA (Dettmers et al. 2023)")
    if s.priority == "quality":
        order = [full, ("dora", "quality first: DoRA learns more per step than LoRA (Liu et al. 2024)"), lora,
                 ("qdora", "quality first, 4-bit base: DoRA on NF4"), qlora]
    else:
        order = [full, dora, lora, qdora, qlora]
    seen, out = set(), []
    for item in order:
        if item and item[0] not in seen:
            seen.add(item[0])
            out.append(item)
    for m, why in (("dora", "DoRA: more per step, at extra compute and memory"),
                   ("qdora", "QDoRA: DoRA on a 4-bit base"), ("full", "full fine-tuning")):
        if m not in seen:
            out.append((m, why))
    return out
