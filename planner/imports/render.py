"""The imported spec as commented TOML, and writing it without ever replacing a file by surprise.

Values are written by tomli_w (quoting and escaping are its job); comments carry only printable text. The header
says where the spec came from, what was assumed and where the estimate differs from the other tool's run; each
setting names the key it came from; the footer lists every key that was not mapped, with why.
"""

from __future__ import annotations

import os
import textwrap
import unicodedata
from pathlib import Path

import tomli_w

from ...schemas import Problem, SpecError
from .result import IGNORED, UNKNOWN, UNSUPPORTED, Imported, shown

TABLES = ("model", "data", "hardware", "method", "training", "objective", "logging")
WIDTH = 116


def clean(text: str) -> str:
    """One line of comment text: control and format characters (newlines, escapes, bidi overrides) made visible."""
    return "".join(ch if unicodedata.category(ch)[0] != "C" else f"\\u{ord(ch):04x}" for ch in str(text))


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(clean(text), WIDTH, initial_indent=f"# {indent}", subsequent_indent=f"#   {indent}",
                         break_long_words=False, break_on_hyphens=False) or ["#"]


def _assignment(key: str, value, source: str) -> list[str]:
    """`key = value  # source`, or the source on the line above when the value is long."""
    line = tomli_w.dumps({key: value}).strip()
    if len(line) <= 40:
        return [f"{line:<40} # {clean(source)}"]
    return [*_comment(source), line]


def to_toml(result: Imported, config_name: str, version: str) -> str:
    tool = result.tool
    out = _comment(f"A peftplan spec imported from the {tool} config {config_name} (peftplan import, peftplan "
                   f"{version}). Every setting that changes memory, time or the method is pinned to the value {tool} "
                   f"runs with, so that `peftplan estimate` describes that run; after each setting, the {tool} key it "
                   "came from. Edit it freely: it is an ordinary spec.")
    if result.assumptions:
        out += ["#", "# Assumed (check these):"]
        for a in result.assumptions:
            out += _comment(f"- {a}", "  ")
    if result.differences:
        out += ["#", f"# Where the estimate differs from {tool}'s run:"]
        for d in result.differences:
            out += _comment(f"- {d.term} ({d.source}): {d.text}", "  ")
    spec = result.spec_dict()
    for table in TABLES:
        items = [m for m in result.mapped if m.key.split(".")[0] == table]
        if not items:
            continue
        out += ["", f"[{table}]"]
        arrays = []
        for m in items:
            key = m.key.split(".", 1)[1]
            if isinstance(m.value, list) and m.value and isinstance(m.value[0], dict):
                arrays.append((key, m))
                continue
            if m.note:
                out += _comment(m.note)
            out += _assignment(key, m.value, m.source)
        if table == "data" and "num_examples" not in spec.get("data", {}):
            out.append("# num_examples = 10000                  # not known until the data is read: set it for "
                       "time and cost")
        for key, m in arrays:
            for item in m.value:
                out += ["", f"[[{table}.{key}]]"]
                for k, v in item.items():
                    out += _assignment(k, v, m.source)
    out += _unmapped(result)
    return _visible("\n".join(out) + "\n")


def _visible(text: str) -> str:
    """Characters that reorder or hide text on a terminal (bidi overrides, line separators) as TOML escapes: they can
    only be inside quoted strings here (comments are cleaned, keys are fixed), where the escape means the same."""
    def esc(ch: str) -> str:
        if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Co", "Zl", "Zp"):
            return ch
        return f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"
    return "".join(esc(ch) for ch in text)


def _unmapped(result: Imported) -> list[str]:
    out = []
    for kind, title in ((UNSUPPORTED, "not supported (they change memory or the method; see above for what)"),
                        (UNKNOWN, f"unknown to peftplan's {result.tool} import"),
                        (IGNORED, "no effect on the estimate")):
        group = [u for u in result.unmapped if u.kind == kind]
        if group:
            out += ["", f"# Not mapped, {title}:"]
            for u in group:
                out += _comment(f"- {u.key} = {shown(u.value, 60)}: {u.reason}", "  ")
    if result.empty_keys:
        out += ["", f"# Left empty in the config ({result.tool}'s defaults apply):"]
        out += _comment(", ".join(result.empty_keys), "  ")
    return out


def write_spec(path: Path, text: str, *, force: bool) -> Path:
    """Create `path` (never replacing an existing file unless `force`, and never a directory or anything that is not
    a regular file). SpecError (exit 2) for a refusal; OSError when the file system refuses."""
    try:
        exists = os.path.lexists(path)
        is_file = path.is_file() and not path.is_symlink()
    except (OSError, ValueError) as exc:
        raise SpecError([Problem("-o", f"{shown(str(path))}: not a usable path ({exc})")]) from None
    if exists and not force:
        raise SpecError([Problem("-o", f"{shown(str(path))} exists: pass --force to replace it, or choose another "
                                       "file")])
    if exists and not is_file:
        raise SpecError([Problem("-o", f"{shown(str(path))} exists and is not a regular file (a folder or a link): "
                                       "not replaced, even with --force")])
    if not path.parent.is_dir():
        raise SpecError([Problem("-o", f"the folder {shown(str(path.parent))} does not exist")])
    data = text.encode("utf-8")
    if not exists:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # fails if anything appeared meanwhile
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
