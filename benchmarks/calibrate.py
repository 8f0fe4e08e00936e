"""Calibration harness: real training steps through the runtime's own loading and method setup,
measured peak memory next to the estimator's prediction.

    python benchmarks/calibrate.py --matrix quick --out benchmarks/results/calibration.csv

On CPU it measures peak live tensor bytes (runtime.memprobe.LiveTensorBytes, what
torch.cuda.max_memory_allocated would report) and the process's peak RSS delta; on CUDA,
max_memory_allocated / max_memory_reserved. Models are built from configs with random weights,
saved with save_pretrained and loaded back through runtime.model.load_model.

Each dense row carries a `split` (split_of: fit | held-out by a hash of the run id; "new" for --matrix holdout, the
rows measured after the constants were fitted); benchmarks/calibrate_fit.py fits on "fit" rows only. Re-predicting a
table (--repredict, calibrate_fit.py, the tests) needs the planner only, not torch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES: dict[str, dict] = {
    # a Llama-style model with GQA
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                  max_position_embeddings=2048),
    "qwen2": dict(model_type="qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1200, tie_word_embeddings=True,
                  max_position_embeddings=2048),
    "gemma2": dict(model_type="gemma2", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1500,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=64,
                   max_position_embeddings=2048, sliding_window=4096),
    "phi3": dict(model_type="phi3", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, vocab_size=1100, max_position_embeddings=2048,
                 tie_word_embeddings=False, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=8, vocab_size=1000, n_positions=1024,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "phi": dict(model_type="phi", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, vocab_size=1000, max_position_embeddings=2048, resid_pdrop=0.0,
                embd_pdrop=0.0, attention_dropout=0.0, partial_rotary_factor=0.5),
    # the families people fine-tune now: q/k norms, sliding-window layers, post-norms, NoPE layers, multipliers
    "qwen3": dict(model_type="qwen3", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1200,
                  tie_word_embeddings=True, max_position_embeddings=2048),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1500,
                        query_pre_attn_scalar=64, max_position_embeddings=2048, sliding_window=64,
                        sliding_window_pattern=2),  # layers 0, 2 slide (64 < seq: a mask), 1, 3 are global
    "olmo2": dict(model_type="olmo2", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                  max_position_embeddings=2048),
    "smollm3": dict(model_type="smollm3", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
                    max_position_embeddings=2048, no_rope_layers=[1, 1, 1, 0], pad_token_id=0),
    "granite": dict(model_type="granite", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
                    max_position_embeddings=2048, embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.0078125, logits_scaling=8.0),
    "mistral": dict(model_type="mistral", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000,
                    tie_word_embeddings=False, max_position_embeddings=2048, sliding_window=96),  # every layer slides
    "phi4mini": dict(model_type="phi3", hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=1100, max_position_embeddings=2048,
                     tie_word_embeddings=True, partial_rotary_factor=0.75, pad_token_id=0),
}


@dataclass
class Run:
    family: str
    method: str
    batch: int = 2
    seq: int = 128
    gc: bool = False
    dropout: float = 0.0
    attention: str = "sdpa"
    padded: bool = False
    optimizer: str = "adamw_torch"
    rank: int = 8
    dtype: str = "bfloat16"
    scale: dict = field(default_factory=dict)  # config overrides (bigger models)
    loss: str = "chunked"  # the runtime's default (runtime/loss.py); "full": transformers' own loss
    accumulation: int = 1  # micro-batches per optimizer step (gradients held through the later ones)
    targets: tuple = ()  # adapter targets by name; () = all-linear
    size: str = ""  # a name for the scaled config in the run id ("" : "m" for any scale, "v128k")

    def __post_init__(self):
        if self.family == "gemma2" and self.attention == "sdpa":
            self.attention = "eager"  # transformers has no sdpa path for Gemma 2 (attention soft-capping)

    def config(self) -> dict:
        return {**FAMILIES[self.family], **self.scale}

    def key(self) -> str:
        size = "-v128k" if self.scale.get("vocab_size", 0) >= 100_000 else ("-m" if self.scale else "")
        size = f"-{self.size}" if self.size else size
        return (f"{self.family}{size}-{self.method}-b{self.batch}s{self.seq}-gc{int(self.gc)}-do{self.dropout}"
                f"-{self.attention}{'-pad' if self.padded else ''}-{self.optimizer}"
                f"{'-fullloss' if self.loss == 'full' else ''}"
                f"{f'-ga{self.accumulation}' if self.accumulation > 1 else ''}"
                f"{'-t' + '+'.join(self.targets) if self.targets else ''}")


def run_of(row: dict, cls=None) -> Run:
    """The Run a table row was measured with (its config column holds the whole model config)."""
    return (cls or Run)(row["family"], row["method"], batch=int(row["batch"]), seq=int(row["seq"]),
                        gc=row["gradient_checkpointing"] == "True", dropout=float(row["lora_dropout"]),
                        attention=row["attention"], padded=row.get("padded") == "True", optimizer=row["optimizer"],
                        rank=int(row["rank"]), dtype=row["dtype"], scale=json.loads(row["config"]),
                        loss=row.get("loss") or "full", accumulation=int(row.get("accumulation") or 1),
                        targets=tuple((row.get("targets") or "").split()))


# The held-out split of the dense tables (benchmarks/calibrate_fit.py reads it): a row whose run id's SHA-256 starts
# with a byte below HELD_OUT_BYTE (77/256 = 30.1%) is "held-out", any other "fit"; rows measured after the constants
# were fitted (--matrix holdout) are "new". Only "fit" rows may be used to fit anything.
HELD_OUT_BYTE = 77
SPLITS = ("fit", "held-out", "new")


def split_of(run_id: str) -> str:
    """The split of a row measured before the constants were fitted: the hash rule above."""
    return "held-out" if hashlib.sha256(run_id.encode()).digest()[0] < HELD_OUT_BYTE else "fit"


def repredict(path: Path, predict_row) -> str:
    """Replace every prediction column of the table at `path` with the current estimator's, keeping the
    measurements; returns a one-line summary. The estimator changes far more often than the runtime's memory does,
    and measuring takes hours."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in [k for k in row if k.startswith("pred")]:
            row.pop(key)
        row.update(predict_row(row))
        row["error"] = (row["predicted_peak"] - int(row["measured_peak"])) / int(row["measured_peak"])
    write_rows(path, rows)
    errors = sorted(abs(r["error"]) for r in rows)
    return (f"{path}: {len(rows)} rows re-predicted; median |error| {errors[len(errors) // 2]:.2%}, "
            f"worst {errors[-1]:.2%}")


def build_model_dir(cfg: dict, root: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = json.dumps(cfg, sort_keys=True)
    path = root / f"m{abs(hash(name)) % 10**12}"
    if (path / "config.json").exists():
        return path
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


def setup_of(run: Run, device_kind: str):
    """The estimator's Setup for a calibration run (alpha = 2r)."""
    from peftplan.planner import AdapterSettings, Geometry, Setup, shape_from_config

    geometry = Geometry(run.batch, run.seq, run.gc, run.accumulation, run.attention, run.padded)
    adapter = AdapterSettings(rank=run.rank, alpha=2 * run.rank, dropout=run.dropout,
                              target_modules=tuple(run.targets) if run.targets else "all-linear")
    return Setup(shape_from_config(run.config()), geometry, adapter, optimizer=run.optimizer, dtype=run.dtype,
                 device_kind=device_kind, loss=run.loss)


def predict(run: Run, device_kind: str | None = None) -> dict:
    """The estimator's prediction for `run`; `device_kind` None: where this process would measure (imports torch)."""
    from peftplan.planner import estimate

    est = estimate(run.method, setup_of(run, device_kind or ("cuda" if _cuda() else "cpu")))
    return {"predicted_peak": est.peak_allocated_bytes, "predicted_total": est.device_total_bytes,
            "predicted_phase": est.phase, **{f"pred_{k}": v for k, v in est.components().items()}}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure(run: Run, root: Path, steps: int = 3, target_modules: list[str] | None = None) -> dict:
    """Peak bytes of a steady-state training step of `run`, through the runtime's own loading and method setup;
    `target_modules`: the adapter's targets by name instead of all-linear (the MoE calibration's attention)."""
    import torch

    from peftplan.runtime.memprobe import (
        LiveTensorBytes,
        model_tensors,
        rss_bytes,
        rss_high_water_bytes,
        rss_high_water_reset,
    )
    from peftplan.runtime.model import MethodSetup, load_model
    from peftplan.runtime.optim import build_optimizer

    path = build_model_dir(run.config(), root)
    cuda = _cuda()
    target_modules = target_modules or list(run.targets)
    setup = MethodSetup(method=run.method, dtype=run.dtype, attention=run.attention, gradient_checkpointing=run.gc,
                        rank=run.rank, alpha=2 * run.rank, dropout=run.dropout,
                        **({"target_modules": target_modules} if target_modules else {}))
    rss0 = rss_bytes()
    rss_high_water_reset()
    model = load_model(str(path), setup, device_map="cuda" if cuda else None)
    model.train()
    # as runtime/train.py prepares the model: the chunked loss, and adapter inputs kept 16-bit under autocast
    if run.loss == "chunked":
        from peftplan.runtime.loss import install

        assert install(model).enabled  # the estimate assumes the chunked loss
    if run.dtype != "float32":
        from peftplan.runtime.model import keep_adapter_inputs_16bit

        keep_adapter_inputs_16bit(model)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (run.batch, run.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if run.padded:
        mask = torch.ones_like(ids)
        mask[0, -run.seq // 4:] = 0  # one row padded by a quarter
        batch["attention_mask"] = mask
        batch["labels"][mask == 0] = -100
    if cuda:
        batch = {k: v.cuda() for k, v in batch.items()}
    opt = build_optimizer(run.optimizer, model.parameters(), lr=1e-4)
    autocast = run.dtype != "float32"
    device_type = "cuda" if cuda else "cpu"
    peak = 0
    for _ in range(steps):  # the last steps are steady state: optimizer state exists
        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            mode = None
        else:
            mode = LiveTensorBytes(model_tensors(model) + state)
        ctx = mode if mode is not None else _null()
        with ctx:
            for _micro in range(run.accumulation):  # as the Trainer accumulates: each loss / N, backward, one step
                with torch.autocast(device_type, dtype=getattr(torch, run.dtype), enabled=autocast):
                    out = model(**batch)
                loss = out.loss if run.accumulation == 1 else out.loss / run.accumulation
                del out
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        peak = torch.cuda.max_memory_allocated() if cuda else mode.peak
    result = {"measured_peak": int(peak), "rss_peak_delta": None, "measured_reserved": None}
    if cuda:
        result["measured_reserved"] = int(torch.cuda.max_memory_reserved())
        result["device"] = torch.cuda.get_device_name()
    else:
        hwm = rss_high_water_bytes()
        result["rss_peak_delta"] = (hwm - rss0) if (hwm and rss0) else None
        result["measured_static"] = int(mode.baseline)  # model tensors and optimizer state at the step's start
        result["device"] = "cpu"
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


METHODS = ("full", "lora", "qlora", "dora", "qdora")


# Tens of millions of parameters: weights, adapters, activations and logits are each clearly visible.
MEDIUM = {
    "llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8000),
    "qwen2": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8000),
    "gemma2": dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=128, vocab_size=8000, query_pre_attn_scalar=128),
    "phi3": dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8000),
    "gpt2": dict(n_embd=512, n_layer=8, n_head=8, vocab_size=8000),
    "phi": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, vocab_size=8000),
}


# A tiny Llama with Llama 3's 128,256-token vocabulary: at long sequences the loss dominates the step.
LONG_VOCAB = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128_256, tie_word_embeddings=False,
                  max_position_embeddings=8192)


# Measured after the constants of planner/assumptions.py were fitted (split "new", never fitted): what the other
# matrices leave out. A wide MLP (8 × hidden) at few tokens, where the de-quantized weight of the largest NF4 linear
# (2·h·i bytes) outweighs one layer's backward gradients (4·T·i bytes: h > 2T); QDoRA on the attention projections
# only, so DoRA's weight-norm buffers (attention-sized) stay below the MLP's de-quantized weight.
WIDE = dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Deeper models of a small width: 16 and 12 layers, where the per-layer terms add up over depth.
DEEP = {"llama": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=16, num_attention_heads=4,
                      num_key_value_heads=2),
        "gpt2": dict(n_embd=128, n_layer=12, n_head=4)}


def holdout_runs() -> list[Run]:
    runs = [Run("llama", m, gc=gc, accumulation=ga)  # gradient accumulation: gradients held through the forward
            for m in ("lora", "qlora", "full") for ga in (2, 4) for gc in (False, True)]
    runs += [Run("qwen2", m, batch=1, seq=256, gc=True, accumulation=2) for m in ("lora", "qlora", "full", "dora")]
    runs += [Run("llama", "full", batch=2, seq=256, gc=True, accumulation=4, rank=16, scale=MEDIUM["llama"]),
             Run("llama", "qlora", batch=1, seq=512, accumulation=2, rank=16, scale=MEDIUM["llama"])]
    for gc in (False, True):  # the de-quantized weight as the largest transient
        runs += [Run("llama", "qlora", batch=b, seq=s, gc=gc, scale=WIDE, size="wide") for b, s in ((1, 64), (2, 64))]
        runs.append(Run("llama", "qdora", batch=1, seq=64, gc=gc, scale=WIDE, size="wide", targets=ATTENTION))
    runs.append(Run("qwen2", "qlora", batch=1, seq=64, scale=WIDE, size="wide"))
    for fam, scale in DEEP.items():  # depth
        depth = scale.get("num_hidden_layers") or scale["n_layer"]
        runs += [Run(fam, m, gc=gc, scale=scale, size=f"deep{depth}") for m in METHODS for gc in (False, True)]
    return runs


def matrix(name: str) -> list[Run]:
    if name == "holdout":
        return holdout_runs()
    if name == "loss":  # the loss step at a 128k vocabulary, chunked (the default) and transformers' full loss
        return [Run("llama", m, batch=b, seq=s, gc=gc, loss=loss, scale=LONG_VOCAB)
                for m in ("lora", "qlora", "full") for b, s in ((1, 1024), (2, 2048)) for gc in (True, False)
                for loss in ("chunked", "full")]
    if name == "quick":
        return [Run("llama", m) for m in ("lora", "qlora", "dora")]
    if name == "medium":
        runs = []
        for fam, scale in MEDIUM.items():
            for m in METHODS:
                for gc in (False, True):
                    for b, s in ((2, 256), (1, 512)):
                        runs.append(Run(fam, m, batch=b, seq=s, gc=gc, rank=16, scale=scale))
        runs += [Run("llama", "lora", batch=1, seq=256, attention="eager", rank=16, scale=MEDIUM["llama"]),
                 Run("llama", "lora", batch=2, seq=256, dropout=0.1, rank=16, scale=MEDIUM["llama"]),
                 Run("llama", "qlora", batch=2, seq=256, dropout=0.1, gc=True, rank=16, scale=MEDIUM["llama"]),
                 Run("qwen2", "lora", batch=2, seq=256, padded=True, rank=16, scale=MEDIUM["qwen2"]),
                 Run("llama", "full", batch=2, seq=256, optimizer="adamw_8bit", gc=True, rank=16,
                     scale=MEDIUM["llama"])]
        return runs
    runs: list[Run] = []
    for fam in FAMILIES:
        for m in METHODS:
            for gc in (False, True):
                for b, s in ((2, 128), (1, 384)):
                    runs.append(Run(fam, m, batch=b, seq=s, gc=gc))
    runs += [Run("llama", "lora", attention="eager"), Run("qwen2", "qlora", attention="eager", gc=True),
             Run("llama", "lora", dropout=0.1), Run("llama", "qlora", dropout=0.1, gc=True),
             Run("qwen2", "lora", padded=True), Run("llama", "lora", optimizer="adamw_8bit"),
             Run("llama", "full", optimizer="adamw_8bit", gc=True)]
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", default="quick", choices=("quick", "full", "medium", "loss", "holdout"))
    ap.add_argument("--family", action="append", help="only these families")
    ap.add_argument("--method", action="append", help="only these methods")
    ap.add_argument("--out", default="benchmarks/results/calibration.csv")
    ap.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "peftplan-calibration-models"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the missing ones")
    ap.add_argument("--repredict", action="store_true",
                    help="measure nothing: refresh the prediction columns of --out with the current estimator")
    args = ap.parse_args(argv)
    if args.repredict:
        print(repredict(Path(args.out), lambda row: predict(run_of(row), row.get("device") or None)))
        return 0
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    runs = [r for r in matrix(args.matrix)
            if (not args.family or r.family in args.family) and (not args.method or r.method in args.method)]
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out.exists():
        with out.open() as fh:
            rows = list(csv.DictReader(fh))
        done = {r["run"] for r in rows}
        runs = [r for r in runs if r.key() not in done]
    new = args.matrix == "holdout"
    measure_all(runs, predict, measure, root, out, rows, split=lambda run: "new" if new else split_of(run.key()))
    return 0


def measure_all(runs: list, predict_run, measure_run, root: Path, out: Path, rows: list[dict],
                extra=lambda run: {}, split=None) -> None:
    """Measure each run, next to its prediction, appending to `rows` and rewriting `out` after every run (an
    interrupted matrix continues with --resume). `extra(run)`: more columns for the row; `split(run)`: its split
    (fit | held-out | new; the dense tables)."""
    ver = versions()
    for n, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        row = {"run": run.key(), **({"split": split(run)} if split else {}), "family": run.family,
               "method": run.method, "batch": run.batch, "seq": run.seq, "gradient_checkpointing": run.gc,
               "lora_dropout": run.dropout, "attention": run.attention, "padded": run.padded,
               "optimizer": run.optimizer, "rank": run.rank, "dtype": run.dtype, "loss": run.loss,
               **({"accumulation": run.accumulation} if run.accumulation > 1 or split else {}),
               **({"targets": " ".join(run.targets)} if run.targets else {}), **extra(run),
               "config": json.dumps(run.config(), sort_keys=True)}
        row.update(predict_run(run))
        row.update(measure_run(run, root))
        row["error"] = (row["predicted_peak"] - row["measured_peak"]) / row["measured_peak"]
        row.update(ver)
        rows.append(row)
        print(f"[{n}/{len(runs)}] {run.key():60s} measured {row['measured_peak'] / 2**20:8.2f} MiB  "
              f"predicted {row['predicted_peak'] / 2**20:8.2f} MiB  error {row['error']:+6.1%}  "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        write_rows(out, rows)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write the CSV whole, through a temporary file, so an interruption never leaves half a table."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
