"""Peak memory and time of one forward + backward with the standard loss (full logits) vs the chunked loss.

    python benchmarks/loss_memory.py [--shapes 1x2048,2x2048,2x4096] [--repeat 3] [--hidden 128] [--vocab 128256]
                                     [--precision fp32,bf16] [--out benchmarks/results/loss_memory.json]

Model: a Llama-style decoder built from its config (hidden 128, intermediate 344, 2 layers, 4 heads / 2 KV heads,
Llama-3's vocabulary of 128,256, untied head), random weights, the head frozen and the layers trainable (as
under LoRA), no gradient checkpointing. Input: random token ids, labels = ids.

Per shape (batch × tokens): the peak live tensor bytes of forward + backward above the model's own tensors
(runtime.memprobe.LiveTensorBytes, the CPU equivalent of torch.cuda.max_memory_allocated), measured once per
side (it is deterministic); then `repeat` timed runs of each side without the probe, alternating, the order of
each pair flipping every repeat (the machine is shared); medians and the ratio of the medians are reported.
When the standard side's predicted peak (12 bytes per token and vocabulary entry) exceeds half of the memory
available now, only the chunked side is measured. The chunked loss's own terms (the formula of runtime/loss.py's
docstring) are written next to the measurement. Precisions: fp32 (the CPU runtime's) and bf16 CPU autocast.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def build(hidden: int, vocab: int, max_tokens: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                               max_position_embeddings=max_tokens, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.requires_grad_(False)
    model.model.layers.requires_grad_(True)
    model.train()
    return model


def step(model, ids, precision: str) -> float:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def peak_bytes(model, ids, precision: str) -> tuple[int, float]:
    from peftplan.runtime.memprobe import LiveTensorBytes, model_tensors

    with LiveTensorBytes(model_tensors(model) + [ids]) as mode:
        loss = step(model, ids, precision)
    return mode.peak - mode.baseline, loss


def timed(model, ids, precision: str) -> float:
    t0 = time.perf_counter()
    step(model, ids, precision)
    return time.perf_counter() - t0


def measure(standard, chunked, batch: int, tokens: int, precision: str, args) -> dict:
    """One shape at one precision: both sides, or the chunked side alone when the standard one would not fit."""
    import torch

    from peftplan.runtime.loss import chunk_tokens

    p = 2 if precision == "bf16" else 4
    chunk = chunk_tokens(args.vocab, p)
    n = batch * tokens
    labelled = n - batch  # the last position of each row has no target
    row = {"batch": batch, "tokens": tokens, "precision": precision, "chunk_tokens": chunk,
           # the chunked loss's own terms (runtime/loss.py): one chunk of logits, labelled rows and grad_h
           # (+ the fp32 head cast to bf16 under autocast; the hidden states are fp32 here: fp32 weights)
           "chunked_loss_terms_formula_bytes": chunk * args.vocab * (4 + (p if p != 4 else 0))
           + 2 * labelled * args.hidden * 4 + (args.vocab * args.hidden * p if p != 4 else 0),
           "standard_predicted_bytes": 12 * n * args.vocab}
    ids = torch.randint(0, args.vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    fits = row["standard_predicted_bytes"] <= available_bytes() / 2
    sides = ("standard", "chunked") if fits else ("chunked",)
    models = {"standard": standard, "chunked": chunked}
    for side in sides:
        row[f"peak_bytes_{side}"], row[f"loss_{side}"] = peak_bytes(models[side], ids, precision)
    times = {side: [] for side in sides}
    for r in range(args.repeat):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            times[side].append(timed(models[side], ids, precision))
    for side in sides:
        row[f"seconds_{side}"] = times[side]
        row[f"seconds_{side}_median"] = statistics.median(times[side])
    line = (f"{batch}x{tokens} {precision}: chunked peak {row['peak_bytes_chunked'] / 2**20:,.0f} MiB, "
            f"{row['seconds_chunked_median']:.2f} s")
    if fits:
        row["memory_ratio_chunked_over_standard"] = row["peak_bytes_chunked"] / row["peak_bytes_standard"]
        row["saved_bytes_per_token_and_vocab"] = (row["peak_bytes_standard"] - row["peak_bytes_chunked"]) / (
            n * args.vocab)
        row["time_ratio_chunked_over_standard"] = row["seconds_chunked_median"] / row["seconds_standard_median"]
        line += (f"; standard {row['peak_bytes_standard'] / 2**20:,.0f} MiB, {row['seconds_standard_median']:.2f} s "
                 f"(memory {row['memory_ratio_chunked_over_standard']:.3f}x, saved "
                 f"{row['saved_bytes_per_token_and_vocab']:.2f} B per token x vocab; time "
                 f"{row['time_ratio_chunked_over_standard']:.2f}x); loss {row['loss_standard']:.6f} vs "
                 f"{row['loss_chunked']:.6f}")
    else:
        row["standard_skipped"] = (f"needs ~{row['standard_predicted_bytes'] / 2**30:.1f} GiB, more than half of the "
                                   f"{available_bytes() / 2**30:.1f} GiB available")
        line += f"; standard skipped ({row['standard_skipped']})"
    print(line, flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x2048,2x2048,2x4096", help="batch x tokens, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--precision", default="fp32,bf16", help="fp32 and/or bf16 (CPU autocast), comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss_memory.json"))
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT))
    from peftplan.runtime.loss import CHUNK_BUDGET_BYTES, chunk_tokens, install

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    max_tokens = max(t for _, t in shapes)
    standard = build(args.hidden, args.vocab, max_tokens)
    chunked = copy.deepcopy(standard)
    res = install(chunked)
    if not res.enabled:
        print(f"error: {res}", file=sys.stderr)
        return 1
    rows = []
    for precision in args.precision.split(","):
        for batch, tokens in shapes:
            rows.append(measure(standard, chunked, batch, tokens, precision, args))
    out = {"model": {"family": "llama", "hidden": args.hidden, "layers": 2, "vocab": args.vocab, "head": "frozen",
                     "gradient_checkpointing": False},
           "chunk_tokens": {"fp32": chunk_tokens(args.vocab, 4), "bf16": chunk_tokens(args.vocab, 2)},
           "chunk_budget_bytes": CHUNK_BUDGET_BYTES, "repeat": args.repeat,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
