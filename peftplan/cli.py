"""The `peftplan` command line. It only wires schemas → planner → templates → runtime, and is the one
place where exceptions become exit codes: 0 ok, 2 bad input, 3 nothing fits, 1 anything else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__

# pydantic scans installed packages' entry points for plugins on first validation (~50 ms of
# importlib.metadata); peftplan uses none. Respect an explicit setting.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_NOFIT = 0, 1, 2, 3


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 132  # pipes and CI logs: wide enough for the breakdown bars
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def _load(path: str):
    from .schemas import load_spec

    return load_spec(path)


def cmd_validate(args) -> int:
    from .planner.report import estimate_spec

    spec = _load(args.spec)
    report = estimate_spec(spec, base_dir=Path(args.spec).resolve().parent)
    for p in report.resolved.warnings:
        print(p.render(args.spec), file=sys.stderr)
    print(f"{args.spec}: ok ({report.model.name} on {report.hardware.device.id})")
    return EXIT_OK


def cmd_estimate(args) -> int:
    from .planner.report import estimate_spec, render

    spec = _load(args.spec)
    report = estimate_spec(spec, base_dir=Path(args.spec).resolve().parent)
    if args.exact:
        report = _exact(report, quiet=args.json)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report, _console(), explain=args.explain)
    return EXIT_OK


def cmd_plan(args) -> int:
    from .planner.choose import NothingFits, plan_spec
    from .planner.plan_report import plan_json, render_plan

    spec = _load(args.spec)
    try:
        result = plan_spec(spec, base_dir=Path(args.spec).resolve().parent)
        code = EXIT_OK
    except NothingFits as exc:
        result, code = exc.plan, EXIT_NOFIT
        print(f"{args.spec}: {exc}", file=sys.stderr)
        for line in result.suggestions:
            print(f"  would fit: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(plan_json(result), indent=2))
    else:
        render_plan(result, _console())
    return code


def _exact(report, quiet: bool):
    """Replace the closed-form estimates by traced ones (runtime.exact, needs the [train] extra)."""
    from dataclasses import replace

    try:
        from .runtime.exact import trace
    except ImportError as exc:
        raise RuntimeError(f"--exact needs the training stack: pip install -e '.[train]' ({exc})") from None
    from .planner.exact import exact_estimate
    from .planner.memory import estimate

    s = report.resolved.setup
    s = replace(s, geometry=replace(s.geometry, padded=False))  # the trace runs an unpadded batch
    out = {}
    for method in report.estimates:
        if not quiet:
            print(f"tracing {method} on fake tensors …", file=sys.stderr, flush=True)
        traced = trace(report.model.config, method=method, dtype=s.dtype, attention=s.geometry.attention,
                       gradient_checkpointing=s.geometry.gradient_checkpointing, rank=s.adapter.rank,
                       alpha=s.adapter.alpha, dropout=s.adapter.dropout,
                       target_modules=(list(s.adapter.target_modules) if isinstance(s.adapter.target_modules, tuple)
                                       else s.adapter.target_modules),
                       batch=s.geometry.micro_batch_size, seq=s.geometry.seq_len)
        est = exact_estimate(method, s, traced)
        closed = estimate(method, s)
        out[method] = est
        note = (f"exact {method}: traced in {traced['seconds']:.1f} s; closed form "
                f"{closed.peak_allocated_bytes / 2**30:.2f} GiB vs traced {est.peak_allocated_bytes / 2**30:.2f} GiB "
                f"({(closed.peak_allocated_bytes - est.peak_allocated_bytes) / est.peak_allocated_bytes:+.1%})")
        report = replace(report, resolved=replace(report.resolved, notes=report.resolved.notes + (note,)))
    extra = ("exact mode: one forward+backward traced on fake tensors with PyTorch's CPU kernels (unpadded batch);"
             " bitsandbytes 4-bit storage and optimizer state added analytically",)
    if report.devices > 1:
        extra += (f"exact mode traces one device without sharding: these are single-device numbers, not per device "
                  f"over {report.devices}; the closed form (without --exact) gives the per-device ones",)
    return replace(report, estimates=out, parallelism={m: "single" for m in out},
                   resolved=replace(report.resolved, notes=report.resolved.notes + extra))


def cmd_schema(args) -> int:
    from .schemas import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_models(args) -> int:
    from .planner import catalog
    from .planner.shapes import shape_from_config

    rows = []
    for m in catalog.models():
        sh = shape_from_config(m.config)
        rows.append({"id": m.id, "model_type": sh.model_type, "parameters": sh.parameters,
                     "layers": sh.num_layers, "hidden": sh.hidden_size, "vocab": sh.vocab_size,
                     "max_positions": sh.max_positions, "source": m.source})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    from rich.table import Table

    t = Table(title=f"{len(rows)} models (any local config.json works too)", title_justify="left")
    for col in ("id", "type", "params", "layers", "hidden", "vocab", "max pos"):
        t.add_column(col, justify="left" if col in ("id", "type") else "right")
    for r in rows:
        t.add_row(r["id"], r["model_type"], f"{r['parameters'] / 1e9:.2f}B", str(r["layers"]), str(r["hidden"]),
                  str(r["vocab"]), str(r["max_positions"] or "?"))
    _console().print(t)
    return EXIT_OK


def cmd_gpus(args) -> int:
    from .planner import catalog

    devs = catalog.devices()
    if args.json:
        print(json.dumps([{"id": d.id, "name": d.name, "memory_bytes": d.memory_bytes, "bf16": d.bf16,
                           "bf16_tflops": d.bf16_tflops, "fp16_tflops": d.fp16_tflops,
                           "memory_bandwidth_gbps": d.memory_bandwidth_gbps,
                           "price_usd_per_hour": d.price_usd_per_hour, "price_date": d.price_date,
                           "source": d.source} for d in devs], indent=2))
        return EXIT_OK
    from rich.table import Table

    t = Table(title=f"{len(devs)} devices (plus `cpu`)", title_justify="left")
    for col in ("id", "name", "GiB", "bf16", "bf16 TFLOPS", "fp16 TFLOPS", "GB/s", "$/h", "price date"):
        t.add_column(col, justify="left" if col in ("id", "name") else "right")
    for d in devs:
        t.add_row(d.id, d.name, f"{d.memory_bytes / 2**30:.1f}", "yes" if d.bf16 else "no", f"{d.bf16_tflops:g}",
                  f"{d.fp16_tflops:g}", f"{d.memory_bandwidth_gbps:g}",
                  f"{d.price_usd_per_hour:.2f}" if d.price_usd_per_hour is not None else "?", d.price_date or "")
    _console().print(t)
    return EXIT_OK


def cmd_generate(args) -> int:
    from .planner.choose import NothingFits, plan_spec
    from .planner.project import GenerateError, generate

    spec = _load(args.spec)
    spec_path = Path(args.spec).resolve()
    try:
        result = plan_spec(spec, base_dir=spec_path.parent)
    except NothingFits as exc:
        print(f"{args.spec}: {exc}", file=sys.stderr)
        for line in exc.plan.suggestions:
            print(f"  would fit: {line}", file=sys.stderr)
        return EXIT_NOFIT
    out = Path(args.output)
    try:
        written = generate(result, spec, spec_path, out, force=args.force)
    except GenerateError as exc:
        print(f"peftplan generate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    from .planner.project import f_sh

    c = result.chosen
    where = f_sh(out.expanduser().resolve())
    print(f"wrote {len(written)} files to {where}: {c.method} on {result.report.hardware.device.id}, "
          f"micro-batch {c.micro_batch}, predicted {c.needed_bytes / 2**30:.1f} GiB per device")
    print(f"next: peftplan run {where}   (or: cd {where} && ./run.sh)")
    return EXIT_OK


def _project(path: str) -> Path:
    from .schemas import Problem, SpecError

    d = Path(path)
    if not (d / "plan.toml").is_file() or not (d / "train.py").is_file():
        raise SpecError([Problem("", f"{d} is not a generated project (no plan.toml / train.py); "
                                     "create one with: peftplan generate SPEC -o DIR")])
    return d


def cmd_run(args) -> int:
    import subprocess
    import tomllib

    d = _project(args.dir)
    extra = []
    if args.max_steps is not None:
        extra += ["--max-steps", str(args.max_steps)]
    if args.resume:
        extra.append("--resume")
    launch = tomllib.loads((d / "plan.toml").read_text()).get("launch", {})
    processes = int(launch.get("devices_per_node", 1)) * int(launch.get("nodes", 1))
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
               "train.py", *extra]
    else:
        cmd = [sys.executable, "train.py", *extra]
    return subprocess.call(cmd, cwd=d)


def cmd_merge(args) -> int:
    import subprocess

    d = _project(args.dir)
    cmd = [sys.executable, "merge.py"] + (["-o", str(Path(args.output).resolve())] if args.output else [])
    return subprocess.call(cmd, cwd=d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftplan", description="Will it fit, which method, how long — before you rent a GPU.")
    p.add_argument("--version", action="version", version=f"peftplan {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("estimate", help="per-method memory breakdown for the spec's geometry, no choice made")
    s.add_argument("spec")
    s.add_argument("--json", action="store_true", help="machine-readable output (CONTRACT.md)")
    s.add_argument("--explain", action="store_true", help="show every term of each method's peak with its formula")
    s.add_argument("--exact", action="store_true",
                   help="trace one training step on fake tensors instead of the closed form (needs the [train] extra)")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("plan", help="choose a method and settings that fit, with reasons, time and cost")
    s.add_argument("spec")
    s.add_argument("--json", action="store_true", help="machine-readable output (CONTRACT.md)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("validate", help="check a spec, report every problem at once")
    s.add_argument("spec")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the spec's JSON Schema")
    s.set_defaults(func=cmd_schema)

    for name, func, helptext in (("models", cmd_models, "list the bundled model catalog"),
                                 ("gpus", cmd_gpus, "list the bundled hardware catalog")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)

    s = sub.add_parser("generate", help="compile the plan into a standalone training project")
    s.add_argument("spec")
    s.add_argument("-o", "--output", required=True, help="project directory to create")
    s.add_argument("--force", action="store_true", help="regenerate into an existing directory (keeps your files)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("run", help="execute a generated project with its bundled runtime")
    s.add_argument("dir")
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("merge", help="merge a trained adapter into a 16-bit copy of the base")
    s.add_argument("dir")
    s.add_argument("-o", "--output", default=None)
    s.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    from .schemas import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        spec_path = getattr(args, "spec", None)
        if exc.path is None and spec_path and Path(spec_path).is_file():
            from .schemas import locate

            exc = locate(exc.problems, spec_path)
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # the one place that turns the unexpected into an exit code
        if os.environ.get("PEFTPLAN_DEBUG"):
            raise
        print(f"peftplan: internal error: {type(exc).__name__}: {exc} (set PEFTPLAN_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR
