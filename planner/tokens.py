"""Token accounting: how many token positions and attention pairs the runtime computes, and how many steps.

    lengths = Lengths.from_counts([812, 95, 301, ...], seq_len=2048)      # measured per-example token counts
    lengths = Lengths.from_mean(300, seq_len=2048)                        # only a mean: log-normal, SIGMA below
    count = count_tokens(lengths, num_examples=20_000, seq_len=2048, micro_batch=4, accumulation=4,
                         packing=False, attention="sdpa")
    count.computed_tokens, count.optimizer_steps, packing_gain(lengths, 4)

What the runtime does (runtime/data.py, transformers 5.23's Trainer and masking_utils):

- Every example is cut to seq_len when tokenized (data_tokens.tokenize_records): a length here is min(l, seq_len).
- Without packing, the Trainer's RandomSampler shuffles the examples and the DataCollator pads each micro-batch to
  its longest row. A micro-batch of b rows therefore computes b × max(l_1..l_b) positions. The sampler draws without
  replacement; with many more examples than b this is the same as b independent draws, which is what is used:
  E[max of b] = Σ_k P(max ≥ k) = Σ_v v · (F(v)^b − F(v⁻)^b) over the distinct lengths v (F the empirical or assumed
  CDF), exact for the distribution given.
- With packing, runtime/data.py pack() concatenates the (cut) examples into rows of exactly seq_len tokens, an
  example that does not fit continuing in the next row: rows = ceil(Σ l / seq_len), the last row padded. Every row
  computes seq_len positions.
- Steps (Trainer): batches per device = ceil(ceil(rows / b) / devices) (accelerate shards whole batches, even_batches),
  optimizer steps per epoch = ceil(batches / accumulation) (Trainer.set_initial_training_values), at least 1.
- Attention pairs (query × key positions the kernel computes, per layer and head), which decide attention FLOPs:
  * padded batches, sdpa: a batch with padding gets a 4-D mask (masking_utils.sdpa_mask), so SDPA runs its
    memory-efficient kernel over the full L × L square of the padded length L; a batch without padding (b = 1, or
    rows all equally long) takes the is_causal path: L(L+1)/2. eager always computes the full square.
  * padded batches, flash_attention_2: unpadded to varlen (modeling_flash_attention_utils._upad_input): Σ l(l+1)/2.
  * packed rows: the collator drops the attention mask and keeps position_ids that restart per example, so
    transformers builds a block-diagonal mask (find_packed_sequence_indices): for sdpa and eager a dense 4-D mask,
    i.e. the full seq_len² square per row; for flash_attention_2 the varlen path per example, Σ l(l+1)/2, but only
    with one row per micro-batch (_is_packed_sequence requires batch size 1): with b > 1 flash attention runs
    plain causal over each whole row, seq_len(seq_len+1)/2 (and the examples of a row attend to each other).

A length distribution known only by its mean is assumed log-normal with log-space spread SIGMA (below), truncated at
seq_len: chat and instruction data are right-skewed with a standard deviation about as large as the mean.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from statistics import NormalDist

SIGMA = 0.8  # log-space standard deviation assumed when only the mean is known: coefficient of variation 0.95
BINS = 512  # equal-probability bins that discretize an assumed distribution
PACKING_PAYS = 1.2  # computed positions without packing ÷ with packing at or above which packing is worth it
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Lengths:
    """Per-example token counts after the cut at seq_len: distinct values (ascending) and their probabilities."""

    values: tuple[float, ...]
    probs: tuple[float, ...]
    seq_len: int
    source: str  # how the distribution was obtained, for the plan's assumptions

    @classmethod
    def from_histogram(cls, histogram: dict[int, int], seq_len: int) -> Lengths:
        """The empirical distribution from {token count: examples} (the data check's histogram), cut at seq_len."""
        hist = Counter()
        for length, n in histogram.items():
            if int(length) > 0 and int(n) > 0:
                hist[min(int(length), seq_len)] += int(n)
        n = sum(hist.values())
        if n == 0:
            raise ValueError("no example has a positive token count")
        values = tuple(sorted(hist))
        return cls(tuple(float(v) for v in values), tuple(hist[v] / n for v in values), seq_len,
                   f"measured lengths of {n:,} examples")

    @classmethod
    def from_counts(cls, counts: Iterable[int], seq_len: int) -> Lengths:
        """The empirical distribution of measured per-example token counts (each cut at seq_len)."""
        return cls.from_histogram(Counter(int(c) for c in counts), seq_len)

    @classmethod
    def from_mean(cls, mean: float, seq_len: int, sigma: float = SIGMA) -> Lengths:
        """Log-normal with log-space spread `sigma` and mean `mean` before the cut at seq_len, in BINS bins of equal
        probability, each represented by its conditional mean of min(X, seq_len): the mean after the cut is exact."""
        if mean <= 0:
            raise ValueError("the mean length must be positive")
        if sigma <= 0:
            v = float(min(mean, seq_len))
            return cls((v,), (1.0,), seq_len, f"every example {v:g} tokens")
        mu = math.log(mean) - sigma ** 2 / 2
        z = NormalDist()
        edges = [0.0] + [math.exp(mu + sigma * z.inv_cdf(i / BINS)) for i in range(1, BINS)] + [math.inf]

        def partial(a: float, b: float) -> float:  # E[X · 1{a < X ≤ b}]
            def phi(x: float) -> float:
                if x <= 0:
                    return 0.0
                return 1.0 if x == math.inf else z.cdf((math.log(x) - mu - sigma ** 2) / sigma)
            return math.exp(mu + sigma ** 2 / 2) * (phi(b) - phi(a))

        values = []
        for a, b in zip(edges, edges[1:], strict=False):
            if a >= seq_len:
                values.append(float(seq_len))
            elif b <= seq_len:
                values.append(partial(a, b) * BINS)
            else:  # the bin straddles the cut: below it X, above it seq_len
                top = 1.0 if b == math.inf else z.cdf((math.log(b) - mu) / sigma)
                above = top - z.cdf((math.log(seq_len) - mu) / sigma)
                values.append((partial(a, seq_len) + seq_len * above) * BINS)
        return cls(tuple(values), (1.0 / BINS,) * BINS, seq_len,
                   f"only the mean is known: log-normal lengths, mean {mean:g}, log-space spread σ = {sigma:g} "
                   f"(coefficient of variation {math.sqrt(math.exp(sigma ** 2) - 1):.2f}), cut at {seq_len}")

    @cached_property
    def mean(self) -> float:
        return sum(v * p for v, p in zip(self.values, self.probs, strict=True))

    @cached_property
    def mean_square(self) -> float:
        return sum(v * v * p for v, p in zip(self.values, self.probs, strict=True))

    @cached_property
    def _cdf(self) -> tuple[float, ...]:
        return tuple(min(1.0, c) for c in accumulate(self.probs))

    @cached_property
    def _memo(self) -> dict:
        return {}

    def expected_max(self, b: int, power: int = 1) -> float:
        """E[max(l_1..l_b) ** power] for b independent draws: Σ_v v^power · (F(v)^b − F(v⁻)^b)."""
        key = (b, power)
        if key not in self._memo:
            total, below = 0.0, 0.0
            for v, upto in zip(self.values, self._cdf, strict=True):
                total += v ** power * (upto ** b - below ** b)
                below = upto
            self._memo[key] = total
        return self._memo[key]

    def all_equal(self, b: int) -> float:
        """Σ_v p_v^b · (v² − v(v+1)/2): what b equally long rows save by running causal instead of the square."""
        key = ("equal", b)
        if key not in self._memo:
            self._memo[key] = sum(p ** b * (v * v - v * (v + 1) / 2)
                                  for v, p in zip(self.values, self.probs, strict=True))
        return self._memo[key]


@dataclass(frozen=True)
class TokenCount:
    """What the runtime computes in one epoch; `epochs` scales it to the run. Positions and pairs over all devices."""

    lengths: Lengths
    num_examples: int  # training examples (the held-out ones excluded)
    seq_len: int
    micro_batch: int
    accumulation: int
    devices: int
    packing: bool
    attention: str
    rows: int  # per epoch: examples, or packed rows of seq_len
    micro_batches: int  # per epoch and device
    optimizer_steps: int  # per epoch
    real_tokens: float  # per epoch: tokens of the (cut) examples
    computed_tokens: float  # per epoch: positions run through the model, padding included
    attention_pairs: float  # per epoch: query × key positions per layer and head
    notes: tuple[str, ...]

    @property
    def tokens_per_micro_batch(self) -> float:
        """Mean positions in one device's micro-batch: what a GPU's efficiency depends on."""
        return self.computed_tokens / max(self.micro_batches * self.devices, 1)

    @property
    def pairs_per_micro_batch(self) -> float:
        return self.attention_pairs / max(self.micro_batches * self.devices, 1)

    @property
    def padding_ratio(self) -> float:
        """Computed positions ÷ real tokens (1.0: no padding)."""
        return self.computed_tokens / max(self.real_tokens, 1e-9)

    def steps(self, epochs: float) -> int:
        """Optimizer steps of the run (Trainer: max_steps = ceil(epochs × steps per epoch))."""
        return max(1, math.ceil(epochs * self.optimizer_steps))


def _padded_pairs(lengths: Lengths, b: int, attention: str) -> float:
    """Attention pairs of one padded micro-batch of b rows."""
    if attention == "flash_attention_2":
        return b * (lengths.mean_square + lengths.mean) / 2
    if attention == "sdpa" and b == 1:  # no padding: is_causal
        return (lengths.mean_square + lengths.mean) / 2
    square = b * lengths.expected_max(b, power=2)  # a padding mask (or eager): the full square of the padded length
    if attention == "eager":
        return square
    # sdpa: a batch whose rows are all equally long (probability Σ p_v^b) has no padding and runs causal
    return square - b * lengths.all_equal(b)


def _packed_pairs(lengths: Lengths, seq_len: int, b: int, attention: str) -> float:
    """Attention pairs of one packed row."""
    if attention == "flash_attention_2" and b == 1:
        per_example = (lengths.mean_square + lengths.mean) / 2
        return min(seq_len / lengths.mean * per_example, seq_len * (seq_len + 1) / 2)
    if attention == "flash_attention_2":
        return seq_len * (seq_len + 1) / 2
    return float(seq_len * seq_len)


def count_tokens(lengths: Lengths, *, num_examples: int, seq_len: int, micro_batch: int, packing: bool,
                 accumulation: int = 1, devices: int = 1, attention: str = "sdpa") -> TokenCount:
    """Positions, attention pairs and steps of one epoch, as the runtime computes them (module docstring)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    if num_examples < 1 or micro_batch < 1 or accumulation < 1 or devices < 1:
        raise ValueError("num_examples, micro_batch, accumulation and devices must be ≥ 1")
    if lengths.seq_len != seq_len:
        raise ValueError(f"the lengths were cut at {lengths.seq_len}, not at seq_len = {seq_len}")
    b = micro_batch
    real = num_examples * lengths.mean
    notes = [f"lengths: {lengths.source}"]
    if packing:
        rows = max(1, math.ceil(real / seq_len))
        computed = float(rows * seq_len)
        pairs = rows * _packed_pairs(lengths, seq_len, b, attention)
        notes.append(f"packed: {rows:,} rows of {seq_len} per epoch ({computed / real:.2f}× the real tokens)")
        if attention != "flash_attention_2":
            notes.append(f"packed rows under {attention}: transformers masks each row block-diagonally with a dense "
                         f"mask, so attention computes the full {seq_len}² square per row")
        elif b > 1:
            notes.append("packed rows under flash_attention_2 with micro-batch > 1: transformers runs plain causal "
                         "attention over each row (its per-example path needs one row per micro-batch), so the "
                         "examples of a row attend to each other")
    else:
        rows = num_examples
        full, rest = divmod(num_examples, b)
        computed = full * b * lengths.expected_max(b) + (rest * lengths.expected_max(rest) if rest else 0.0)
        pairs = full * _padded_pairs(lengths, b, attention) + (_padded_pairs(lengths, rest, attention) if rest else 0)
        if b > 1:
            notes.append(f"padded to the longest of each micro-batch of {b}: E[max] = {lengths.expected_max(b):,.0f} "
                         f"tokens per row for a mean of {lengths.mean:,.0f} ({computed / real:.2f}× the real tokens)")
    batches = max(1, math.ceil(math.ceil(rows / b) / devices))
    steps = max(1, math.ceil(batches / accumulation))
    return TokenCount(lengths, num_examples, seq_len, b, accumulation, devices, packing, attention, rows, batches,
                      steps, real, computed, pairs, tuple(notes))


def packing_gain(lengths: Lengths, micro_batch: int) -> float:
    """Computed positions without packing ÷ with packing (per example; ≥ PACKING_PAYS: packing pays)."""
    padded = lengths.expected_max(micro_batch)
    packed = lengths.mean  # packed rows compute each real token once (plus one partial row per epoch)
    return padded / packed


def packing_pays(lengths: Lengths, micro_batch: int) -> tuple[bool, str]:
    """Whether packing is worth turning on, and why, for the plan's reasons."""
    gain = packing_gain(lengths, micro_batch)
    verdict = gain >= PACKING_PAYS
    return verdict, (f"without packing each micro-batch of {micro_batch} is padded to its longest row: "
                     f"{gain:.2f}× the positions of packed rows ({'≥' if verdict else '<'} {PACKING_PAYS:g}: "
                     f"packing {'pays' if verdict else 'does not pay'})")
