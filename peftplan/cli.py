"""The `peftplan` command line. It only wires schemas → planner → templates → runtime, and is the one
place where exceptions become exit codes: 0 ok, 2 bad input, 3 nothing fits, 1 anything else."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from .console import emit

# pydantic scans installed packages' entry points for plugins on first validation (~50 ms of
# importlib.metadata); peftplan uses none. Respect an explicit setting.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_NOFIT = 0, 1, 2, 3
PROBE_VERDICTS = (5, 6)  # `run --probe`: the step does not fit / fits within the headroom (runtime/probe.py)


def _console(stderr: bool = False):
    from .console import make_console

    return make_console(stderr)


def _load(path: str):
    from .schemas import load_spec

    return load_spec(path)


def _with_data(spec, spec_path: str):
    """Check the spec's data files before anything is planned or written; problems are exit 2, one line each
    (the data file and line, under the spec's data.path key). Returns the spec with counts filled from the data
    and the check, whose summary lines the command prints once it succeeds."""
    from .datacheck import check_data
    from .schemas import Problem, SpecError

    check = check_data(spec, Path(spec_path).resolve())
    if not check.ok:
        problems = [Problem("data.path", line) for f in check.summary.files for line in f.problems]
        hidden = check.summary.problem_count - len(problems)
        if hidden > 0:
            problems.append(Problem("data.path", f"… and {hidden:,} more problems in the data"))
        raise SpecError(problems)
    check.warnings = [f"{spec_path}: warning: {w}" for w in check.warnings]
    return check.spec, check


def _show_data(check, stream) -> None:
    """What the data check found, once the command succeeded (an error shows only its own lines)."""
    for line in check.lines:
        emit(line, stream)
    for w in check.warnings:
        emit(w, sys.stderr)


def cmd_validate(args) -> int:
    from .planner.report import estimate_spec

    spec, check = _with_data(_load(args.spec), args.spec)
    report = estimate_spec(spec, base_dir=Path(args.spec).resolve().parent)
    for p in report.resolved.warnings:
        emit(p.render(args.spec), sys.stderr)
    _show_data(check, sys.stdout)
    emit(f"{args.spec}: ok ({report.model.name} on {report.hardware.device.id})")
    return EXIT_OK


def cmd_estimate(args) -> int:
    from .planner.report import estimate_spec, render

    spec = _load(args.spec)
    store = None if args.no_local_calibration or args.exact else _local_calibration()
    report = estimate_spec(spec, base_dir=Path(args.spec).resolve().parent, calibration=store)
    if args.exact or report.model.described:  # traced: the ratios were measured against the closed form
        report = replace(_exact(report, quiet=args.json, automatic=not args.exact), corrections={})
        store = None
    if args.json:
        out = report.to_json()
        if store is not None:
            out["local_calibration"] = _calibration_json(report.corrections, store)
        print(json.dumps(out, indent=2))
    else:
        render(report, _console(), explain=args.explain)
        _say_calibration(report.corrections, store)
    return EXIT_NOFIT if report.nothing_fits else EXIT_OK  # the table still prints: what would need how much


def _local_calibration():
    """The user's local calibration (planner/local_calibration.py); a file it cannot use is a warning."""
    from .planner.local_calibration import load

    store = load()
    for w in store.warnings:
        emit(f"warning: local calibration: {w}", sys.stderr)
    return store


def _calibration_json(corrections: dict, store) -> dict:
    from .planner.local_correction import as_json

    return as_json(list(corrections.values()), store)


def _say_calibration(corrections: dict, store) -> None:
    """One line per correction the estimate or plan applied."""
    if store is not None:
        from .planner.local_correction import summary

        for line in summary(list(corrections.values()), store):
            emit(line, sys.stdout)


def cmd_plan(args) -> int:
    from .planner.choose import NothingFits, plan_spec
    from .planner.plan_report import plan_json, render_plan

    spec, check = _with_data(_load(args.spec), args.spec)
    store = None if args.no_local_calibration else _local_calibration()
    try:
        result = plan_spec(spec, base_dir=Path(args.spec).resolve().parent, lengths=check.lengths, calibration=store)
        code = EXIT_OK
    except NothingFits as exc:
        result, code = exc.plan, EXIT_NOFIT
        emit(f"{args.spec}: {exc}", sys.stderr)
        for line in result.suggestions:
            emit(f"  {'would fit' if result.suggestions_for == 'memory' else 'would meet it'}: {line}", sys.stderr)
    _show_data(check, sys.stderr)
    if args.json:
        out = plan_json(result)
        if check.summary is not None:
            out["data"] = check.summary.as_dict()
        if store is not None:
            out["local_calibration"] = _calibration_json(result.report.corrections, store)
        print(json.dumps(out, indent=2))
    else:
        render_plan(result, _console())
        _say_calibration(result.report.corrections, store)
    return code


def _exact(report, quiet: bool, automatic: bool = False):
    """Replace the closed-form estimates by traced ones (runtime.exact, needs the [train] extra). `automatic`: the
    closed form does not know the architecture, so the trace is the estimate (planner/exact.py says so)."""
    from .planner.exact import trace_estimates

    try:
        from .runtime.exact import trace
    except ImportError as exc:
        from .schemas import Problem, SpecError

        raise SpecError([Problem("model.name", f"tracing a training step needs the training stack: pip install "
                                               f"'peftplan[train]' ({exc})")]) from None

    def progress(method: str) -> None:
        if not quiet:
            emit(f"tracing {method} on fake tensors …", sys.stderr)

    return trace_estimates(report, trace, progress=progress, automatic=automatic)


def _describer(config: dict) -> dict:
    """Any architecture's shape, from the model built on the meta device (runtime.exact.describe; ImportError
    without the training stack, which planner/resolve.py turns into what to install)."""
    from .runtime.exact import describe

    return describe(config)


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


def cmd_import(args) -> int:
    """An axolotl / LLaMA-Factory config as a spec (planner/imports): to stdout, or to -o without replacing a file."""
    from . import __version__
    from .planner.imports import import_config, summary, to_toml, write_spec

    out = Path(os.path.abspath(os.path.expanduser(args.output))) if args.output else None
    result = import_config(args.config, gpu=args.gpu, count=args.count, model=args.model,
                           out_dir=out.parent if out is not None else Path.cwd())
    text = to_toml(result, args.config, __version__)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            write_spec(out, text, force=args.force)
        except OSError as exc:
            emit(f"peftplan import: cannot write {out}: {exc.strerror or exc}", sys.stderr)
            return EXIT_ERROR
    for line in summary(result, args.config):
        emit(line, sys.stderr)
    if out is not None:
        emit(f"wrote {out}; next: peftplan estimate {out} (plan and generate work on it as on any spec)", sys.stderr)
    return EXIT_OK


def cmd_generate(args) -> int:
    from .planner.choose import NothingFits, plan_spec
    from .planner.project import ConflictError, GenerateError, f_sh, generate

    spec, check = _with_data(_load(args.spec), args.spec)
    spec_path = Path(args.spec).resolve()
    out = Path(os.path.abspath(os.path.expanduser(args.output)))
    _require_utf8({"the spec's path": spec_path, "-o": out, "data.path": spec.data.path})
    try:
        store = None if args.no_local_calibration else _local_calibration()
        result = plan_spec(spec, base_dir=spec_path.parent, lengths=check.lengths, calibration=store)
    except NothingFits as exc:
        emit(f"{args.spec}: {exc}", sys.stderr)
        for line in exc.plan.suggestions:
            emit(f"  {'would fit' if exc.plan.suggestions_for == 'memory' else 'would meet it'}: {line}", sys.stderr)
        return EXIT_NOFIT
    try:
        written = generate(result, spec, spec_path, out, force=args.force)
    except ConflictError as exc:
        emit(f"peftplan generate: {exc}", sys.stderr)
        return EXIT_INPUT
    except GenerateError as exc:
        emit(f"peftplan generate: {exc}", sys.stderr)
        return EXIT_ERROR
    _show_data(check, sys.stderr)
    c = result.chosen
    real = out.resolve()
    where = f_sh(real) + (f" (through the link {f_sh(out)})" if real != out else "")
    emit(f"wrote {len(written)} files to {where}: {c.method} on {result.report.hardware.device.id}, "
         f"micro-batch {c.micro_batch}, predicted {c.needed_bytes / 2**30:.1f} GiB per device")
    emit(f"next: peftplan run {f_sh(real)}   (or: cd {f_sh(real)} && ./run.sh)")
    return EXIT_OK


def _require_utf8(paths: dict) -> None:
    """plan.toml, the README and run.sh record these paths as text: a name that is not valid UTF-8 (bytes
    Python keeps as surrogates) cannot be written there faithfully, so it is refused before anything is written."""
    from .schemas import Problem, SpecError

    bad = []
    for key, value in paths.items():
        if value is None:
            continue
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            bad.append(Problem(key if key.startswith(("data.", "model.")) else "",
                               f"{key} {str(value).encode('utf-8', 'surrogateescape')!r} contains bytes that are "
                               "not valid UTF-8; the generated files could not name it: rename it"))
    if bad:
        raise SpecError(bad)


def _project(path: str) -> Path:
    """A generated project folder, with its plan file checked by the runtime's own validation."""
    from .runtime.config import ConfigError, load_config
    from .schemas import Problem, SpecError

    d = Path(path)
    if not (d / "plan.toml").is_file() or not (d / "train.py").is_file():
        raise SpecError([Problem("", f"{d} is not a generated project (no plan.toml / train.py); "
                                     "create one with: peftplan generate SPEC -o DIR")])
    try:
        load_config(d / "plan.toml")
    except ConfigError as exc:
        raise SpecError([Problem("", str(exc))]) from None
    return d


def cmd_run(args) -> int:
    import subprocess

    from .runtime.config import load_config

    d = _project(args.dir)
    if args.probe and (args.max_steps is not None or args.resume):
        from .schemas import Problem, SpecError

        raise SpecError([Problem("", "--probe trains nothing: it cannot be combined with --max-steps or --resume")])
    extra = []
    if args.max_steps is not None:
        extra += ["--max-steps", str(args.max_steps)]
    if args.resume:
        extra.append("--resume")
    config = load_config(d / "plan.toml")
    launch = config.launch
    processes = launch["devices_per_node"] * launch["nodes"]
    if processes > 1:
        port = ["--main_process_port", os.environ["MAIN_PROCESS_PORT"]] if os.environ.get("MAIN_PROCESS_PORT") else []
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
               *port, "train.py"]
    else:
        cmd = [sys.executable, "train.py"]
    if args.probe or (not args.no_probe and _cuda_available()):  # on CUDA an OOM shows in minute one, not hour five
        code = _probe(cmd, d, config.output_dir / "metrics.jsonl")
        if args.probe or code != EXIT_OK:
            if not args.probe and code in PROBE_VERDICTS:
                emit("peftplan run: training not started (the probe's advice is above); --no-probe trains anyway",
                     sys.stderr)
            return code
        emit("peftplan run: the probe's step fits; training", sys.stderr)
    return subprocess.call(cmd + extra, cwd=d)


def _cuda_available() -> bool:
    """Whether training will run on CUDA: no NVIDIA/ROCm device node on Linux is a quick no; else torch says."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd")):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _probe(cmd: list[str], d: Path, metrics: Path) -> int:
    """Run `train.py --probe` (through the plan's launcher). Its exit code; under a multi-process launcher, which
    reports any rank's failure as 1, the verdict the main process wrote in its record."""
    import subprocess
    import time

    started = time.time()
    code = subprocess.call(cmd + ["--probe"], cwd=d)
    if code in (EXIT_OK, EXIT_INPUT, *PROBE_VERDICTS):
        return code
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return code
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "probe" and isinstance(rec.get("time"), (int, float)):
            return rec.get("exit_code", code) if rec["time"] >= started and rec.get("exit_code") in PROBE_VERDICTS \
                else code
    return code


def cmd_merge(args) -> int:
    import subprocess

    d = _project(args.dir)
    cmd = [sys.executable, "merge.py"] + (["-o", os.path.abspath(args.output)] if args.output else []) \
        + (["--dtype", args.dtype] if args.dtype else [])
    return subprocess.call(cmd, cwd=d)


def _script(d: Path, name: str) -> None:
    from .schemas import Problem, SpecError

    if not (d / name).is_file():
        raise SpecError([Problem("", f"{d} has no {name}: it was generated by an older peftplan; regenerate it with "
                                     "peftplan generate SPEC -o DIR --force")])


def cmd_sample(args) -> int:
    import subprocess

    d = _project(args.dir)
    _script(d, "sample.py")
    cmd = [sys.executable, "sample.py"]
    for flag, v in (("--prompts", args.prompts and os.path.abspath(args.prompts)), ("--n", args.n),
                    ("--max-new-tokens", args.max_new_tokens), ("--temperature", args.temperature),
                    ("--seed", args.seed)):
        if v is not None:
            cmd += [flag, str(v)]
    return subprocess.call(cmd, cwd=d)


def cmd_push(args) -> int:
    import subprocess

    d = _project(args.dir)
    _script(d, "push.py")
    cmd = [sys.executable, "push.py", args.repo_id] + [f for f, on in (
        ("--merged", args.merged), ("--private", args.private), ("--dry-run", args.dry_run)) if on]
    return subprocess.call(cmd, cwd=d)


def cmd_calibrate(args) -> int:
    from .planner import local_calibration as lc

    if args.clear:
        if args.runs:
            from .schemas import Problem, SpecError

            raise SpecError([Problem("", "--clear forgets the whole local calibration: give it no run folders")])
        path = lc.store_path()
        existed = path.exists()
        path.unlink(missing_ok=True)
        emit(f"removed {path}" if existed else f"no local calibration at {path}")
        return EXIT_OK
    if not args.runs:
        store = _local_calibration()
        if not store.corrections:
            emit(f"no local calibration at {store.path} yet: peftplan calibrate RUN_DIR ... (projects that ran)")
        for c in store.corrections.values():
            emit(f"{c.describe()} ({len(c.runs)} project{'s' * (len(c.runs) != 1)})")
        return EXIT_OK
    try:
        store, reading = lc.calibrate(args.runs)
    except lc.CalibrationError as exc:
        for line in exc.problems:
            emit(f"peftplan calibrate: {line}", sys.stderr)
        return EXIT_INPUT
    for line in reading.skipped:
        emit(f"skipped: {line}", sys.stderr)
    for line in reading.refused:
        emit(f"refused: {line}", sys.stderr)
    for line in store.warnings:
        emit(f"warning: {line}", sys.stderr)
    if not reading.samples:
        emit(f"peftplan calibrate: no usable measured-vs-predicted record in {', '.join(args.runs)}; "
             f"{store.path} is unchanged", sys.stderr)
        return EXIT_INPUT
    emit(f"{len(reading.samples)} record(s) read; {store.path} now holds {len(store.samples)}:")
    for c in store.corrections.values():
        emit(f"  {c.describe()}")
    return EXIT_OK


COMMANDS = {"estimate": cmd_estimate, "plan": cmd_plan, "validate": cmd_validate, "schema": cmd_schema,
            "models": cmd_models, "gpus": cmd_gpus, "generate": cmd_generate, "run": cmd_run, "merge": cmd_merge,
            "sample": cmd_sample, "push": cmd_push, "calibrate": cmd_calibrate}
COMMANDS["import"] = cmd_import


def main(argv: list[str] | None = None) -> int:
    from .parser import build_parser
    from .planner.resolve import set_describer
    from .schemas import SpecError

    args = build_parser().parse_args(argv)
    set_describer(_describer)  # an architecture the closed form lacks is described from transformers, lazily
    try:
        return COMMANDS[args.command](args)
    except SpecError as exc:
        spec_path = getattr(args, "spec", None)
        if exc.path is None and spec_path and Path(spec_path).is_file():
            from .schemas import locate

            exc = locate(exc.problems, spec_path)
        for line in exc.lines():
            emit(line, sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        emit("interrupted", sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # the one place that turns the unexpected into an exit code
        if os.environ.get("PEFTPLAN_DEBUG"):
            raise
        emit(f"peftplan: internal error: {type(exc).__name__}: {str(exc)[:500]} (set PEFTPLAN_DEBUG=1 for the "
             "traceback)", sys.stderr)
        return EXIT_ERROR
