"""Read a spec file into a `Spec`, collecting every problem at once.

Each problem names the key as written in the TOML (`training.micro_batch_size`) and, where the
key can be found in the file, its line. TOML syntax errors give the line and column.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .spec import Spec


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None = None
    severity: str = "error"  # "error" | "warning"
    column: int | None = None

    def render(self, path: str | Path | None = None) -> str:
        where = ""
        if path is not None:
            where = f"{path}: "
            if self.line:
                where = f"{path}:{self.line}:{self.column}: " if self.column else f"{path}:{self.line}: "
        label = "warning: " if self.severity == "warning" else ""
        return f"{where}{label}{self.key}: {self.message}" if self.key else f"{where}{label}{self.message}"


class SpecError(Exception):
    """The user's input is wrong. Carries every problem found, one line each."""

    def __init__(self, problems: list[Problem], path: str | Path | None = None):
        self.problems = problems
        self.path = path
        super().__init__("\n".join(p.render(path) for p in problems))

    def lines(self) -> list[str]:
        return [p.render(self.path) for p in self.problems]


MAX_SPEC_BYTES = 2**20  # a spec is a few hundred bytes; this bound keeps /dev/zero-like inputs from hanging


def read_spec_text(path: str | Path) -> str:
    """The spec's text: a regular file (not a FIFO or a device, which could block or never end), at most
    MAX_SPEC_BYTES, UTF-8, a leading byte-order mark accepted (as the data reader accepts it)."""
    p = Path(path)
    return read_small_text(p, MAX_SPEC_BYTES, "spec", f"pass a spec file such as {p}/spec.toml",
                           "; pass a spec file")


def read_small_text(p: Path, limit: int, what: str, directory_hint: str, special_hint: str = "",
                    kind: str | None = None) -> str:
    """A small UTF-8 input file the user names (a spec, another tool's config): a regular file of at most `limit`
    bytes, a leading byte-order mark accepted; every other case a SpecError saying which."""
    import stat

    try:
        st = p.stat()
    except FileNotFoundError:
        raise SpecError([Problem("", f"{what} file not found: {p}")]) from None
    except OSError as exc:
        raise SpecError([Problem("", f"cannot read {p}: {exc.strerror or exc}")]) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError([Problem("", f"{p} is a directory; {directory_hint}")])
    if not stat.S_ISREG(st.st_mode):
        raise SpecError([Problem("", f"{p} is not a regular file (a pipe or a device){special_hint}")])
    try:
        with p.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise SpecError([Problem("", f"cannot read {p}: {exc.strerror or exc}")]) from None
    if len(data) > limit:
        raise SpecError([Problem("", f"{p} is larger than {limit // 1024} KiB: not a {kind or what}")])
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem("", f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None


_TOML_POS = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def parse_toml(text: str, path: str | Path = "spec") -> dict:
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise SpecError([Problem("", "TOML nested too deeply to be a spec")], path) from None
    except tomllib.TOMLDecodeError as exc:
        text_msg = str(exc)
        if text_msg.endswith("(at end of document)"):
            end_line = text.count("\n") + 1
            end_col = len(text.rsplit("\n", 1)[-1]) + 1
            text_msg = f"{text_msg.removesuffix('(at end of document)').strip()} (at line {end_line}, column {end_col})"
        m = _TOML_POS.match(text_msg)
        if m:
            problem = Problem("", f"TOML syntax error: {m['msg']}", int(m["line"]), column=int(m["col"]))
        else:
            problem = Problem("", f"TOML syntax error: {text_msg}")
        raise SpecError([problem], path) from None


def load_spec(path: str | Path) -> Spec:
    """Parse and validate a spec file. Raises `SpecError` listing every problem."""
    text = read_spec_text(path)
    return spec_from_dict(parse_toml(text, path), text=text, path=path)


def spec_from_dict(data: dict, *, text: str = "", path: str | Path | None = None) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        lines = _KeyLines(text)
        problems = _merge_union_errors([_problem(err, lines) for err in exc.errors()], exc.errors())
        problems.sort(key=lambda p: (p.line or 10**9, p.key))
        raise SpecError(problems, path) from None


def _problem(err: dict, lines: _KeyLines) -> Problem:
    loc = [str(part) for part in err["loc"]]
    kind = err["type"]
    # pydantic adds the union member it tried ("list[str]", "literal['all-linear']") after the union field;
    # drop those tags, but never the user's own key (an unknown key is the last part of its loc)
    keep_last = kind == "extra_forbidden"
    loc = [part for n, part in enumerate(loc)
           if (keep_last and n == len(loc) - 1) or not (n > 0 and loc[n - 1] in _UNION_FIELDS
                                                      and part.startswith(("list[", "literal[", "function-")))]
    item = next((part for part in loc if part.isdigit()), None)
    loc = [part for part in loc if not part.isdigit()]
    key = ".".join(_printable(part) for part in loc)
    if item is not None:
        return Problem(key, f"item {item}: {_message(err)}", lines.find(loc))
    kind = err["type"]
    if kind == "extra_forbidden":
        import difflib

        parent, name = loc[:-1], loc[-1]
        choices = _fields_at(parent)
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = ".".join(parent) or "the top level"
        msg = f"unknown key{hint}; keys allowed in [{where}]: {', '.join(choices)}" if parent else (
            f"unknown table{hint}; tables allowed: {', '.join(choices)}")
        return Problem(key, msg, lines.find(loc))
    if kind == "missing":
        return Problem(key, "required key is missing", lines.find(loc[:-1]) if len(loc) > 1 else None)
    return Problem(key, _message(err), lines.find(loc))


def _expectation(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        return ctx["expected"]
    if kind.endswith("_type"):
        return "a " + kind.removesuffix("_type").replace("_", " ")
    return err["msg"].lower()


def _merge_union_errors(problems: list[Problem], errors: list[dict]) -> list[Problem]:
    """A value that matches no member of a union gives one line, not one per member."""
    by_key: dict[str, list[int]] = {}
    for n, p in enumerate(problems):
        by_key.setdefault(p.key, []).append(n)
    out: list[Problem] = []
    for key, idx in by_key.items():
        if len(idx) == 1:
            out.append(problems[idx[0]])
            continue
        got = errors[idx[0]].get("input")
        items = [problems[n].message for n in idx if problems[n].message.startswith("item ")]
        # an error inside a list member is about the list's items: "a list of strings", not "a string"
        wants = " or ".join(dict.fromkeys(
            f"a list of {_expectation(errors[n]).removeprefix('a ')}s" if problems[n].message.startswith("item ")
            else _expectation(errors[n]) for n in idx))
        detail = f"; {'; '.join(items)}" if items else ""
        out.append(Problem(key, f"must be {wants} (got {_shown(got)}){detail}", problems[idx[0]].line))
    return out


_UNION_FIELDS = {"target_modules"}


def _printable(part: str) -> str:
    """A key part as it can be shown on one line: quoted when it is not a plain TOML bare key."""
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part, ensure_ascii=False)


def _message(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    got = err.get("input")
    shown = _shown(got)
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']} (got {shown})"
    if kind == "greater_than":
        return f"must be > {ctx['gt']} (got {shown})"
    if kind == "less_than":
        return f"must be < {ctx['lt']} (got {shown})"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']:,} (got {shown})" if isinstance(ctx["le"], int) else \
            f"must be ≤ {ctx['le']} (got {shown})"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {shown})"
    if kind in ("string_too_short",):
        return "must not be empty"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a table, e.g. [{'.'.join(str(p) for p in err['loc'])}] (got {shown})"
    if kind == "too_short":
        return f"must not be empty (got {shown})"
    if kind == "finite_number":
        return f"must be a finite number (got {shown})"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{err['msg'].lower()} (got {shown})"
    return f"{err['msg']} (got {shown})"


def _shown(value) -> str:
    """A value as an error message quotes it: a table is "a table", and long values are cut."""
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text):,} characters)"


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Spec
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def locate(problems: list[Problem], path: str | Path) -> SpecError:
    """Attach the spec file and the keys' lines to problems found after loading (e.g. against the model)."""
    try:
        lines = _KeyLines(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return SpecError(problems, path)
    placed = [p if p.line or not p.key else Problem(p.key, p.message, lines.find(p.key.split(".")), p.severity)
              for p in problems]
    return SpecError(placed, path)


class _KeyLines:
    """Find the line where a dotted key is written, from the raw TOML text (best effort)."""

    _header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
    _assign = re.compile(r"^\s*([A-Za-z0-9_\-\". ]+?)\s*=")

    def __init__(self, text: str):
        self.index: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        inside = None  # the delimiter of the multi-line string the line is in, if any
        for number, line in enumerate(text.splitlines(), start=1):
            if inside is not None:  # the content of a multi-line string is no key and no header
                if line.count(inside) % 2 == 1:
                    inside = None
                continue
            for delim in ('"""', "'''"):
                if line.count(delim) % 2 == 1:
                    inside = delim
            m = self._header.match(line)
            if m:
                table = tuple(part.strip().strip('"') for part in m.group(1).split("."))
                self.index.setdefault(table, number)
                continue
            m = self._assign.match(line)
            if m:  # `key = …`, also dotted: `training.seed = 1` at top level, `lora.rank = 2` in a table
                parts = tuple(part.strip().strip('"') for part in m.group(1).split("."))
                self.index.setdefault(table + parts, number)

    def find(self, loc: list[str]) -> int | None:
        want = tuple(loc)
        if want not in self.index:  # a dotted key written under its table: `lora.rank = 2` in [method]
            deeper = [line for key, line in self.index.items() if key[: len(want)] == want]
            if deeper:
                return min(deeper)
        for end in range(len(loc), 0, -1):
            if (line := self.index.get(tuple(loc[:end]))) is not None:
                return line
        return None
