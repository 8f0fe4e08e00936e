"""Per-device memory under DDP and FSDP, measured on two CPU processes, next to planner.parallel.shard.

    python benchmarks/calibrate_parallel.py --out benchmarks/results/calibration-cpu-parallel.csv

Each run is launched the way a generated project launches: `accelerate launch` with the
accelerate_config.yaml the project template renders (FSDP2, full shard, one decoder layer per unit), over
gloo, with the runtime's own model loading and method setup (runtime.model.load_model, bf16 autocast
through accelerate's mixed precision) and the runtime's CPU FSDP switch (runtime/cpu_fsdp.py). The
model and optimizer are prepared together, as the Trainer does (FSDP2 re-points the optimizer at the
sharded parameters). Each rank measures peak live tensor bytes over a steady-state step (runtime.memprobe,
DTensor shards counted by their local storage, FSDP2's in-place storage resizes followed), with the mode
active from before wrapping so DDP's gradient buckets and FSDP's buffers count; the row records the
larger of the two ranks.

The prediction is planner.parallel.per_device(method, setup, "ddp" | "fsdp", 2) for the same setup: what
`peftplan plan` / `estimate` report per device for that run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate import MEDIUM, METHODS, Run, build_model_dir, repredict, setup_of, versions, write_rows  # noqa: E402
from docsection import replace_section  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROCESSES = 2


def predict(run: Run, parallelism: str) -> dict:
    from peftplan.planner import estimate
    from peftplan.planner.parallel import per_device

    s = setup_of(run, "cpu")
    single = estimate(run.method, s)
    est = per_device(run.method, s, parallelism, PROCESSES)
    return {"predicted_peak": est.peak_allocated_bytes, "predicted_single": single.peak_allocated_bytes,
            **{f"pred_{k}": v for k, v in est.components().items()}}


def run_of(row: dict) -> Run:
    """The Run a table row was measured with (its config column holds the whole model config)."""
    return Run(row["family"], row["method"], batch=int(row["batch"]), seq=int(row["seq"]), gc=row["gc"] == "True",
               rank=int(row["rank"]), scale=json.loads(row["config"]))


def accelerate_config(parallelism: str) -> str:
    """The project template's accelerate_config.yaml for a two-process CPU run in bf16."""
    from peftplan.planner.project import environment

    launch = {"count": PROCESSES, "nodes": 1, "devices": PROCESSES, "processes": PROCESSES, "distributed": True,
              "parallelism": parallelism, "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP"}[parallelism],
              "zero_stage": 2, "mixed_precision": "bf16", "use_cpu": True}
    return environment().get_template("accelerate_config.yaml.j2").render(banner="calibrate_parallel", launch=launch)


def worker(run: Run, parallelism: str, model_dir: str, out: str, steps: int = 3) -> None:
    """One rank: load, prepare through accelerate, train `steps` steps, measure the last one."""
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from peftplan.runtime.cpu_fsdp import allow_fsdp_on_cpu
    from peftplan.runtime.memprobe import LiveTensorBytes, model_tensors
    from peftplan.runtime.model import MethodSetup, load_model
    from peftplan.runtime.optim import build_optimizer

    allow_fsdp_on_cpu()
    acc = Accelerator(cpu=True, mixed_precision="bf16" if run.dtype == "bfloat16" else "no")
    sharded = parallelism == "fsdp"
    setup = MethodSetup(method=run.method, dtype=run.dtype, attention=run.attention, gradient_checkpointing=run.gc,
                        rank=run.rank, alpha=2 * run.rank, dropout=run.dropout, shard_quantized=sharded)
    model = load_model(model_dir, setup)
    model.train()
    if run.loss == "chunked":  # as runtime/train.py prepares the model, before accelerate wraps it
        from peftplan.runtime.loss import install

        install(model)
    if run.dtype != "float32":
        from peftplan.runtime.model import keep_adapter_inputs_16bit

        keep_adapter_inputs_16bit(model)
    vocab = run.config().get("vocab_size", 1000)
    gen = torch.Generator().manual_seed(acc.process_index)
    ids = torch.randint(0, vocab, (run.batch, run.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    # One mode from before prepare to the end: what DDP (gradient buckets) and FSDP (sharded parameters,
    # all-gather buffers) allocate while wrapping is live memory too, as max_memory_allocated would see it.
    with LiveTensorBytes(model_tensors(model)) as mode:
        opt = build_optimizer(run.optimizer, [p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model, opt = acc.prepare(model, opt)  # together, as the Trainer does: FSDP2 swaps the optimizer's params
        for _ in range(steps):
            static = mode.current  # weights, optimizer state and buffers between steps
            mode.reset_peak()
            with acc.autocast():
                loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        peak, baseline = mode.peak, static
    local = torch.tensor([peak], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"measured_peak": int(local.item()), "rank0_peak": int(peak),
                                         "rank0_static": int(baseline),
                                         "distributed_type": str(acc.distributed_type),
                                         "parameters_held_locally": round(held / total, 4)}))
    acc.end_training()


def measure(run: Run, parallelism: str, root: Path) -> dict:
    model_dir = build_model_dir(run.config(), root)
    cfg = root / f"accelerate-{parallelism}.yaml"
    cfg.write_text(accelerate_config(parallelism))
    out = root / "result.json"
    out.unlink(missing_ok=True)
    with socket.socket() as sock:  # a free port: the previous run's may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
           "--main_process_port", str(port), __file__,
           "--worker", json.dumps({"run": asdict(run), "parallelism": parallelism, "model_dir": str(model_dir),
                                   "out": str(out)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
        raise RuntimeError((ranks or proc.stderr)[-4000:])
    return json.loads(out.read_text())


def matrix(name: str) -> list[tuple[Run, str]]:
    if name == "quick":
        return [(Run("llama", m, rank=16, scale=MEDIUM["llama"]), "fsdp") for m in ("lora", "qlora")]
    out = []
    for fam in ("llama", "qwen2", "phi3", "gpt2"):
        for m in METHODS:
            for gc in (False, True):
                for par in ("ddp", "fsdp"):
                    if par == "ddp" and (fam != "llama" or gc):
                        continue  # DDP changes little over the single-device table: a spot check
                    out.append((Run(fam, m, batch=2, seq=256, gc=gc, rank=16, scale=MEDIUM[fam]), par))
    return out


def summary(rows: list[dict]) -> str:
    """Markdown: |error| median / worst per parallelism and method, and every row."""
    import statistics

    def err(r):
        return float(r["error"])

    lines = ["| parallelism | method | runs | median abs error | worst |", "|---|---|---:|---:|---:|"]
    for par in ("ddp", "fsdp"):
        for m in METHODS:
            sel = [abs(err(r)) for r in rows if r["parallelism"] == par and r["method"] == m]
            if sel:
                lines.append(f"| {par} | {m} | {len(sel)} | {statistics.median(sel):.1%} | {max(sel):.1%} |")
    every = [abs(err(r)) for r in rows]
    lines += ["", f"All {len(rows)} runs: median |error| {statistics.median(every):.1%}, worst {max(every):.1%}; "
              f"{sum(err(r) >= 0 for r in rows)} of {len(rows)} predictions at or above the measurement.", "",
              "| run (2 ranks) | measured MiB | predicted MiB | error | each rank held |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['key']}` | {int(r['measured_peak']) / 2**20:.1f} | "
                     f"{int(r['predicted_peak']) / 2**20:.1f} | {err(r):+.1%} | "
                     f"{float(r['parameters_held_locally']):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", choices=["quick", "full"], default="full")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration-cpu-parallel.csv"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--summary", action="store_true", help="print the markdown summary of --out and exit")
    ap.add_argument("--update-doc", action="store_true", help="write that summary into docs/accuracy.md §4 and exit")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the rest")
    ap.add_argument("--repredict", action="store_true",
                    help="measure nothing: refresh the prediction columns of --out with the current estimator")
    args = ap.parse_args(argv)
    if args.repredict:
        print(repredict(args.out, lambda row: predict(run_of(row), row["parallelism"])))
        return 0
    if args.summary or args.update_doc:
        text = summary(list(csv.DictReader(args.out.open())))
        if args.update_doc:
            doc = Path(__file__).resolve().parents[1] / "docs" / "accuracy.md"
            if not replace_section(doc, "<!-- parallel:begin -->", "<!-- parallel:end -->", text + "\n"):
                print(f"error: {doc} has no <!-- parallel:begin/end --> markers", file=sys.stderr)
                return 1
        else:
            print(text)
        return 0
    if args.worker:
        w = json.loads(args.worker)
        worker(Run(**w["run"]), w["parallelism"], w["model_dir"], w["out"])
        return 0
    runs = matrix(args.matrix)
    vers = versions()
    rows = list(csv.DictReader(args.out.open())) if args.resume and args.out.exists() else []
    done = {r["key"] for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run, par) in enumerate(runs, 1):
            key = f"{par}{PROCESSES}-{run.key()}"
            if key in done:
                continue
            t0 = time.time()
            for attempt in (1, 2):  # a loaded machine occasionally loses the rendezvous: one retry
                try:
                    got = measure(run, par, Path(tmp))
                    break
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"[{i}/{len(runs)}] {key}: attempt {attempt} failed\n{exc}", file=sys.stderr)
            else:
                return 1
            pred = predict(run, par)
            err = (pred["predicted_peak"] - got["measured_peak"]) / got["measured_peak"]
            rows.append({"key": key, "parallelism": par, "processes": PROCESSES,
                         "family": run.family, "method": run.method, "batch": run.batch, "seq": run.seq,
                         "gc": run.gc, "rank": run.rank, "config": json.dumps(run.scale, sort_keys=True), **got, **pred,
                         "error": round(err, 4), "seconds": round(time.time() - t0, 1), **vers})
            print(f"[{i}/{len(runs)}] {par} {run.key()}: measured {got['measured_peak'] / 2**20:.1f} MiB, predicted "
                  f"{pred['predicted_peak'] / 2**20:.1f} MiB ({err:+.1%}), held {got['parameters_held_locally']}",
                  flush=True)
            write_rows(args.out, rows)  # after every run: an interrupted matrix continues with --resume
    errs = sorted(abs(float(r["error"])) for r in rows)
    print(f"{len(rows)} runs: median |error| {errs[len(errs) // 2]:.1%}, worst {errs[-1]:.1%} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
