"""planner.tokens: expected padded positions, packed rows, attention pairs and steps, against hand computations and
against what runtime/data.py really builds."""

from __future__ import annotations

import itertools
import math
import random
from statistics import NormalDist

import pytest

from peftplan.planner.tokens import Lengths, count_tokens, packing_gain, packing_pays


def brute_max(values, b, power=1):
    """E[max ** power] of b draws with replacement from equally likely `values`, by enumerating every draw."""
    draws = list(itertools.product(values, repeat=b))
    return sum(max(d) ** power for d in draws) / len(draws)


def test_expected_max_by_hand():
    lengths = Lengths.from_counts([1, 3], seq_len=10)
    assert lengths.expected_max(1) == pytest.approx(2.0)
    # P(max = 1) = 1/4, P(max = 3) = 3/4
    assert lengths.expected_max(2) == pytest.approx(1 * 0.25 + 3 * 0.75)
    assert lengths.expected_max(3) == pytest.approx(1 * 0.125 + 3 * 0.875)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_expected_max_matches_enumeration(b):
    values = [2, 4, 4, 10, 7]
    lengths = Lengths.from_counts(values, seq_len=100)
    assert lengths.expected_max(b) == pytest.approx(brute_max(values, b))
    assert lengths.expected_max(b, power=2) == pytest.approx(brute_max(values, b, power=2))


def test_lengths_are_cut_at_seq_len():
    lengths = Lengths.from_counts([100, 5000, 0], seq_len=2048)  # an empty example is not one
    assert lengths.values == (100.0, 2048.0)
    assert lengths.mean == pytest.approx((100 + 2048) / 2)


def test_log_normal_from_mean():
    sigma = 0.8
    wide = Lengths.from_mean(300, seq_len=10**6, sigma=sigma)
    assert wide.mean == pytest.approx(300, rel=1e-3)  # the cut does not bite
    # E[max of 2] = ∫ 1 − F(x)² dx of the log-normal, by the midpoint rule on a log grid (independent of the bins)
    mu = math.log(300) - sigma ** 2 / 2
    z = NormalDist()
    total, x, step = 0.0, 0.01, 1.001
    while x < 300 * 200:
        mid = x * math.sqrt(step)
        total += (1 - z.cdf((math.log(mid) - mu) / sigma) ** 2) * (x * step - x)
        x *= step
    assert wide.expected_max(2) == pytest.approx(total, rel=0.01)
    cut = Lengths.from_mean(300, seq_len=400, sigma=sigma)
    assert max(cut.values) <= 400 and cut.mean < 300


def test_padding_matches_the_runtime_benchmark():
    # benchmarks/README.md: 96 chat records of log-uniform token lengths (30 to 253 in practice), micro-batch 4:
    # padding to the longest of each batch computed 1.65x the real tokens (measured on one seeded shuffle; over
    # shuffles of 96 such records the ratio spreads by about ±0.07). Log-uniform quantiles as "measured" lengths:
    n = 10_000
    counts = [round(30 * (253 / 30) ** ((i + 0.5) / n)) for i in range(n)]
    lengths = Lengths.from_counts(counts, seq_len=256)
    assert lengths.expected_max(4) / lengths.mean == pytest.approx(1.65, abs=0.08)


def test_padded_count_by_hand():
    lengths = Lengths.from_counts([1, 3], seq_len=10)
    c = count_tokens(lengths, num_examples=5, seq_len=10, micro_batch=2, packing=False, attention="flash_attention_2")
    # two full batches of 2 (E[max] 2.5 each row) and one batch of 1 (E[max] 2)
    assert c.computed_tokens == pytest.approx(2 * 2 * 2.5 + 1 * 2.0)
    assert c.real_tokens == pytest.approx(5 * 2.0)
    assert c.rows == 5 and c.micro_batches == 3 and c.optimizer_steps == 3
    # flash-attention varlen: Σ l(l+1)/2 per example = (1 + 6) / 2 on average
    assert c.attention_pairs == pytest.approx(5 * (1 + 6) / 2)
    sdpa = count_tokens(lengths, num_examples=5, seq_len=10, micro_batch=2, packing=False, attention="sdpa")
    # padded batches: the full square of the padded length, except batches whose rows are equally long (no padding:
    # causal, 1 and 6 pairs per row with probability 1/4 each); the batch of one has no padding: causal
    per_batch = 2 * (1 * 0.25 + 9 * 0.75) - 2 * (0.25 * (1 - 1) + 0.25 * (9 - 6))
    assert sdpa.attention_pairs == pytest.approx(2 * per_batch + (1 + 6) / 2)
    eager = count_tokens(lengths, num_examples=4, seq_len=10, micro_batch=2, packing=False, attention="eager")
    assert eager.attention_pairs == pytest.approx(2 * 2 * (1 * 0.25 + 9 * 0.75))


def test_packed_rows_match_runtime_pack():
    from peftplan.runtime.data import pack  # pure Python (torch only in the collator)

    rng = random.Random(3)
    counts = [rng.randint(5, 300) for _ in range(500)]
    examples = [{"input_ids": list(range(n)), "attention_mask": [1] * n, "labels": list(range(n))} for n in counts]
    seq = 256
    rows = pack([{**e, "input_ids": e["input_ids"][:seq], "labels": e["labels"][:seq]} for e in examples], seq, 0)
    c = count_tokens(Lengths.from_counts(counts, seq), num_examples=len(counts), seq_len=seq, micro_batch=4,
                     packing=True)
    assert c.rows == len(rows)
    assert c.computed_tokens == len(rows) * seq
    assert c.real_tokens == pytest.approx(sum(min(n, seq) for n in counts))


def test_packed_attention_pairs():
    lengths = Lengths.from_counts([2, 4], seq_len=12)
    # sdpa: transformers' block-diagonal mask is dense: the full square per row
    c = count_tokens(lengths, num_examples=6, seq_len=12, micro_batch=1, packing=True, attention="sdpa")
    assert c.rows == 2 and c.attention_pairs == 2 * 144
    # flash_attention_2 with one row per micro-batch: per example, 12 / 3 examples per row × (3 + 10) / 2 pairs
    f1 = count_tokens(lengths, num_examples=6, seq_len=12, micro_batch=1, packing=True, attention="flash_attention_2")
    assert f1.attention_pairs == pytest.approx(2 * (12 / 3) * (3 + 10) / 2)
    # ... and with two rows per micro-batch plain causal attention over each row
    f2 = count_tokens(lengths, num_examples=6, seq_len=12, micro_batch=2, packing=True, attention="flash_attention_2")
    assert f2.attention_pairs == 2 * 12 * 13 / 2
    assert any("attend to each other" in n for n in f2.notes)


def test_steps_follow_the_trainer():
    lengths = Lengths.from_counts([100], seq_len=128)
    c = count_tokens(lengths, num_examples=1000, seq_len=128, micro_batch=4, packing=False, accumulation=3, devices=2)
    # 250 batches, 125 per device (accelerate shards whole batches), ceil(125 / 3) optimizer steps
    assert c.micro_batches == 125 and c.optimizer_steps == 42
    assert c.steps(2.5) == math.ceil(2.5 * 42)


def test_packing_never_computes_more_when_lengths_vary():
    rng = random.Random(0)
    counts = [int(rng.lognormvariate(5, 0.9)) + 1 for _ in range(5000)]
    lengths = Lengths.from_counts(counts, seq_len=2048)
    for b in (1, 2, 4, 8):
        padded = count_tokens(lengths, num_examples=5000, seq_len=2048, micro_batch=b, packing=False)
        packed = count_tokens(lengths, num_examples=5000, seq_len=2048, micro_batch=b, packing=True)
        # one row at a time pads nothing: packing then costs at most its last, partly filled row
        assert packed.computed_tokens <= padded.computed_tokens + (2048 if b == 1 else 0)
        assert packed.optimizer_steps <= padded.optimizer_steps
    # more rows per micro-batch pad more
    gains = [packing_gain(lengths, b) for b in (1, 2, 4, 8, 16)]
    assert gains == sorted(gains) and gains[0] == pytest.approx(1.0)


def test_packing_pays_only_when_lengths_vary():
    same = Lengths.from_counts([300] * 10, seq_len=2048)
    assert packing_pays(same, 8)[0] is False
    varied = Lengths.from_mean(300, 2048)
    pays, why = packing_pays(varied, 4)
    assert pays and "pays" in why


def test_bad_input_is_an_error():
    lengths = Lengths.from_counts([10], seq_len=64)
    with pytest.raises(ValueError):
        count_tokens(lengths, num_examples=10, seq_len=128, micro_batch=1, packing=False)
    with pytest.raises(ValueError):
        count_tokens(lengths, num_examples=10, seq_len=64, micro_batch=1, packing=False, attention="flex")
    with pytest.raises(ValueError):
        Lengths.from_counts([0, 0], seq_len=64)


@pytest.mark.slow
def test_quickstart_rows_and_steps_match_prepare_data(tmp_path):
    """The runtime's own data pipeline on a real (tiny) tokenizer and chat file: rows and Trainer steps per epoch,
    with and without packing, equal planner.tokens' counts from the examples' token lengths."""
    from transformers import AutoTokenizer

    from peftplan.runtime.data import prepare_data
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    model = build_tiny_model(tmp_path / "model", family="llama", hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    data = write_dataset(tmp_path / "data.jsonl", "chat", 400)
    tok = AutoTokenizer.from_pretrained(str(model))
    plain = prepare_data(str(data), tok, seq_len=128, eval_fraction=0.05, seed=42)
    packed = prepare_data(str(data), tok, seq_len=128, eval_fraction=0.05, seed=42, packing=True)
    counts = [len(x["input_ids"]) for x in plain.train]
    lengths = Lengths.from_counts(counts, 128)
    for prepared, packing in ((plain, False), (packed, True)):
        c = count_tokens(lengths, num_examples=len(counts), seq_len=128, micro_batch=8, packing=packing)
        assert c.rows == len(prepared.train)
        assert c.optimizer_steps == math.ceil(len(prepared.train) / 8)  # Trainer: ceil(batches / accumulation 1)
