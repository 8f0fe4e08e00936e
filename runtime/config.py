"""The frozen plan file (`plan.toml`) as the runtime reads it, validated here with what the runtime owns.

The runtime is copied into every generated project and never imports peftplan's planner or schemas,
so this module checks the file itself: required tables and keys, types, allowed values.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .data_files import data_settings
from .data_formats import DataError
from .tracking import TrackingError, logging_settings

METHODS = ("full", "lora", "qlora", "dora", "qdora")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
PARALLELISMS = ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


class ConfigError(ValueError):
    """The plan file is missing, malformed or inconsistent. The message names the file and key."""


@dataclass(frozen=True)
class RunConfig:
    path: Path
    model: dict
    method: dict
    data: dict
    training: dict
    output_dir: Path
    prediction: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)
    logging: dict = field(default_factory=lambda: {"report_to": [], "run_name": None})  # tracking.logging_settings

    @property
    def dtype(self) -> str:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.training["precision"]]


def _need(table: dict, name: str, key: str, kind, path: Path, choices=None, default=...):
    if key not in table:
        if default is ...:
            raise ConfigError(f"{path}: [{name}] lacks the key {key!r}")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{path}: {name}.{key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{path}: {name}.{key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {name}.{key} must be a finite number, got {value!r}")
    if isinstance(value, str) and len(value) > 4096:
        raise ConfigError(f"{path}: {name}.{key} is {len(value):,} characters long: not a value peftplan wrote")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {name}.{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _read_plan(p: Path) -> dict:
    """The plan file's TOML, with the four tables every plan has."""
    if not p.is_file():
        raise ConfigError(f"plan file not found: {p}")
    try:
        if p.stat().st_size > 2**20:
            raise ConfigError(f"{p}: {p.stat().st_size:,} bytes is not a plan file peftplan wrote (regenerate it)")
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); regenerate it with peftplan "
                          "generate --force") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {str(exc)[:200]}") from None
    for table in ("model", "method", "data", "training"):
        if not isinstance(raw.get(table), dict):
            raise ConfigError(f"{p}: missing table [{table}]")
    return raw


def _model(m: dict, p: Path) -> dict:
    return {
        "name": _need(m, "model", "name", str, p),
        "attention": _need(m, "model", "attention", str, p, ("sdpa", "eager", "flash_attention_2"), "sdpa"),
        "trust_remote_code": _need(m, "model", "trust_remote_code", bool, p, default=False),
    }


def _method(me: dict, p: Path) -> dict:
    method = {"name": _need(me, "method", "name", str, p, METHODS)}
    if method["name"] != "full":
        method.update(
            rank=_need(me, "method", "rank", int, p),
            alpha=float(_need(me, "method", "alpha", (int, float), p)),
            dropout=float(_need(me, "method", "dropout", (int, float), p)),
            target_modules=_need(me, "method", "target_modules", (str, list), p),
        )
        if method["rank"] < 1:
            raise ConfigError(f"{p}: method.rank must be ≥ 1")
        if method["alpha"] <= 0 or not 0.0 <= method["dropout"] < 1.0:
            raise ConfigError(f"{p}: method.alpha must be > 0 and method.dropout in [0, 1)")
    return method


def _data(d: dict, p: Path) -> dict:
    """[data]'s keys and types (their ranges are checked by _check_ranges, after [launch])."""
    try:
        files = data_settings(d)  # path / sources / eval_path / format / roles / txt_split, each checked
    except DataError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return {
        **files,
        "path": str(files["sources"][0].path),  # the first file, for messages
        "seq_len": _need(d, "data", "seq_len", int, p),
        "packing": _need(d, "data", "packing", bool, p, default=False),
        "eval_fraction": float(_need(d, "data", "eval_fraction", (int, float), p, default=0.0)),
    }


def _training(t: dict, p: Path) -> dict:
    """[training]'s keys and types (their ranges are checked by _check_ranges, after [launch])."""
    return {
        "micro_batch_size": _need(t, "training", "micro_batch_size", int, p),
        "gradient_accumulation_steps": _need(t, "training", "gradient_accumulation_steps", int, p),
        "gradient_checkpointing": _need(t, "training", "gradient_checkpointing", bool, p),
        "optimizer": _need(t, "training", "optimizer", str, p, OPTIMIZERS),
        "learning_rate": float(_need(t, "training", "learning_rate", (int, float), p)),
        "lr_scheduler": _need(t, "training", "lr_scheduler", str, p,
                              ("cosine", "linear", "constant", "constant_with_warmup"), "cosine"),
        "warmup_ratio": float(_need(t, "training", "warmup_ratio", (int, float), p, default=0.0)),
        "epochs": float(_need(t, "training", "epochs", (int, float), p)),
        "max_steps": _need(t, "training", "max_steps", int, p, default=-1),
        "seed": _need(t, "training", "seed", int, p, default=42),
        "save_steps": _need(t, "training", "save_steps", int, p, default=100),
        "logging_steps": _need(t, "training", "logging_steps", int, p, default=10),
        "precision": _need(t, "training", "precision", str, p, PRECISIONS),
        "loss": _need(t, "training", "loss", str, p, ("chunked", "full"), "chunked"),
        "activation_offloading": _need(t, "training", "activation_offloading", bool, p, default=False),
    }


def _output_dir(raw: dict, p: Path) -> Path:
    out = raw.get("output", {})
    output_dir = Path(_need(out, "output", "dir", str, p, default="outputs"))
    if not output_dir.is_absolute():
        output_dir = p.parent / output_dir
    return output_dir


def _launch(raw: dict, p: Path) -> dict:
    la = raw.get("launch", {})
    launch = {
        **la,
        "parallelism": _need(la, "launch", "parallelism", str, p, PARALLELISMS, "single"),
        "devices_per_node": _need(la, "launch", "devices_per_node", int, p, default=1),
        "nodes": _need(la, "launch", "nodes", int, p, default=1),
    }
    for key in ("devices_per_node", "nodes"):
        if not 1 <= launch[key] <= 2**16:
            raise ConfigError(f"{p}: launch.{key} must be between 1 and 65536, got {launch[key]}")
    return launch


def _check_ranges(training: dict, data: dict, p: Path) -> None:
    if training["learning_rate"] <= 0 or training["epochs"] <= 0:
        raise ConfigError(f"{p}: training.learning_rate and training.epochs must be > 0")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
        if training[key] < 1:
            raise ConfigError(f"{p}: training.{key} must be ≥ 1, got {training[key]}")
    if data["seq_len"] < 2:
        raise ConfigError(f"{p}: data.seq_len must be ≥ 2, got {data['seq_len']}")
    if not 0.0 <= data["eval_fraction"] < 1.0:
        raise ConfigError(f"{p}: data.eval_fraction must be in [0, 1), got {data['eval_fraction']}")


def _logging(raw: dict, p: Path) -> dict:
    try:
        return logging_settings(raw.get("logging", {}))
    except TrackingError as exc:  # one line per problem, each naming the file
        raise ConfigError("\n".join(f"{p}: {line}" for line in str(exc).split("\n"))) from None


def _prediction(raw: dict, p: Path) -> dict:
    prediction = {k: v for k, v in raw.get("prediction", {}).items() if isinstance(v, (int, float, str))
                  and not isinstance(v, bool)}
    rows = raw.get("prediction", {}).get("peak_by_row_length")
    if rows is not None:  # [[tokens per row, bytes], ...]: the prediction at shorter rows than seq_len
        if not (isinstance(rows, list) and all(isinstance(r, list) and len(r) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in r) for r in rows)):
            raise ConfigError(f"{p}: prediction.peak_by_row_length must be a list of [tokens, bytes] pairs")
        prediction["peak_by_row_length"] = sorted(rows)
    return prediction


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    raw = _read_plan(p)
    model = _model(raw["model"], p)
    method = _method(raw["method"], p)
    data = _data(raw["data"], p)
    training = _training(raw["training"], p)
    for table in ("output", "prediction", "provenance", "launch", "logging"):
        if not isinstance(raw.get(table, {}), dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
    output_dir = _output_dir(raw, p)
    launch = _launch(raw, p)
    _check_ranges(training, data, p)
    logging = _logging(raw, p)
    prediction = _prediction(raw, p)
    return RunConfig(path=p, model=model, method=method, data=data, training=training, output_dir=output_dir,
                     prediction=prediction, provenance=dict(raw.get("provenance", {})), launch=launch,
                     logging=logging)


def data_arguments(config: RunConfig, override: str | None = None) -> dict:
    """The keyword arguments of data.prepare_data for this plan (`override`: one file instead of the plan's)."""
    from .data_files import Source

    d = config.data
    sources = [Source(override)] if override else d["sources"]
    return {"sources": sources, "format": d["format"], "seq_len": d["seq_len"], "eval_fraction": d["eval_fraction"],
            "seed": config.training["seed"], "packing": d["packing"], "eval_path": d["eval_sources"] or None,
            "roles": d["roles"], "txt_split": d["txt_split"], "base_dir": config.path.parent}


def resolve_path(config: RunConfig, value: str) -> str:
    """A relative path in the plan is relative to the plan file's folder; hub ids stay as they are."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = config.path.parent / candidate
    if local.exists():
        return str(local)
    return value

