"""Data sources: files, their formats and sampling weights, and the one check every record goes through,
shared by training (data.prepare_data) and the scanner (data_scan.scan_data) so both report the same problems.

    sources = as_sources(["chat.jsonl", {"path": "notes.txt", "weight": 0.5}])
    check = FileCheck(sources[0].path)
    for record, fmt, messages in check_records(sources[0], check=check, tokenizer=tok):   # valid ones, streamed
        ...
    check.error()                                                                # DataError or None

Weight (a source's sampling weight, per epoch): a weight w keeps floor(w) copies of each of the file's training
records plus a seeded random round(frac(w) * n) of them once more (rounding half up), n being the file's
training records after the held-out split. So 2.0 = every record twice, 0.5 = a seeded half, 1.5 = every record
once and a seeded half of them twice. Held-out (eval) records are never repeated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .data_chat import DEFAULT_ROLES, ROLE_TARGETS
from .data_formats import (
    FORMATS,
    MAX_REPORTED,
    DataError,
    Record,
    check_record,
    format_of,
    problems_error,
    template_check,
    template_record_problems,
)
from .data_json import read_json
from .data_read import FILE_TYPES, TXT_SPLITS, Bad, check_text_file, read_csv, read_jsonl, read_parquet, read_txt

MAX_WEIGHT = 1000.0

__all__ = ["Source", "FileCheck", "Checked", "as_sources", "rebase", "data_settings", "resolve_roles", "weighted_count",
           "apply_weight", "read_file", "load_records", "check_records", "looks_like_hub_id", "MAX_WEIGHT"]


@dataclass(frozen=True)
class Source:
    """One data file: its path, its format ("auto": detected from its first record) and its sampling weight."""

    path: str
    format: str = "auto"
    weight: float = 1.0


def _weight(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{key}: must be a number, got {value!r}")
    if not 0 < value <= MAX_WEIGHT:
        raise DataError(f"{key}: must be > 0 and ≤ {MAX_WEIGHT:g} (copies of each record per epoch), got {value!r}")
    return float(value)


def _format(value: Any, key: str) -> str:
    if value not in ("auto",) + FORMATS:
        raise DataError(f"{key}: must be one of auto, {', '.join(FORMATS)}, got {value!r}")
    return value


def as_sources(value: Any, format: str = "auto", key: str = "data.path", weights: bool = True) -> list[Source]:
    """Sources from a path, a list of paths, or tables {path, format, weight} (or Source objects); DataError
    naming `key` (and the list index) for a bad value. `format` applies to items that don't set their own;
    weights=False (held-out files) refuses a weight."""
    _format(format, key.rsplit(".", 1)[0] + ".format")
    many = isinstance(value, (list, tuple))
    items = list(value) if many else [value]
    if many and not items:
        raise DataError(f"{key}: an empty list; give at least one data file")
    out = []
    for i, item in enumerate(items):
        k = f"{key}[{i}]" if many else key
        if isinstance(item, Source):
            out.append(item)
        elif isinstance(item, (str, Path)):
            if not str(item).strip():
                raise DataError(f"{k}: an empty path")
            out.append(Source(str(item), format))
        elif isinstance(item, Mapping):
            unknown = sorted(set(map(str, item)) - {"path", "format", "weight"})
            if unknown:
                raise DataError(f"{k}: unknown key {', '.join(unknown)}; expected path, format, weight")
            if not weights and "weight" in item:
                raise DataError(f"{k}.weight: held-out (evaluation) files take no weight")
            path = item.get("path")
            if not isinstance(path, str) or not path.strip():
                raise DataError(f"{k}.path: must be a file path, got {path!r}")
            out.append(Source(path, _format(item.get("format", format), f"{k}.format"),
                              _weight(item.get("weight", 1.0), f"{k}.weight")))
        else:
            raise DataError(f"{k}: expected a file path or a table {{path, format, weight}}, got {type(item).__name__}")
    return out


def rebase(sources: list[Source], base_dir: str | Path | None) -> list[Source]:
    """Relative paths made relative to base_dir (the spec's or the plan's folder); a hub dataset name that is
    no file there is left as it is."""
    if base_dir is None:
        return sources
    out = []
    for s in sources:
        p = Path(s.path).expanduser()
        local = Path(base_dir) / p
        keep = p.is_absolute() or (looks_like_hub_id(s.path) and not local.exists())
        out.append(Source(str(p if p.is_absolute() else s.path if keep else local), s.format, s.weight))
    return out


def resolve_roles(roles: Mapping[str, Any] | None, key: str = "data.roles") -> dict[str, str]:
    """DEFAULT_ROLES updated with the user's mapping {name in the data: system|user|assistant|tool|tool_call}."""
    out = dict(DEFAULT_ROLES)
    if roles is None:
        return out
    if not isinstance(roles, Mapping):
        raise DataError(f"{key}: must be a table of role names, e.g. {{human = \"user\", gpt = \"assistant\"}}")
    for name, target in roles.items():
        if not isinstance(name, str) or not name:
            raise DataError(f"{key}: role names must be non-empty strings, got {name!r}")
        if target not in ROLE_TARGETS:
            raise DataError(f"{key}.{name}: must be one of {', '.join(ROLE_TARGETS)}, got {target!r}")
        out[name] = target
    return out


def data_settings(table: Mapping[str, Any]) -> dict:
    """The data-file keys of a plan.toml [data] table, checked: path (a file or a list of files) and/or sources
    (tables {path, format, weight}), eval_path (a file or a list), format, roles, txt_split. Returns
    {"sources", "eval_sources", "format", "roles", "txt_split"} for prepare_data; DataError naming the key.
    Other keys of the table (seq_len, packing, eval_fraction, ...) are left to the caller."""
    fmt = _format(table.get("format", "auto"), "data.format")
    sources = []
    if table.get("path") is not None:
        sources += as_sources(table["path"], fmt, "data.path")
    if table.get("sources") is not None:
        if not isinstance(table["sources"], list):
            raise DataError("data.sources: must be a list of tables {path, format, weight} ([[data.sources]])")
        sources += as_sources(table["sources"], fmt, "data.sources")
    if not sources:
        raise DataError("data.path: required: a data file, a list of files, or [[data.sources]] tables")
    held = table.get("eval_path")
    txt_split = table.get("txt_split", "blank_line")
    if txt_split not in TXT_SPLITS:
        raise DataError(f"data.txt_split: must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
    return {"sources": sources, "format": fmt, "roles": resolve_roles(table.get("roles")), "txt_split": txt_split,
            "eval_sources": as_sources(held, fmt, "data.eval_path", weights=False) if held is not None else []}


def weighted_count(n: int, weight: float) -> int:
    """How many examples n records of a source with `weight` give per epoch (see the module docstring)."""
    whole = int(weight)
    return whole * n + int((weight - whole) * n + 0.5)


def apply_weight(items: list, weight: float, seed: int) -> list:
    """floor(weight) copies of `items`, then a seeded random round(frac(weight) * len) of them (in order)."""
    whole = int(weight)
    extra = weighted_count(len(items), weight) - whole * len(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), extra)) if extra else []
    return list(items) * whole + [items[i] for i in picked]


# ---------------------------------------------------------------------------------------------------- reading


def exists(path: str | Path) -> bool:
    """Path.exists(), False for a path the file system cannot even look up (too long, a NUL byte)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "." not in Path(name).suffix


def read_file(path: str | Path, *, txt_split: str = "blank_line") -> Iterator[Record | Bad]:
    """Each record of a local file in order, streamed, or a Bad for each unreadable one; DataError if the file
    as a whole cannot be read (missing, a folder, an unsupported type, UTF-16 or binary)."""
    p, name = Path(path), str(path)
    try:
        exists, is_file = p.exists(), p.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise DataError(f"{name[:200]}: not a usable path ({getattr(e, 'strerror', None) or e})") from None
    if not exists:
        raise DataError(f"{name}: file not found")
    if not is_file:
        raise DataError(f"{name}: not a file")
    suffix = p.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{name}: unsupported file type {p.suffix or '(no extension)'!r}; "
                        "expected .jsonl, .json, .csv, .parquet or .txt")
    if txt_split not in TXT_SPLITS:
        raise DataError(f"data.txt_split: must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
    if suffix == ".parquet":
        yield from read_parquet(name)
        return
    try:
        f = open(p, "rb")
    except OSError as e:
        raise DataError(f"{name}: cannot open the file ({e.strerror or e})") from None
    with f:
        check_text_file(name, f)
        if suffix == ".json":
            yield from read_json(name, f, read_jsonl)
        elif suffix == ".csv":
            yield from read_csv(name, f)
        elif suffix == ".txt":
            yield from read_txt(name, f, txt_split)
        else:
            yield from read_jsonl(name, f)


def load_records(path: str | Path, *, txt_split: str = "blank_line") -> list[Record]:
    """Every record of a local .jsonl / .json / .csv / .parquet / .txt file (or a hub dataset `org/name` when
    online); DataError listing the unreadable ones, or if the file is empty."""
    if not Path(path).exists() and looks_like_hub_id(str(path)):
        return _read_hub(str(path))
    check = FileCheck(str(path))
    records = []
    for item in read_file(path, txt_split=txt_split):
        if isinstance(item, Bad):
            check.add(item.where, item.message)
        else:
            records.append(item)
    if check.count:
        raise problems_error(check.path, check.problems, check.count, what="unreadable record")
    if not records:
        raise DataError(f"{path}: no records (the dataset is empty)")
    return records


def _read_hub(name: str) -> list[Record]:
    """A hub dataset by name (`org/name`, its train split), when online and `datasets` is installed."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise DataError(f"{name}: not a local file, and HF_HUB_OFFLINE is set: the hub dataset cannot be fetched")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name}: not a local file; to read it as a hub dataset, pip install datasets") from None
    try:
        ds = load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's input problem here
        raise DataError(f"{name}: cannot load the hub dataset: {exc}") from None
    return [Record(dict(row), name, f"record index {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------------- checking


@dataclass
class FileCheck:
    """What reading and checking one file found: its format, record counts and first problems."""

    path: str
    format: str | None = None  # as set, or detected from the first record (None: not detected)
    records: int = 0  # readable records
    valid: int = 0
    problems: list[str] = field(default_factory=list)  # the first max_problems, "line 3: why"
    count: int = 0  # all problems
    max_problems: int = MAX_REPORTED

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(f"{where}: {why}")

    def error(self) -> DataError | None:
        return problems_error(self.path, self.problems, self.count) if self.count else None


class Checked(NamedTuple):
    record: Record
    format: str
    messages: list | None  # a chat record's turns as template messages (data_chat.conversation)


def check_records(source: Source, *, check: FileCheck, roles: Mapping[str, str] | None = None, tokenizer: Any = None,
                  txt_split: str = "blank_line") -> Iterator[Checked]:
    """The valid records of `source` with their format, streamed; every other record is a problem in `check`.

    The format is the source's, or detected from its first readable record; a .txt file is text. With a
    tokenizer, chat records are also checked against its chat template (no template: DataError; tool turns or
    tool calls it does not render: a problem). DataError when the file as a whole cannot be read."""
    roles = roles or DEFAULT_ROLES
    fmt: str | None = source.format
    if Path(source.path).suffix.lower() == ".txt":
        if fmt not in ("auto", "text"):
            raise DataError(f"{source.path}: a .txt file holds plain text: its format is text, not {fmt}")
        fmt = "text"
    support, detected = None, fmt != "auto"
    if detected:
        support = template_check(tokenizer, fmt, source.path)
    for item in read_file(source.path, txt_split=txt_split):
        if isinstance(item, Bad):
            check.add(item.where, item.message)
            continue
        check.records += 1
        if not detected:
            detected = True
            fmt, why = format_of(item.data)
            if fmt is None:
                check.add(item.where, why)
                continue
            support = template_check(tokenizer, fmt, source.path)
        if fmt is None or fmt == "auto":
            continue  # undetected: the first record's problem says why
        problems, messages = check_record(item.data, fmt, roles)
        if not problems:
            problems = template_record_problems(item.data, fmt, support, roles, messages)
        if problems:
            check.add(item.where, "; ".join(problems))
            continue
        check.valid += 1
        check.format = fmt
        yield Checked(item, fmt, messages)
    check.format = fmt if fmt != "auto" else None
    if not check.records and not check.count:
        raise DataError(f"{source.path}: no records (the dataset is empty)")
