"""Calibration of the estimator on tiny mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE) on the CPU.

    python benchmarks/calibrate_moe.py --out benchmarks/results/calibration-cpu-moe.csv

The same measurement as benchmarks/calibrate.py (real training steps through runtime.model.load_model, peak
live tensor bytes by runtime.memprobe.LiveTensorBytes over model tensors and optimizer state) and the same
Setup mapping (calibrate.setup_of: alpha = 2r, no accumulation); the shapes come from planner.shapes_moe and
the adapters target the attention projections by name, which is what "all-linear" means for these models
(runtime/moe.py adapter_targets; peft would otherwise turn "all-linear" into target_parameters on experts).

`predicted_peak` is the estimator as it is, with the NF4-experts hooks (one expert's backward width, DoRA's norm
buffers freed before the recompute peak) that planner/methods/nf4.py gives planner.memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=2048),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=704, moe_intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                      num_experts=8, num_experts_per_tok=2, vocab_size=1200, tie_word_embeddings=False,
                      max_position_embeddings=2048),
    "olmoe": dict(model_type="olmoe", hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
                  vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=2048),
}
METHODS = ("qlora", "qdora", "lora", "full")


@dataclass
class MoERun(calibrate.Run):
    def config(self) -> dict:
        return {**FAMILIES[self.family], **self.scale}


def setup_of(run: MoERun, device_kind: str):
    """calibrate.setup_of with the MoE shape builder and the attention projections as adapter targets."""
    from peftplan.planner.shapes_moe import build

    dense = calibrate.Run("llama", run.method, run.batch, run.seq, run.gc, run.dropout, run.attention, run.padded,
                          run.optimizer, run.rank, run.dtype)
    base = calibrate.setup_of(dense, device_kind)  # the same geometry, adapter, optimizer and dtype mapping
    cfg = run.config()
    return replace(base, shape=build(cfg, cfg["model_type"]), adapter=replace(base.adapter, target_modules=ATTENTION))


def predict(run: MoERun) -> dict:
    from peftplan.planner import estimate

    est = estimate(run.method, setup_of(run, "cpu"))
    return {"predicted_peak": est.peak_allocated_bytes, "predicted_phase": est.phase,
            **{f"pred_{k}": v for k, v in est.components().items()}}


def measure(run: MoERun, root: Path) -> dict:
    """calibrate.measure with the attention projections as the adapter's targets."""
    return calibrate.measure(run, root, target_modules=list(ATTENTION))


def matrix(name: str) -> list[MoERun]:
    if name == "quick":
        return [MoERun(f, m, gc=True) for f in FAMILIES for m in ("qlora", "qdora")]
    return [MoERun(f, m, batch=b, seq=s, gc=gc) for f in FAMILIES for m in METHODS for gc in (False, True)
            for b, s in ((2, 128), (1, 384))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", default="full", choices=("quick", "full"))
    ap.add_argument("--family", action="append", help="only these families")
    ap.add_argument("--method", action="append", help="only these methods")
    ap.add_argument("--out", default="benchmarks/results/calibration-cpu-moe.csv")
    ap.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "peftplan-calibration-moe"))
    ap.add_argument("--repredict", action="store_true",
                    help="measure nothing: refresh the prediction columns of --out with the current estimator")
    args = ap.parse_args(argv)
    if args.repredict:
        print(calibrate.repredict(Path(args.out), lambda row: predict(calibrate.run_of(row, MoERun))))
        return 0
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    runs = [r for r in matrix(args.matrix)
            if (not args.family or r.family in args.family) and (not args.method or r.method in args.method)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    calibrate.measure_all(runs, predict, measure, root, out, [], extra=lambda run: {"targets": " ".join(ATTENTION)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
