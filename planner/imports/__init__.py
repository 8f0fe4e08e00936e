"""`peftplan import`: an axolotl or LLaMA-Factory training config as a peftplan spec (docs/import.md).

`import_config` reads the YAML, detects the tool, maps every setting that changes memory, time or the method onto
the spec's keys (pinned to that tool's values and defaults), lists every key it did not map with why, says which
terms of the estimate differ from the tool's run, then validates and estimates the spec so that problems are found
before anything is written. `to_toml` renders it with comments; `write_spec` writes it without replacing files.
"""

from __future__ import annotations

from pathlib import Path

from ...schemas import Problem, SpecError, spec_from_dict
from . import axolotl, llamafactory
from .render import to_toml, write_spec
from .result import UNSUPPORTED, Imported, gib, shown
from .source import read_yaml

__all__ = ["Imported", "detect", "import_config", "summary", "to_toml", "write_spec"]

DEFAULT_GPU = "A100-80GB"
SHARDED = ("fsdp", "deepspeed-zero2", "deepspeed-zero3")
LLAMAFACTORY_KEYS = ("stage", "finetuning_type", "cutoff_len", "template", "lora_target", "dataset", "dataset_dir",
                     "quantization_bit")
TRL_KEYS = ("dataset_name", "use_peft", "max_length", "max_seq_length", "dataset_text_field")


def detect(data: dict, path: Path) -> str:
    """Which tool a config is for: axolotl (base_model), LLaMA-Factory (model_name_or_path with its own keys)."""
    if "base_model" in data:
        return axolotl.TOOL
    if "model_name_or_path" in data and any(k in data for k in LLAMAFACTORY_KEYS):
        return llamafactory.TOOL
    if "model_name_or_path" in data and any(k in data for k in TRL_KEYS):
        raise SpecError([Problem("", "this looks like a TRL (`trl sft`) config: peftplan import reads axolotl and "
                                     "LLaMA-Factory configs; write the spec by hand (docs/spec.md)")], path)
    raise SpecError([Problem("", "neither an axolotl config (no base_model key) nor a LLaMA-Factory config "
                                 "(model_name_or_path with stage, finetuning_type, dataset or cutoff_len)")], path)


def import_config(path: str | Path, *, gpu: str | None = None, count: int | None = None, model: str | None = None,
                  out_dir: Path | None = None) -> Imported:
    """The config at `path` as an estimated spec. Raises SpecError (exit 2) naming the config's keys and lines."""
    from ..report import estimate_spec

    path = Path(path)
    data, lines, warnings = read_yaml(path)
    tool = detect(data, path)
    reader = axolotl if tool == axolotl.TOOL else llamafactory
    c = reader.read(data, lines, path, model=model, out_dir=out_dir or Path.cwd())
    _hardware(c, gpu, count)
    if c.problems:
        raise SpecError(_unique(c.problems), path)
    result = c.finish(path, reader.IGNORED)
    result.assumptions = [*warnings, *result.assumptions]
    sources = {m.key: m.source for m in result.mapped}
    try:
        spec = spec_from_dict(result.spec_dict())
        result.report = estimate_spec(spec, base_dir=out_dir or Path.cwd())
    except SpecError as exc:  # a value the spec or the model refuses: named by the config's key it came from
        raise SpecError([_theirs(p, sources, lines) for p in exc.problems], path) from None
    return result


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            out.append(p)
    return out


def _theirs(p: Problem, sources: dict[str, str], lines: dict[str, int]) -> Problem:
    source = sources.get(p.key)
    if source is None or source.startswith("("):
        return Problem(p.key, p.message, severity=p.severity)
    key = source.split(":")[0].split(" ")[0].split("[")[0]
    return Problem(key, f"{p.message} (as {p.key} of the spec)", lines.get(key), p.severity)


def _hardware(c, gpu: str | None, count: int | None) -> None:
    from .. import catalog

    if gpu is None:
        c.set("hardware.gpu", DEFAULT_GPU, "(assumed: no --gpu)")
        c.assume(f"hardware.gpu: {DEFAULT_GPU} (no --gpu given; the config does not name a device)")
    elif gpu.strip().lower() == "cpu" or catalog.find_device(gpu) is not None:
        c.set("hardware.gpu", gpu, "--gpu")
    else:
        close = catalog.close_devices(gpu)
        c.problems.append(Problem("--gpu", f"unknown device {shown(gpu)!r}" + (f"; closest: {', '.join(close)}" if close
                                                                             else "") + " (see `peftplan gpus`)"))
    parallelism = c.mapped.get("training.parallelism")
    sharded = parallelism is not None and parallelism.value in SHARDED
    if count is not None:
        c.set("hardware.count", count, "--count")
    elif sharded:
        c.set("hardware.count", 2, "(assumed: no --count)")
        c.assume(f"hardware.count: 2 — the config shards over several devices ({parallelism.value}) but does not say "
                 "how many; 2 is the fewest, and memory per device only falls with more: pass --count")
    else:
        c.set("hardware.count", 1, "(one device: no --count)")
    if (count or 1) > 1 and parallelism is None and c.tool == axolotl.TOOL:
        c.set("training.parallelism", "ddp", "(no deepspeed or fsdp)", "axolotl runs plain data parallelism")
    elif (count or 1) > 1 and parallelism is None:
        c.assume("LLaMA-Factory takes FSDP from the accelerate config it is launched with, which this file does not "
                 "show: training.parallelism is left to the planner (DDP where it fits, else FSDP); set it to "
                 "\"fsdp\" if you launch with accelerate's FSDP config")


def summary(result: Imported, shown_path: str) -> list[str]:
    """What the command prints on stderr: counts, what to check, what differs, and the estimate of the method."""
    unsupported = [u for u in result.unmapped if u.kind == UNSUPPORTED]
    lines = [f"{shown_path}: {result.tool} config, {len(result.mapped)} settings mapped, {len(result.unmapped)} keys "
             f"not mapped ({len(unsupported)} not supported), {len(result.differences)} differences from "
             f"{result.tool}'s run (all listed in the spec)"]
    lines += [f"  assumed: {a}" for a in result.assumptions]
    lines += [f"  not supported: {u.key}: {u.reason}" for u in unsupported]
    lines += [f"  differs ({d.term}): {d.text}" for d in result.differences]
    report = result.report
    if report is not None and result.method in report.estimates:
        est = report.estimates[result.method]
        par = report.parallelism.get(result.method, "single")
        devices = f"{report.devices} × " if report.devices > 1 else ""
        verdict = "fits" if report.fits(est) else (
            f"does not fit: {gib(report.needed_bytes(est) - report.usable_bytes)} over")
        lines.append(f"  estimate: {result.method} on {devices}{report.hardware.device.id}"
                     f"{f' ({par})' if par != 'single' else ''}: {gib(est.peak_allocated_bytes)} peak allocated, "
                     f"{gib(report.needed_bytes(est))} on each device of {gib(report.usable_bytes)} usable — {verdict}")
    return lines
