"""Cold-start time of `peftplan plan --json` (or `estimate`) against a bare `python -c "import pydantic, rich"`.

    python benchmarks/cold_start.py [--command plan|estimate] [--repeat 15] [--out benchmarks/results/cold_start.json]

Both commands run as fresh processes, alternately, in the same session (the machine is noisy); the
report gives each median and the ratio. Target: the command within 2x of the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--command", choices=("plan", "estimate"), default="plan")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "llama3-8b-lora-a100.toml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cold_start.json"))
    args = ap.parse_args(argv)
    baseline = [sys.executable, "-c", "import pydantic, rich"]
    estimate = [sys.executable, "-m", "peftplan", args.command, args.spec, "--json"]
    timed(baseline), timed(estimate)  # warm the page cache
    base_t, est_t = [], []
    for _ in range(args.repeat):
        base_t.append(timed(baseline))
        est_t.append(timed(estimate))
    result = {
        "baseline_median_s": statistics.median(base_t),
        "command": args.command,
        "estimate_median_s": statistics.median(est_t),
        "ratio": statistics.median(est_t) / statistics.median(base_t),
        "repeat": args.repeat,
        "python": sys.version.split()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"python -c 'import pydantic, rich': {result['baseline_median_s'] * 1000:.0f} ms (median of {args.repeat})")
    print(f"peftplan {args.command} --json:          {result['estimate_median_s'] * 1000:.0f} ms")
    print(f"ratio: {result['ratio']:.2f}x (target ≤ 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
