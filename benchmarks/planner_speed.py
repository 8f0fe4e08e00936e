"""Planner speed: the cold `peftplan plan --json` process, and planning 100 catalog specs in one process.

    python benchmarks/planner_speed.py [--repeat 15] [--loop-repeat 3] [--out benchmarks/results/planner_speed.json]

1. Cold start: `peftplan plan examples/llama3-8b-lora-a100.toml --json` (the installed console script) and a
   bare `python -c "import pydantic, rich"` run as fresh processes, alternately, --repeat times each (after
   one warm-up run of each for the page cache); the ratio of the medians is reported. Both are measured twice,
   interleaved: with the environment as it is, and with a bytecode cache for peftplan's own modules (a
   temporary PYTHONPYCACHEPREFIX) in case the environment sets PYTHONDONTWRITEBYTECODE (see the JSON).
2. 100 specs: 100 spec dicts crossing every catalog model (`catalog.models()`), the catalog devices
   (`catalog.devices()`), seq_len 512..8192 and num_examples 1k..200k (method and everything else left to
   the planner), each planned with `plan_spec(spec_from_dict(d))`; `NothingFits` counts as a planned answer.
   The loop runs in a fresh process (imports timed separately, catalogs loaded lazily inside the loop as
   they are in the CLI) --loop-repeat times; the total and the median per spec are reported as medians.
   One more fresh process runs the same loop under cProfile; the top 10 functions by cumulative time (and by
   own time) go into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ_LENS = (512, 1024, 2048, 4096, 8192)
NUM_EXAMPLES = (1_000, 10_000, 50_000, 200_000)


def spec_dicts(n: int = 100) -> list[dict]:
    from peftplan.planner import catalog

    models, devices = catalog.models(), catalog.devices()
    out = []
    for i in range(n):
        out.append({
            "model": {"name": models[i % len(models)].id},
            "hardware": {"gpu": devices[(i * 7) % len(devices)].id},
            "data": {"seq_len": SEQ_LENS[(i // 3) % len(SEQ_LENS)], "num_examples": NUM_EXAMPLES[(i // 2) % 4]},
        })
    return out


def plan_all(specs: list[dict]) -> tuple[list[float], dict]:
    from peftplan.planner.choose import NothingFits, plan_spec
    from peftplan.schemas import spec_from_dict

    times, outcomes = [], {}
    for d in specs:
        t0 = time.perf_counter()
        try:
            result = plan_spec(spec_from_dict(d))
            key = f"planned:{result.chosen.method}" if getattr(result, "chosen", None) is not None else "planned"
        except NothingFits:
            key = "nothing_fits"
        except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
            key = f"error:{type(exc).__name__}"
        times.append(time.perf_counter() - t0)
        outcomes[key] = outcomes.get(key, 0) + 1
    return times, outcomes


def child(mode: str) -> int:
    """Runs in a fresh process: import, build the 100 specs, plan them (timed, or under cProfile)."""
    t0 = time.perf_counter()
    import peftplan.planner.choose  # noqa: F401
    import peftplan.schemas  # noqa: F401

    import_s = time.perf_counter() - t0
    specs = spec_dicts(100)  # touches catalog.models()/devices(); the loop's catalog lookups are still cold
    if mode == "timed":
        t0 = time.perf_counter()
        times, outcomes = plan_all(specs)
        total = time.perf_counter() - t0
        print(json.dumps({"import_s": import_s, "total_s": total, "times": times, "outcomes": outcomes}))
        return 0
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    times, outcomes = plan_all(specs)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())

    def short(path: str) -> str:
        for prefix in (str(ROOT) + os.sep, *(p + os.sep for p in sys.path if p.endswith("site-packages"))):
            if path.startswith(prefix):
                return path[len(prefix):]
        return path

    rows = []
    for (path, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        if func in ("plan_all", "<module>") or path == "~" and "exec" in func or "cProfile" in path:
            continue
        rows.append({"function": f"{short(path)}:{line}({func})" if path != "~" else func,
                     "ncalls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    top_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)[:10]
    top_own = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:10]
    print(json.dumps({"profiled_total_s": sum(times), "top_cumulative": top_cum, "top_own_time": top_own,
                      "outcomes": outcomes}))
    return 0


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def run_child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="cold-start runs of each command (≥ 10)")
    ap.add_argument("--loop-repeat", type=int, default=3, help="fresh processes planning the 100 specs")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "llama3-8b-lora-a100.toml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_speed.json"))
    ap.add_argument("--child", choices=("timed", "profile"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    script = Path(sys.executable).with_name("peftplan")
    plan_cmd = ([str(script)] if script.exists() else [sys.executable, "-m", "peftplan"]) + \
        ["plan", args.spec, "--json"]
    baseline = [sys.executable, "-c", "import pydantic, rich"]
    # Two interpreter settings, alternated within each repeat. "as_is": this environment as it is; where it sets
    # PYTHONDONTWRITEBYTECODE=1 (as this sandbox does), peftplan's own modules (an editable install from the
    # repository) are compiled from source on every start, while pydantic and rich load their installed .pyc.
    # "bytecode": a bytecode cache in a temporary PYTHONPYCACHEPREFIX, as an installed wheel would have.
    import tempfile

    cache = tempfile.mkdtemp(prefix="peftplan-pyc-")
    settings = {"as_is": dict(os.environ),
                "bytecode": {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                             "PYTHONPYCACHEPREFIX": cache}}
    cmds = {"baseline": baseline, "plan": plan_cmd}
    times: dict[str, dict[str, list[float]]] = {e: {c: [] for c in cmds} for e in settings}
    for _e, env in settings.items():  # warm the page cache (and fill the bytecode cache)
        for cmd in cmds.values():
            timed(cmd, env)
    for i in range(args.repeat):
        order = [(e, c) for e in settings for c in cmds]
        for e, c in (order if i % 2 == 0 else order[::-1]):
            times[e][c].append(timed(cmds[c], settings[e]))
    shutil.rmtree(cache, ignore_errors=True)
    base_t, plan_t = times["as_is"]["baseline"], times["as_is"]["plan"]

    loops = []
    for _ in range(args.loop_repeat):
        loops.append(run_child("timed"))
    profile = run_child("profile")
    per_spec = [statistics.median(x["times"]) for x in loops]
    result = {
        "cold_start": {
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(plan_cmd)),
            "baseline": 'python -c "import pydantic, rich"',
            "plan_median_s": statistics.median(plan_t),
            "baseline_median_s": statistics.median(base_t),
            "ratio": statistics.median(plan_t) / statistics.median(base_t),
            "plan_s": plan_t,
            "baseline_s": base_t,
            "repeat": args.repeat,
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "with_bytecode_cache": {
                "plan_median_s": statistics.median(times["bytecode"]["plan"]),
                "baseline_median_s": statistics.median(times["bytecode"]["baseline"]),
                "ratio": (statistics.median(times["bytecode"]["plan"])
                          / statistics.median(times["bytecode"]["baseline"])),
                "plan_s": times["bytecode"]["plan"],
                "baseline_s": times["bytecode"]["baseline"],
            },
        },
        "plan_100_specs": {
            "specs": 100,
            "axes": {"models": "all catalog models", "devices": "catalog devices", "seq_len": list(SEQ_LENS),
                     "num_examples": list(NUM_EXAMPLES)},
            "total_s_median": statistics.median(x["total_s"] for x in loops),
            "total_s": [x["total_s"] for x in loops],
            "per_spec_median_s": statistics.median(per_spec),
            "per_spec_max_s": max(max(x["times"]) for x in loops),
            "first_spec_s": statistics.median(x["times"][0] for x in loops),
            "import_s_median": statistics.median(x["import_s"] for x in loops),
            "outcomes": loops[0]["outcomes"],
            "loop_repeat": args.loop_repeat,
        },
        "profile_100_specs": profile,
        "python": sys.version.split()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    c, p = result["cold_start"], result["plan_100_specs"]
    print(f"python -c 'import pydantic, rich':  {c['baseline_median_s'] * 1000:.0f} ms (median of {args.repeat})")
    print(f"{c['command']}:  {c['plan_median_s'] * 1000:.0f} ms  -> ratio {c['ratio']:.2f}x")
    bc = c["with_bytecode_cache"]
    print(f"  with a bytecode cache for peftplan's modules: {bc['plan_median_s'] * 1000:.0f} ms vs "
          f"{bc['baseline_median_s'] * 1000:.0f} ms -> ratio {bc['ratio']:.2f}x "
          f"(PYTHONDONTWRITEBYTECODE={c['PYTHONDONTWRITEBYTECODE']} here)")
    print(f"plan 100 catalog specs in one process: {p['total_s_median']:.2f} s total (median of {args.loop_repeat} "
          f"processes), {p['per_spec_median_s'] * 1000:.1f} ms per spec (median), first spec "
          f"{p['first_spec_s'] * 1000:.0f} ms, imports {p['import_s_median'] * 1000:.0f} ms; outcomes {p['outcomes']}")
    print("top 10 by cumulative time under cProfile (profiled loop "
          f"{profile['profiled_total_s']:.2f} s):")
    for r in profile["top_cumulative"]:
        print(f"  {r['cumtime_s']:7.3f} s cum  {r['tottime_s']:7.3f} s own  {r['ncalls']:>7}  {r['function']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
