"""Training throughput of a generated peftplan project against a hand-written transformers + peft script.

    python benchmarks/throughput.py [--repeat 5] [--steps 24] [--methods lora,qlora,dora]
                                    [--out benchmarks/results/throughput.json]

One small Llama-style model (hidden 256, 4 layers, intermediate 688, 4 heads / 2 KV heads, the 642-token
BPE vocabulary of peftplan.runtime.testing) and one chat dataset with widely spread lengths (record
token lengths log-uniform between 24 and 256, in practice 30 to 253) are built offline. For each method the
peftplan project is generated from a spec with the same geometry as the reference (micro-batch 4, no
accumulation, seq_len 256, gradient checkpointing, rank 8 / alpha 16 / dropout 0 on all linear layers,
the same learning rate and seed; the plan's optimizer, schedule, warmup, logging cadence and precision are
read from the generated plan.toml and handed to the reference). Then, R times, alternately (the order of each
pair flips every repeat):

    peftplan:   python PROJECT/train.py --max-steps N
    reference:  python benchmarks/reference_train.py ... --max-steps N

What is measured, the same way on both sides:

- time: `train_runtime`, the Trainer's own wall time of the training loop (dataloader, forward, backward,
  optimizer, logging, callbacks; model loading and tokenizing excluded). peftplan logs it as the last record
  of outputs/metrics.jsonl; the reference reads it from `trainer.train()`'s metrics.
- tokens: the dataset has exactly N x micro_batch examples, so N steps are exactly one epoch and both sides
  train on every example exactly once, whatever the order. Tokens are the dataset's non-padding tokens (and
  its trained tokens, labels != -100), computed here with peftplan.runtime.data.prepare_data. The reference
  also counts the tokens of every micro-batch it trains on; the two counts are checked to agree. Both sides
  use the Trainer's seeded sampler, so they see the same batches in the same order (checked: their per-step
  losses agree), hence the same padded slots: the reference's count of padded slots is used for both.
- contention-robust companions (the machine is shared): tokens per CPU-second spent inside Trainer.train
  (time.process_time around trainer.train(): the reference reads it itself; the project's unchanged train.py
  is started through a few lines (LAUNCH) that wrap transformers.Trainer.train with the same two clocks), and
  the median steady-state step time (steps 4..N) from the per-step timestamps of both sides.
- peftplan's own `tokens_per_second` (outputs/metrics.jsonl) is reported next to it but not used: it counts
  micro_batch x seq_len sequence slots per step, not tokens, so with padding to the longest in the batch it
  over-states the tokens processed.

Packing: the LoRA project is generated again with `data.packing = true` and run for one epoch of its packed
rows (fewer steps, each a full 4 x 256 row block); its non-padding tokens/s is compared with the padded
reference LoRA's (same dataset, same tokens, one epoch each).

The machine is shared and has 2 cores: both sides run with OMP_NUM_THREADS=1 (--threads), because with two
intra-op threads competing with other jobs a step's time swings by up to 5x. Medians over the repeats are
reported, and the ratio of the medians as well as the median of the per-repeat (adjacent-run) ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "reference_train.py"
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
RANK, ALPHA, LR, SEED = 8, 16, 1e-3, 42

SPEC = """\
[model]
name = "model"
[data]
path = "data.jsonl"
format = "chat"
num_examples = {examples}
seq_len = {seq_len}
packing = {packing}
eval_fraction = 0.0
[hardware]
gpu = "cpu"
memory_gib = 8
[method]
name = "{method}"
rank = {rank}
alpha = {alpha}
dropout = 0.0
target_modules = "all-linear"
[training]
micro_batch_size = {micro_batch}
gradient_accumulation_steps = 1
gradient_checkpointing = true
learning_rate = {lr}
epochs = 1
seed = {seed}
save_steps = 100000  # no checkpoint inside the timed loop, as in the reference
"""


def env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def chat_records(tokenizer, n: int, low: int = 24, high: int = 256, seed: int = 0) -> list[dict]:
    """n chat records whose token lengths are spread widely: log-uniform between `low` and `high` tokens
    (a user question, then an assistant answer cut to the number of words that reaches the drawn length;
    every fourth record has a system prompt)."""
    from peftplan.runtime.testing import corpus

    sentences = corpus(2000, seed=seed + 1)
    words = " ".join(sentences).split()
    rng = random.Random(seed)

    def length(messages):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) + 1  # + EOS

    out = []
    for i in range(n):
        target = round(math.exp(rng.uniform(math.log(low), math.log(high))))
        start = rng.randrange(len(words) - 400)
        head = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
        head.append({"role": "user", "content": rng.choice(sentences)})
        lo, hi = 1, 300  # the fewest answer words that reach the target length
        while lo < hi:
            mid = (lo + hi) // 2
            msgs = head + [{"role": "assistant", "content": " ".join(words[start:start + mid])}]
            lo, hi = (lo, mid) if length(msgs) >= target else (mid + 1, hi)
        out.append({"messages": head + [{"role": "assistant", "content": " ".join(words[start:start + lo])}]})
    return out


def build_workspace(ws: Path, examples: int, seq_len: int) -> dict:
    from transformers import AutoTokenizer

    from peftplan.runtime.data import IGNORE, pad_token_id, prepare_data
    from peftplan.runtime.testing import build_tiny_model, write_records

    build_tiny_model(ws / "model", family="llama", **MODEL)
    tok = AutoTokenizer.from_pretrained(ws / "model")
    write_records(ws / "data.jsonl", chat_records(tok, examples, high=seq_len))
    pad = pad_token_id(tok)
    stats = {}
    for packing in (False, True):
        d = prepare_data(ws / "data.jsonl", tok, format="chat", seq_len=seq_len, seed=SEED, packing=packing)
        rows = d.train
        stats["packed" if packing else "padded"] = {
            "rows": len(rows),
            "dropped": d.dropped,
            "tokens": sum(sum(1 for t in r["input_ids"] if t != pad) for r in rows),
            "trained_tokens": sum(sum(1 for t in r["labels"] if t != IGNORE) for r in rows),
            "lengths": sorted(len(r["input_ids"]) for r in rows) if not packing else None,
        }
    lengths = stats["padded"]["lengths"]
    stats["padded"]["length_quantiles"] = {q: lengths[min(len(lengths) - 1, int(q / 100 * len(lengths)))]
                                           for q in (0, 10, 25, 50, 75, 90, 100)}
    stats["padded"]["mean_length"] = sum(lengths) / len(lengths)
    stats["vocab_size"] = len(tok)
    return stats


def generate(ws: Path, name: str, method: str, packing: bool, args) -> Path:
    spec = ws / f"{name}.toml"
    spec.write_text(SPEC.format(examples=args.steps * args.micro_batch, seq_len=args.seq_len,
                                packing=str(packing).lower(), method=method, rank=RANK, alpha=ALPHA,
                                micro_batch=args.micro_batch, lr=LR, seed=SEED))
    out = ws / name
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(out), "--force"],
                          capture_output=True, text=True, env=env(args.threads), cwd=ws)
    if proc.returncode != 0:
        raise SystemExit(f"peftplan generate {spec} failed:\n{proc.stderr}")
    return out


def reference_args(project: Path, method: str, args) -> list[str]:
    """The reference's command line, with every setting the plan chose copied from plan.toml."""
    from peftplan.runtime.optim import TRAINER_OPTIM

    plan = tomllib.loads((project / "plan.toml").read_text())
    t, m, d = plan["training"], plan["method"], plan["data"]
    assert t["micro_batch_size"] == args.micro_batch and t["gradient_accumulation_steps"] == 1
    assert d["seq_len"] == args.seq_len and t["gradient_checkpointing"] is True
    return [
        "--model", str(project.parent / "model"), "--data", str(project.parent / "data.jsonl"),
        "--method", method, "--rank", str(m["rank"]), "--alpha", str(m["alpha"]), "--dropout", str(m["dropout"]),
        "--target-modules", m["target_modules"] if isinstance(m["target_modules"], str)
        else ",".join(m["target_modules"]),
        "--seq-len", str(d["seq_len"]), "--micro-batch-size", str(t["micro_batch_size"]),
        "--grad-accum", str(t["gradient_accumulation_steps"]), "--lr", str(t["learning_rate"]),
        "--lr-scheduler", t["lr_scheduler"], "--warmup-ratio", str(t["warmup_ratio"]),
        "--optim", TRAINER_OPTIM[t["optimizer"]], "--precision", t["precision"], "--seed", str(t["seed"]),
        "--logging-steps", str(t["logging_steps"]), "--attention", plan["model"]["attention"],
    ]


# Runs the project's own `train.py` unchanged, with one measurement added from outside: the wall and CPU time
# (time.process_time: every thread of the process) spent inside Trainer.train, the same clocks
# reference_train.py reads around its trainer.train().
LAUNCH = """\
import json, os, runpy, sys, time
import transformers
_train = transformers.Trainer.train
def train(self, *a, **kw):
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        return _train(self, *a, **kw)
    finally:
        with open(os.environ["BENCH_CLOCK"], "w") as fh:
            json.dump({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}, fh)
transformers.Trainer.train = train
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def run_peftplan(project: Path, steps: int, args) -> dict:
    shutil.rmtree(project / "outputs", ignore_errors=True)
    clock = project.parent / f"{project.name}-clock.json"
    clock.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "--max-steps", str(steps)], cwd=project,
                          capture_output=True, text=True, env={**env(args.threads), "BENCH_CLOCK": str(clock)},
                          timeout=900)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{project}/train.py failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "train_runtime" in r)
    logged = [r for r in rows if "loss" in r and "event" not in r]
    times = [r["time"] for r in logged]
    peak = next((r for r in rows if r.get("event") == "peak_memory"), None)
    clocks = json.loads(clock.read_text())
    return {"train_runtime_s": float(final["train_runtime"]), "steps": final["step"], "process_s": process_s,
            "train_call_wall_s": clocks["wall_s"], "train_call_cpu_s": clocks["cpu_s"],
            "losses": {r["step"]: r["loss"] for r in logged},
            "reported_tokens_per_second": final.get("tokens_per_second"),
            # wall time between consecutive logged steps (logging_steps = 1): per-step times from step 2 on
            "step_seconds": [round(b - a, 4) for a, b in zip(times, times[1:], strict=False)],
            "peak_memory_step": peak["step"] if peak else None}


def run_reference(project: Path, method: str, steps: int, args, tag: str) -> dict:
    out = project.parent / f"reference-{tag}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REFERENCE), *reference_args(project, method, args),
                           "--max-steps", str(steps), "--output-dir", str(project.parent / f"reference-{tag}"),
                           "--json-out", str(out)], capture_output=True, text=True, env=env(args.threads),
                          cwd=project.parent, timeout=900)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reference {method} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["process_s"] = process_s
    res["losses"] = {int(k): v for k, v in res["losses"].items()}
    return res


def med(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (= one epoch of the data)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default="lora,qlora,dora")
    ap.add_argument("--no-packing", action="store_true", help="skip the packing comparison")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every training process")
    ap.add_argument("--workdir", default=None, help="keep the model, data and projects here (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = ap.parse_args(argv)
    os.environ.update(env(args.threads))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ws = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="peftplan-throughput-"))
    ws.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = build_workspace(ws, args.steps * args.micro_batch, args.seq_len)
    padded, packed = data["padded"], data["packed"]
    assert padded["rows"] == args.steps * args.micro_batch and padded["dropped"] == 0, padded
    packed_steps = -(-packed["rows"] // args.micro_batch)
    q = padded["length_quantiles"]
    print(f"data: {padded['rows']} chat examples, {padded['tokens']} tokens ({padded['trained_tokens']} trained), "
          f"lengths min/median/max {q[0]}/{q[50]}/{q[100]} (seq_len {args.seq_len}); "
          f"packed: {packed['rows']} rows, {packed_steps} steps")

    projects = {m: generate(ws, f"p-{m}", m, False, args) for m in methods}
    do_packing = not args.no_packing and "lora" in methods
    if do_packing:
        projects["lora+packing"] = generate(ws, "p-lora-packing", "lora", True, args)
    plan_settings = {name: tomllib.loads((p / "plan.toml").read_text())["training"] for name, p in projects.items()}

    runs: dict[str, dict[str, list]] = {m: {"peftplan": [], "reference": []} for m in methods}
    packed_runs: list[dict] = []
    for r in range(args.repeat):
        for i, m in enumerate(methods):
            order = ["reference", "peftplan"] if (r + i) % 2 == 0 else ["peftplan", "reference"]
            if m == "lora" and do_packing:  # the packed run next to its padded reference, on alternate sides
                order = order + ["packing"] if r % 2 == 0 else ["packing"] + order
            for side in order:
                if side == "reference":
                    res = run_reference(projects[m], m, args.steps, args, f"{m}-{r}")
                    runs[m]["reference"].append(res)
                elif side == "peftplan":
                    res = run_peftplan(projects[m], args.steps, args)
                    runs[m]["peftplan"].append(res)
                else:
                    res = run_peftplan(projects["lora+packing"], packed_steps, args)
                    packed_runs.append(res)
                label = "lora+packing" if side == "packing" else m
                print(f"  repeat {r + 1}/{args.repeat} {label:13s} {side:9s} train_runtime "
                      f"{res['train_runtime_s']:6.2f} s  (process {res['process_s']:5.1f} s)", flush=True)

    # ------------------------------------------------------------------------------------------- summary
    result: dict = {
        "benchmark": "training throughput, peftplan project vs hand-written transformers+peft reference",
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"family": "llama", **MODEL, "vocab_size": data["vocab_size"]},
        "geometry": {"micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1, "seq_len": args.seq_len,
                     "steps": args.steps, "packed_steps": packed_steps, "gradient_checkpointing": True,
                     "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear",
                     "learning_rate": LR, "seed": SEED, "threads": args.threads, "repeat": args.repeat},
        "plan_training": plan_settings,
        "data": {"examples": padded["rows"], "tokens": padded["tokens"], "trained_tokens": padded["trained_tokens"],
                 "mean_length": padded["mean_length"], "length_quantiles": q,
                 "packed_rows": packed["rows"], "packed_tokens": packed["tokens"],
                 "packed_trained_tokens": packed["trained_tokens"]},
        "methods": {},
    }
    for m in methods:
        pp, ref = runs[m]["peftplan"], runs[m]["reference"]
        for x in ref:  # the reference's own count of what it trained on = the dataset's
            assert x["tokens"] == padded["tokens"] and x["trained_tokens"] == padded["trained_tokens"], (x, padded)
        padded_slots = ref[0]["padded_tokens"]
        assert all(x["padded_tokens"] == padded_slots for x in ref)
        loss_diff = max(abs(x["losses"][s] - y["losses"][s]) for x in pp for y in ref
                        for s in set(x["losses"]) & set(y["losses"]))
        pp_tps = [padded["tokens"] / x["train_runtime_s"] for x in pp]
        ref_tps = [x["tokens_per_second"] for x in ref]
        paired = [a / b for a, b in zip(pp_tps, ref_tps, strict=True)]
        pp_cpu = [padded["tokens"] / x["train_call_cpu_s"] for x in pp]
        ref_cpu = [padded["tokens"] / x["train_call_cpu_s"] for x in ref]
        pp_step = med([med(x["step_seconds"][2:]) for x in pp])
        ref_step = med([med(x["step_seconds"][3:]) for x in ref])
        result["methods"][m] = {
            "peftplan_tokens_per_second": med(pp_tps),
            "reference_tokens_per_second": med(ref_tps),
            "ratio": med(pp_tps) / med(ref_tps),
            "paired_ratio_median": med(paired),
            "paired_ratios": paired,
            "peftplan_trained_tokens_per_second": med([padded["trained_tokens"] / x["train_runtime_s"] for x in pp]),
            "reference_trained_tokens_per_second": med([x["trained_tokens_per_second"] for x in ref]),
            "peftplan_padded_tokens_per_second": med([padded_slots / x["train_runtime_s"] for x in pp]),
            "reference_padded_tokens_per_second": med([x["padded_tokens_per_second"] for x in ref]),
            "peftplan_reported_tokens_per_second": med([x["reported_tokens_per_second"] for x in pp]),
            "padding_efficiency": padded["tokens"] / padded_slots,
            # contention-robust companions: tokens per CPU-second inside trainer.train(), and the median time of a
            # steady-state step (steps 4..N, the same steps on both sides)
            "peftplan_tokens_per_cpu_second": med(pp_cpu),
            "reference_tokens_per_cpu_second": med(ref_cpu),
            "cpu_ratio": med(pp_cpu) / med(ref_cpu),
            "cpu_paired_ratio_median": med([a / b for a, b in zip(pp_cpu, ref_cpu, strict=True)]),
            "steady_step_ratio": ref_step / pp_step,
            "peftplan_train_runtime_s": [x["train_runtime_s"] for x in pp],
            "reference_train_runtime_s": [x["train_runtime_s"] for x in ref],
            "peftplan_process_s": med([x["process_s"] for x in pp]),
            "reference_process_s": med([x["process_s"] for x in ref]),
            "peftplan_median_step_s": pp_step,
            "reference_median_step_s": ref_step,
            "peftplan_train_call_cpu_s": [x["train_call_cpu_s"] for x in pp],
            "reference_train_call_cpu_s": [x["train_call_cpu_s"] for x in ref],
            "peftplan_step_seconds": [x["step_seconds"] for x in pp],
            "reference_step_seconds": [x["step_seconds"] for x in ref],
            "max_loss_difference_same_step": loss_diff,
            "target": ">= 1.0",
        }
    if do_packing:
        ref = runs["lora"]["reference"]
        pk_tps = [packed["tokens"] / x["train_runtime_s"] for x in packed_runs]
        ref_tps = [x["tokens_per_second"] for x in ref]
        paired = [a / b for a, b in zip(pk_tps, ref_tps, strict=True)]
        pk_cpu = [packed["tokens"] / x["train_call_cpu_s"] for x in packed_runs]
        ref_cpu = [padded["tokens"] / x["train_call_cpu_s"] for x in ref]
        result["packing"] = {
            "peftplan_packed_tokens_per_second": med(pk_tps),
            "reference_padded_tokens_per_second": med(ref_tps),
            "ratio": med(pk_tps) / med(ref_tps),
            "paired_ratio_median": med(paired),
            "paired_ratios": paired,
            "peftplan_packed_trained_tokens_per_second": med([packed["trained_tokens"] / x["train_runtime_s"]
                                                              for x in packed_runs]),
            "reference_padded_trained_tokens_per_second": med([x["trained_tokens_per_second"] for x in ref]),
            "peftplan_packed_train_runtime_s": [x["train_runtime_s"] for x in packed_runs],
            "peftplan_reported_tokens_per_second": med([x["reported_tokens_per_second"] for x in packed_runs]),
            "peftplan_median_step_s": med([med(x["step_seconds"][2:]) for x in packed_runs]),
            "reference_padding_efficiency": padded["tokens"] / ref[0]["padded_tokens"],
            "ideal_ratio": ref[0]["padded_tokens"] / padded["tokens"],  # 1 / padding efficiency
            "peftplan_packed_tokens_per_cpu_second": med(pk_cpu),
            "reference_padded_tokens_per_cpu_second": med(ref_cpu),
            "cpu_ratio": med(pk_cpu) / med(ref_cpu),
            "cpu_paired_ratio_median": med([a / b for a, b in zip(pk_cpu, ref_cpu, strict=True)]),
            "peftplan_packed_train_call_cpu_s": [x["train_call_cpu_s"] for x in packed_runs],
            "target": ">= 1.5",
        }
    result["total_seconds"] = time.perf_counter() - t_start
    result["workdir"] = str(ws)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(ws, ignore_errors=True)

    print(f"\nmedian of {args.repeat} runs each; tok/s = non-padding tokens / Trainer train_runtime (wall); "
          f"cpu = tokens per CPU-second in trainer.train(); {args.threads} thread(s)")
    print(f"{'method':13s} {'peftplan tok/s':>14s} {'reference tok/s':>15s} {'ratio':>6s} {'paired':>6s} "
          f"{'padded tok/s pp/ref':>19s} {'cpu ratio':>9s} {'step ratio':>10s} {'pp reported':>11s}  target")
    for m, s in result["methods"].items():
        padded_pair = f"{s['peftplan_padded_tokens_per_second']:,.0f}/{s['reference_padded_tokens_per_second']:,.0f}"
        print(f"{m:13s} {s['peftplan_tokens_per_second']:14,.0f} {s['reference_tokens_per_second']:15,.0f} "
              f"{s['ratio']:6.2f} {s['paired_ratio_median']:6.2f} {padded_pair:>19s} {s['cpu_ratio']:9.2f} "
              f"{s['steady_step_ratio']:10.2f} {s['peftplan_reported_tokens_per_second']:11,.0f}  ≥ 1.0")
    if do_packing:
        s = result["packing"]
        print(f"{'lora+packing':13s} {s['peftplan_packed_tokens_per_second']:14,.0f} "
              f"{s['reference_padded_tokens_per_second']:15,.0f} {s['ratio']:6.2f} {s['paired_ratio_median']:6.2f} "
              f"{'vs padded ref lora':>19s} {s['cpu_ratio']:9.2f} {'':>10s} "
              f"{s['peftplan_reported_tokens_per_second']:11,.0f}  ≥ 1.5 (ideal {s['ideal_ratio']:.2f})")
    print(f"wrote {out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
