"""`peftplan generate`: compile a plan into a standalone training project, atomically.

Logic lives here; templates (templates/project/*.j2) stay dumb: StrictUndefined, and every value goes
through an escaping filter for the language it lands in (TOML, shell, YAML, Markdown, comments).
Writing into the user's folder is planner/writer.py's job: only files peftplan wrote are ever replaced.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__ as VERSION
from ..schemas import Problem, Spec, SpecError
from . import assumptions as A
from .choose import Candidate, PlanResult
from .report import EstimateReport
from .resolve import ResolvedModel
from .terms import duration
from .writer import ConflictError, GenerateError, write_project  # noqa: F401  (re-exported for the CLI)

TEMPLATES = {  # template -> file in the project
    "README.md.j2": "README.md",
    "plan.toml.j2": "plan.toml",
    "train.py.j2": "train.py",
    "merge.py.j2": "merge.py",
    "evaluate.py.j2": "evaluate.py",
    "run.sh.j2": "run.sh",
    "accelerate_config.yaml.j2": "accelerate_config.yaml",
    "ds_config.json.j2": "ds_config.json",
    "requirements.txt.j2": "requirements.txt",
    "gitignore.j2": ".gitignore",
    "sample.py.j2": "sample.py",
    "push.py.j2": "push.py",
}
EXECUTABLE = {"run.sh", "train.py", "merge.py", "evaluate.py", "sample.py", "push.py"}
RUNTIME_PACKAGE = "peftplan_runtime"
RUNTIME_SKIP = {"testing.py", "exact.py"}  # tests' fixtures; the CLI's tracing (never run by a project)


# --- escaping filters ------------------------------------------------------------------------------
def f_toml(value) -> str:
    import tomli_w

    if value is None:
        raise ValueError("TOML has no null: the template must not render None")
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def f_comment(value) -> str:
    text = " ".join(str(value).split())  # newlines and control whitespace become single spaces
    return "".join(ch for ch in text if ch.isprintable())


def f_md(value) -> str:
    text = f_comment(value)
    for ch in "\\`*_{}[]<>()#+!|":
        text = text.replace(ch, "\\" + ch)
    return text


def f_mdcode(value) -> str:
    return f_comment(value).replace("`", "'")


def f_sh(value) -> str:
    """One shell word that is exactly the value, on one printable line. Plain POSIX quoting when every
    character is safe to show; otherwise bash's $'…' with each byte of the UTF-8 encoding of an unsafe character
    as \\xHH (two hex digits always: never read together with a following character), and lone surrogates
    (undecodable bytes in a file name) as the byte they stand for. Safe: printable, not a space other than
    U+0020, not a bidi or zero-width format character."""
    import shlex
    import unicodedata

    text = str(value)

    def safe(ch: str) -> bool:
        if ch == " ":
            return True
        return ch.isprintable() and unicodedata.category(ch) not in ("Zs", "Cf", "Zl", "Zp", "Cs")

    if all(safe(ch) for ch in text):
        return shlex.quote(text)
    out = []
    for ch in text:
        if ch in "\\'":
            out.append("\\" + ch)
        elif safe(ch):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape")))
    return "$'" + "".join(out) + "'"


def f_yamlstr(value) -> str:
    import json

    return json.dumps(f_comment(value))


def f_yamlbool(value) -> str:
    if not isinstance(value, bool):
        raise ValueError(f"expected a bool, got {value!r}")
    return "true" if value else "false"


def f_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an int, got {value!r}")
    return value


def environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(_templates_dir()), undefined=StrictUndefined, autoescape=False,
                      keep_trailing_newline=True)
    env.filters.update(toml=f_toml, comment=f_comment, md=f_md, mdcode=f_mdcode, sh=f_sh, yamlstr=f_yamlstr,
                       yamlbool=f_yamlbool, int=f_int)
    return env


def _templates_dir() -> str:
    from importlib.resources import files

    return str(files("peftplan.templates") / "project")


# --- compile ---------------------------------------------------------------------------------------
def model_location(model: ResolvedModel) -> str:
    if model.source == "catalog":
        return model.name  # a hub id: downloaded on the training machine (or read from its HF cache)
    path = Path(model.location)
    return str(path.parent.resolve() if path.name == "config.json" else path.resolve())


_dur = duration


def peak_by_row_length(c, correction=None) -> list[list[int]]:
    """[row length, predicted peak allocated bytes] at the chosen micro-batch for rows shorter than seq_len: padded
    batches are only as long as their longest row, so the run compares its measured peak with the prediction for
    the shape it measured (interpolated between these), not only with full seq_len rows. `correction`: the local
    calibration the plan applied."""
    from dataclasses import replace

    from .local_correction import corrected_memory
    from .parallel import per_device

    g = c.setup.geometry
    lengths = sorted({max(8, g.seq_len >> k) for k in range(5)} | {g.seq_len})
    out = []
    for n in lengths:
        s = replace(c.setup, geometry=replace(g, seq_len=n))
        est = corrected_memory(per_device(c.method, s, c.parallelism, c.devices), correction)
        out.append([n, int(est.peak_allocated_bytes)])
    return out


def _data_path(raw: str, spec_path: Path, key: str) -> str:
    """A data file as the plan records it: absolute; a hub dataset name (org/name) that is no local path stays a
    name (the runtime fetches it when online)."""
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else spec_path.parent / path).resolve()
    hub_id = raw.count("/") == 1 and not raw.startswith((".", "/", "~")) and not Path(raw).suffix
    if hub_id and not path.exists():
        return raw
    if not path.exists():
        raise SpecError([Problem(key, f"{path} does not exist")])
    return str(path)


def data_files(spec: Spec, spec_path: Path) -> dict:
    """The [data] keys of plan.toml that name files: one `path`, or `sources` (several files, formats, weights);
    `eval_path`; `format`, `roles`, `txt_split` as the spec sets them."""
    d = spec.data
    paths = [] if d.path is None else ([d.path] if isinstance(d.path, str) else list(d.path))
    if not paths and not d.sources:
        raise SpecError([Problem("data.path", "required for generate: the training data (a file, a list of files, "
                                              "or [[data.sources]] tables; .jsonl, .json, .csv, .parquet or .txt)")])
    sources = [{"path": _data_path(p, spec_path, "data.path")} for p in paths]
    for s in d.sources or []:
        entry = {"path": _data_path(s.path, spec_path, "data.sources")}
        if s.format:
            entry["format"] = s.format
        if s.weight != 1.0:
            entry["weight"] = float(s.weight)
        sources.append(entry)
    held = [] if d.eval_path is None else ([d.eval_path] if isinstance(d.eval_path, str) else list(d.eval_path))
    out = {"format": d.format, "txt_split": d.txt_split, "roles": dict(d.roles or {}),
           "eval_path": [_data_path(p, spec_path, "data.eval_path") for p in held]}
    if len(sources) == 1 and set(sources[0]) == {"path"}:
        out.update(path=sources[0]["path"], sources=[])
    else:
        out.update(path="", sources=sources)
    return out


def compile_project(result: PlanResult, spec: Spec, spec_path: Path, out: Path) -> dict:
    """Everything the templates need, decided here."""
    c, rep, hp = result.chosen, result.report, result.hyperparameters
    g = c.setup.geometry
    spe = result.steps_per_epoch or 1
    why = {k: (v.why if not v.user_set else "set in the spec") for k, v in hp.items()}
    eval_fraction = float(hp["eval_fraction"].value)  # chosen by the planner when the spec leaves it out
    training_values, training_why = _training(result, spec, spe, why)
    method_keys = [k for k in ("rank", "alpha", "dropout", "target_modules") if k in hp]
    return {
        "banner": f"generated by peftplan {VERSION} — regenerate rather than edit",
        "version": VERSION,
        "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "spec_path": str(spec_path.resolve()),
        "spec_sha256": hashlib.sha256(spec_path.read_bytes()).hexdigest(),
        "out_name": str(out),
        "model": {"name": model_location(rep.model), "attention": g.attention,
                  "trust_remote_code": spec.model.trust_remote_code,
                  "why": f"{rep.model.name} ({rep.model.shape.parameters / 1e9:.2f}B parameters, "
                         f"from {rep.model.source})"},
        "method": {"name": c.method, "why": result.reasons[0] if result.reasons else "", "order": method_keys,
                   "settings": _method_settings(hp, method_keys), "rationale": why},
        "data": {**data_files(spec, spec_path), "seq_len": g.seq_len, "packing": c.packing,
                 "eval_fraction": eval_fraction, "held_out": eval_fraction > 0 or spec.data.eval_path is not None,
                 "eval_share": f"{eval_fraction:.1%}" if eval_fraction > 0 else "data.eval_path",
                 "eval_why": why["eval_fraction"]},
        "training": {"order": list(training_values), "settings": training_values, "rationale": training_why},
        "prediction": _prediction(c, rep), "launch": _launch(c, rep),
        "logging": {"report_to": list(spec.logging.report_to), "run_name": spec.logging.run_name},
        "launch_command": ("accelerate launch --config_file accelerate_config.yaml train.py" if c.devices > 1
                           else "python train.py"),
        "device": {"name": rep.hardware.device.name, "memory_gib": f"{rep.hardware.device.memory_bytes / 2**30:.0f}"},
        "precision": rep.resolved.precision, "reasons": result.reasons, "rejected": result.rejected,
        "effective_batch": g.micro_batch_size * c.accumulation * c.devices, "steps_per_epoch": spe,
        **_summary(result),
    }


def _method_settings(hp: dict, keys: list[str]) -> dict:
    """plan.toml's [method] values: lists for the targets, a float α."""
    out = {k: (list(hp[k].value) if isinstance(hp[k].value, (list, tuple)) else hp[k].value) for k in keys}
    if "alpha" in out:
        out["alpha"] = float(out["alpha"])
    return out


def _training(result: PlanResult, spec: Spec, steps_per_epoch: int, why: dict) -> tuple[dict, dict]:
    """plan.toml's [training] values, and why each."""
    c, rep, hp, t = result.chosen, result.report, result.hyperparameters, spec.training
    g = c.setup.geometry
    epochs = float(hp["epochs"].value)
    total_steps = t.max_steps or max(1, int(steps_per_epoch * epochs))
    values = {
        "micro_batch_size": g.micro_batch_size,
        "gradient_accumulation_steps": c.accumulation,
        "gradient_checkpointing": g.gradient_checkpointing,
        "optimizer": c.setup.optimizer,
        "learning_rate": float(hp["learning_rate"].value),
        "lr_scheduler": str(hp["lr_scheduler"].value),
        "warmup_ratio": float(hp["warmup_ratio"].value),
        "epochs": epochs,
        "max_steps": t.max_steps or -1,
        "seed": t.seed,
        "save_steps": t.save_steps or max(5, min(200, total_steps // 5)),
        "logging_steps": max(1, min(10, total_steps // 20)),
        "precision": rep.resolved.precision,
        "loss": c.setup.loss,
        "activation_offloading": c.setup.offload,
    }
    given = "set in the spec"
    reasons = {
        "micro_batch_size": given if t.micro_batch_size else "largest that fits with the fastest geometry",
        "gradient_accumulation_steps": f"effective batch {g.micro_batch_size * c.accumulation * c.devices} sequences",
        "gradient_checkpointing": given if t.gradient_checkpointing is not None else
        ("needed to fit" if g.gradient_checkpointing else "not needed: faster without recomputation"),
        "optimizer": given if t.optimizer else "32-bit AdamW unless memory needs 8-bit or paged",
        "learning_rate": why.get("learning_rate", ""), "lr_scheduler": why.get("lr_scheduler", ""),
        "warmup_ratio": why.get("warmup_ratio", ""), "epochs": why.get("epochs", ""),
        "max_steps": "-1: run the epochs", "seed": "set before the adapter is created",
        "save_steps": f"about 5 checkpoints over {total_steps} steps", "logging_steps": "metrics.jsonl cadence",
        "precision": f"{rep.hardware.device.id}: {'bf16' if rep.hardware.device.bf16 else 'no bf16'}",
        "loss": given if t.loss else
        "chunked: the head and the loss run a chunk of tokens at a time, never tokens × vocabulary logits",
        "activation_offloading": given if t.activation_offloading is not None else
        ("the checkpointed layer inputs go to host memory: it makes the plan fit or allows a much larger batch"
         if c.setup.offload else "not needed"),
    }
    return values, reasons


# accelerate's MULTI_CPU launcher needs MPI; MULTI_GPU with use_cpu runs torchrun + gloo on CPUs
DISTRIBUTED_TYPES = {"single": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED",
                     "deepspeed-zero3": "DEEPSPEED"}


def _launch(c: Candidate, rep: EstimateReport) -> dict:
    """How accelerate launches the run: processes per node, nodes, the engine, mixed precision."""
    distributed = c.devices > 1
    count = rep.hardware.count if distributed else 1
    return {
        "count": count, "nodes": rep.hardware.nodes if distributed else 1, "devices": count, "processes": c.devices,
        "distributed": distributed, "parallelism": c.parallelism,
        "distributed_type": DISTRIBUTED_TYPES[c.parallelism] if distributed else "NO",
        "zero_stage": 3 if c.parallelism == "deepspeed-zero3" else 2,
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[rep.resolved.precision],
        "use_cpu": rep.hardware.device.is_cpu,
    }


def _prediction(c: Candidate, rep: EstimateReport) -> dict:
    """plan.toml's [prediction]: what the run's own measurements are compared with (-1: unknown)."""
    t, correction = c.time, rep.corrections.get(c.method)
    return {"device": rep.hardware.device.id, "devices": c.devices,
            "peak_allocated_bytes": c.estimate.peak_allocated_bytes,
            "device_total_bytes": c.estimate.device_total_bytes,
            "seconds": round(t.seconds, 1) if t else -1.0,
            "low_seconds": round(t.low_seconds, 1) if t else -1.0,
            "high_seconds": round(t.high_seconds, 1) if t else -1.0,
            "cost_usd": round(c.cost_usd, 2) if c.cost_usd is not None else -1.0,
            "tokens_per_second": round(t.useful_tokens / t.seconds, 1) if t else -1.0,
            "peak_by_row_length": peak_by_row_length(c, correction),
            "device_memory_bytes": rep.memory_bytes, "headroom_fraction": A.FIT_HEADROOM_FRACTION,
            # the local calibration's factors (1: none): `peftplan calibrate` divides them out again
            "memory_correction": correction.memory if correction and correction.memory else 1.0,
            "tokens_per_second_correction": (correction.tokens_per_second
                                             if correction and correction.tokens_per_second else 1.0)}


def _summary(result: PlanResult) -> dict:
    """The README's plan summary: time, cost, the memory table and the chosen plan's components."""
    c, rep = result.chosen, result.report
    memory_rows = [{"method": m, "chosen": m == c.method, "needs": f"{x.needed_bytes / 2**30:.1f}",
                    "fits": "yes" if x.fits else "no", "peak": f"{x.estimate.peak_allocated_bytes / 2**30:.1f}",
                    "trainable": f"{x.estimate.trainable_parameters:,}"} for m, x in result.best.items()]
    unknown = {"mid": "?", "low": "?", "high": "?"}
    return {
        "time": {"mid": _dur(c.time.seconds), "low": _dur(c.time.low_seconds), "high": _dur(c.time.high_seconds)}
        if c.time else unknown,
        "cost": f"~${c.cost_usd:,.2f}" if c.cost_usd is not None else "unknown (no price for this device)",
        "usable_gib": f"{rep.usable_bytes / 2**30:.1f}", "memory_rows": memory_rows,
        "components": [(k, f"{v / 2**30:.2f}") for k, v in c.estimate.components().items() if v],
        "peak_phase": c.estimate.phase, "predicted_peak_gib": f"{c.estimate.peak_allocated_bytes / 2**30:.2f}",
        "assumptions": "; ".join(c.time.assumptions) if c.time else "no throughput known for this device",
    }


def render_files(context: dict) -> dict[str, str]:
    env = environment()
    deepspeed = context["launch"]["parallelism"].startswith("deepspeed")
    return {name: env.get_template(tpl).render(**context) for tpl, name in TEMPLATES.items()
            if deepspeed or name != "ds_config.json"}


def runtime_files() -> dict[str, str]:
    """The runtime package, copied in and version-stamped."""
    from importlib.resources import files

    out = {}
    pkg = files("peftplan.runtime")
    for entry in sorted(pkg.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py") and entry.name not in RUNTIME_SKIP:
            text = entry.read_text(encoding="utf-8")
            out[f"{RUNTIME_PACKAGE}/{entry.name}"] = f"# peftplan {VERSION} runtime, copied into this project\n{text}"
    out[f"{RUNTIME_PACKAGE}/_version.py"] = f'__version__ = "{VERSION}"\n'
    return out


def generate(result: PlanResult, spec: Spec, spec_path: Path, out: Path, force: bool = False) -> list[str]:
    context = compile_project(result, spec, spec_path, out)
    files = {**render_files(context), **runtime_files()}
    return write_project(files, out, force, executable=EXECUTABLE)
