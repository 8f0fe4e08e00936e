"""The run's loss curve as a PNG, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    steps, losses, evals = [], [], []
    try:
        lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "eval_loss" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
