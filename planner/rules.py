"""The trade-offs practitioners use to pick a method and its setting, in one place, read top to bottom.

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

Judgements, each with its reason:

- DoRA's time limit (`DORA_MAX_SLOWDOWN`): DoRA is worth at most 1.6× LoRA's time. Its authors
  measured about 20% over LoRA for LLaMA-7B/13B (huggingface/peft PR #1474); users report 1.7-2×
  (modelscope/ms-swift #3033; peft PR #1474). With dropout on, peft's DoRA runs each adapted module's
  base matmul a second time (peft `DoraLinearVariant.forward`: `base_result = None` unless the dropout
  is the identity; peft PR #2122 made the no-dropout path reuse the base output), which nearly doubles
  the step. So the planner weighs DoRA twice: with the dropout its authors used (0.05) and, if that is
  over the limit, without it — keeping DoRA's sample efficiency and leaving overfitting to the held-out
  evaluation — before falling back to LoRA. With `objective.priority = "quality"` the user has said that
  time is secondary: the limit is `DORA_MAX_SLOWDOWN_QUALITY` (3×), the largest slowdown reported for peft's
  DoRA at small micro-batches (ms-swift #3033 reports 2-3× on 7B), so only a pathological cost loses DoRA.
- Attention (`default_attention`): the architecture decides. transformers 5 refuses sdpa for models
  whose `_supports_sdpa` is False (Gemma 2: "sdpa does not support softcapping", modeling_gemma2.py),
  raising at load time; eager always works and materializes the s×s scores (counted).
  flash_attention_2 needs the flash-attn package on the training machine, so it is never chosen
  silently.
- Devices the advice may suggest (`advisable`): NVIDIA only. bitsandbytes 0.50 ships ROCm builds and
  documents AMD support, but (1) peftplan's runtime and its memory calibration were measured on CUDA
  and on the CPU only; (2) the catalog's MI250X is one package of two GCDs that PyTorch sees as two
  64 GB devices, so its "128 GB" never holds a single-device plan; (3) flash-attention and bitsandbytes'
  ROCm paths lag the CUDA ones (catalog note on the MI300X). A user who owns AMD cards can still plan
  for them by naming them in hardware.gpu; the planner only does not send anyone there.
"""

from __future__ import annotations

from dataclasses import dataclass

SCARCE_EXAMPLES = 5_000  # below this, sample efficiency matters more than speed
FULL_FT_MIN_EXAMPLES = {"balanced": 100_000, "quality": 20_000}
FULL_FT_MIN_HEADROOM = 0.20  # "plentiful" memory: full fine-tuning fits with 20% of the device to spare
DORA_MAX_SLOWDOWN = 1.6  # DoRA is preferred for scarce data only if it costs at most this much more time
DORA_MAX_SLOWDOWN_QUALITY = 3.0  # ... and under objective.priority = "quality"


def dora_max_slowdown(priority: str) -> float:
    """DoRA's time limit against LoRA on the same base, for the objective's priority."""
    return DORA_MAX_SLOWDOWN_QUALITY if priority == "quality" else DORA_MAX_SLOWDOWN
ADVICE_VENDORS = ("nvidia",)


@dataclass(frozen=True)
class Situation:
    priority: str  # balanced | quality | memory | speed | cost
    num_examples: int | None

    @property
    def scarce(self) -> bool:
        return self.num_examples is not None and self.num_examples < SCARCE_EXAMPLES


def scarce(num_examples: int | None) -> bool:
    return Situation("balanced", num_examples).scarce


def preference(s: Situation) -> list[tuple[str, str]]:
    """Methods in order of preference for the situation, each with its reason."""
    n = s.num_examples
    full_ok = n is not None and n >= FULL_FT_MIN_EXAMPLES.get(s.priority, 10**12)
    full = ("full", f"{n:,} examples justify updating every weight, and memory is plentiful") if full_ok else None
    dora = ("dora", f"only {n:,} examples: DoRA learns more per step than LoRA (Liu et al. 2024)") if s.scarce else None
    qdora = ("qdora", "scarce data and only a 4-bit base fits: DoRA's sample efficiency on an NF4 base") \
        if s.scarce else None
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


def default_attention(shape) -> tuple[str, str]:
    """The attention implementation when training.attention is not set, and why."""
    if shape.supports_sdpa:
        return "sdpa", "PyTorch's fused kernel; saves no s×s scores"
    return "eager", (f"{shape.model_type} has no sdpa path in transformers (it refuses sdpa at load time); eager "
                     "materializes the s×s attention scores, counted in the estimate; flash_attention_2 also works "
                     "where the flash-attn package is installed")


def advisable(vendor: str | None) -> bool:
    """Whether the planner may suggest a device of this vendor (see the module docstring)."""
    return vendor in ADVICE_VENDORS


# --- geometry with a margin ----------------------------------------------------------------------------------------
# The fit already keeps FIT_HEADROOM_FRACTION (5%) of the device free, but the estimate itself carries an error: a
# median of ~1% and up to ~9% on the committed CPU calibration, a few percent against published GPU measurements
# (docs/accuracy.md). A candidate that fills more than TIGHT_FRACTION of the usable memory bets the run on that error;
# when a candidate below it is at most NEARLY_AS_FAST times slower, the roomier one is chosen and the plan says so.
# One that fills more than NO_MARGIN_FRACTION has no room for any error at all: a roomier one is taken up to
# SAFER_SLOWDOWN times slower (an out-of-memory crash hours in costs more than a quarter of the run), under
# TIGHT_FRACTION if there is one, else under NO_MARGIN_FRACTION.
TIGHT_FRACTION = 0.95
NEARLY_AS_FAST = 1.10
NO_MARGIN_FRACTION = 0.99
SAFER_SLOWDOWN = 1.25


def with_margin(fastest, fitting: list, usable: int):
    """The candidate to take instead of `fastest` when `fastest` is tight and a roomier one is nearly as fast, with
    the reason; (fastest, None) otherwise. Candidates have `.needed_bytes` and `.seconds`."""
    fill = fastest.needed_bytes / usable
    if fill <= TIGHT_FRACTION:
        return fastest, None
    limit = SAFER_SLOWDOWN if fill > NO_MARGIN_FRACTION else NEARLY_AS_FAST
    # with no margin at all, a geometry that keeps at least some (under NO_MARGIN_FRACTION) beats none
    bounds = (TIGHT_FRACTION, NO_MARGIN_FRACTION) if fill > NO_MARGIN_FRACTION else (TIGHT_FRACTION,)
    for bound in bounds:
        roomy = [c for c in fitting if c.needed_bytes <= bound * usable and c.seconds <= limit * fastest.seconds]
        if roomy:
            break
    else:
        return fastest, None
    pick = min(roomy, key=lambda c: (c.seconds, c.needed_bytes))
    return pick, (f"a margin: the fastest geometry fills {fill:.0%} of the usable memory "
                  f"(over {TIGHT_FRACTION:.0%}); this one needs {pick.needed_bytes / usable:.0%} and takes "
                  f"{pick.seconds / fastest.seconds:.2f}x its time (within {limit}x)")


# --- activation offloading -------------------------------------------------------------------------------------------
# Offloading the checkpointed layer inputs (runtime/offload.py) costs PCIe traffic every micro-step and pinned host
# memory; torchtune enables it for long contexts. The planner takes it only when nothing fits without it, or when it
# allows a micro-batch at least OFFLOAD_BATCH_GAIN times larger than any plan without it and the whole run is faster.
OFFLOAD_BATCH_GAIN = 2


# --- the adapter's rank when the recipe's does not fit ---------------------------------------------------------------
# The recipes' r = 64 (QLoRA, for large models) costs adapter weights, gradients and optimizer state in proportion:
# ~5.8 GiB more than r = 16 for a 70B model (828 M vs 207 M parameters; fp32 weights and gradients, 8-bit Adam).
# Where nothing fits with the recipe's rank, the planner tries r = 16 (the common LoRA default; the QLoRA paper's own
# ablation found rank mattered little once every layer is adapted), with the recipe's α/r kept, and says so; a rank
# the user set is never changed.
FALLBACK_RANK = 16


# --- judgements behind the time model's additions ------------------------------------------------------------------
# Communication hidden behind compute: FSDP prefetches the next unit's all-gather during the current one's compute and
# DDP reduces gradient buckets while backward continues, but how much overlaps depends on the link, the bucket sizes and
# the kernels; no published run in docs/published_throughput.toml separates it. Half is a judgement, not a fit: the
# plan shows the communication it did not hide as an assumption, so a user can see what this constant carries.
COMM_OVERLAP = 0.5

# The CPU's throughput when the spec gives no hardware.tflops: 1 fp32 TFLOPS is the order of magnitude of a many-core
# server CPU's vector units (an AVX-512 core ≈ 32 fp32 FLOP/cycle × 3 GHz ≈ 0.1 TFLOPS; ~10 cores busy with matmuls).
# A judgement: CPU plans say their time is indicative, and hardware.tflops replaces it.
CPU_FP32_TFLOPS = 1.0
