"""What an import produced: the spec's settings with the key each came from, every key not mapped with why, and
the terms of the estimate that differ from the other tool's run.

`Collector` is what the per-tool readers (axolotl.py, llamafactory.py) write into. It tracks which of the config's
top-level keys were read, so that every key is accounted for: mapped, not mapped with a reason, or left empty.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ...schemas import Problem

IGNORED, UNSUPPORTED, UNKNOWN = "no effect", "not supported", "unknown"


@dataclass(frozen=True)
class Mapped:
    key: str  # the spec key, dotted: "training.micro_batch_size"
    value: object
    source: str  # the other tool's key(s) as written, or "(axolotl default)"
    note: str = ""


@dataclass(frozen=True)
class Unmapped:
    key: str  # the other tool's key as written
    value: object
    reason: str
    # IGNORED: nothing the estimate depends on | UNSUPPORTED: changes memory or the method | UNKNOWN
    kind: str = IGNORED


@dataclass(frozen=True)
class Difference:
    term: str  # the estimate's component: weights, gradients, optimizer, activations, logits, ...
    text: str
    source: str


@dataclass
class Imported:
    tool: str  # "axolotl" | "LLaMA-Factory"
    source: Path
    mapped: list[Mapped]
    unmapped: list[Unmapped]
    differences: list[Difference]
    assumptions: list[str]
    empty_keys: list[str]  # keys written without a value: the tool's defaults apply
    report: object | None = None  # planner.report.EstimateReport of the imported spec, once estimated

    def spec_dict(self) -> dict:
        out: dict = {}
        for m in self.mapped:
            table, _, key = m.key.partition(".")
            out.setdefault(table, {})[key] = m.value
        return out

    def value(self, key: str, default=None):
        return next((m.value for m in self.mapped if m.key == key), default)

    @property
    def method(self) -> str:
        return self.value("method.name", "auto")


@dataclass
class Collector:
    """The per-tool readers' scratchpad: settings, skipped keys, differences, assumptions and problems."""

    tool: str
    data: dict
    lines: dict[str, int] = field(default_factory=dict)  # top-level key -> line in the YAML file
    mapped: dict[str, Mapped] = field(default_factory=dict)
    unmapped: list[Unmapped] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    read: set[str] = field(default_factory=set)

    def get(self, key: str, default=None):
        """The config's value for a top-level key (None when absent or empty), marking the key as read."""
        self.read.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def set(self, key: str, value, source: str, note: str = "") -> None:
        self.mapped[key] = Mapped(key, value, source, note)

    def default(self, key: str, value, why: str = "") -> None:
        """Pin the tool's own default for a setting the config leaves out (so the estimate is of *its* run)."""
        if key not in self.mapped:
            self.set(key, value, f"({self.tool} default)", why)

    def skip(self, key: str, reason: str, kind: str = IGNORED, value=None) -> None:
        self.read.add(key)
        if value is None:
            value = self.data.get(key)
        self.unmapped.append(Unmapped(key, value, reason, kind))

    def unsupported(self, key: str, reason: str, term: str | None = None, differs: str | None = None) -> None:
        """A setting that changes memory or the method which peftplan cannot reproduce; `differs` says what that
        changes in the estimate's `term`."""
        self.skip(key, reason, UNSUPPORTED)
        if term and differs:
            self.differ(term, differs, key)

    def differ(self, term: str, text: str, source: str) -> None:
        self.differences.append(Difference(term, text, source))

    def assume(self, text: str) -> None:
        self.assumptions.append(text)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message, self.lines.get(key.split(".")[0].split("[")[0])))

    def finish(self, source: Path, ignored: dict[str, str]) -> Imported:
        """Account for every key not read: a reason from `ignored`, or 'unknown'; empty keys listed apart."""
        import re

        empty = [k for k, v in self.data.items() if v is None or v == "" or v == [] or v == {}]
        used = {w for m in self.mapped.values() for w in re.findall(r"[A-Za-z0-9_]+", m.source)}
        used |= {u.key.split(".")[0].split("[")[0] for u in self.unmapped} | {d.source for d in self.differences}
        for key, value in self.data.items():
            if key in empty or (key in self.read and key in used):
                continue
            if key in self.read:  # read, and at this value it asks for nothing (load_in_8bit: false)
                self.unmapped.append(Unmapped(key, value, "at this value it asks for nothing the spec has to say",
                                              IGNORED))
            elif key in ignored:
                self.unmapped.append(Unmapped(key, value, ignored[key], IGNORED))
            else:
                self.unmapped.append(Unmapped(key, value, f"not a key peftplan's {self.tool} import knows: its "
                                                          "effect on memory is not estimated", UNKNOWN))
        order = {k: n for n, k in enumerate(self.data)}
        self.unmapped.sort(key=lambda u: order.get(u.key.split(".")[0].split("[")[0], len(order)))
        return Imported(self.tool, source, list(self.mapped.values()), self.unmapped, self.differences,
                        self.assumptions, empty)


def shown(value, limit: int = 80) -> str:
    """A config value as one short printable line (bounded work: YAML anchors can make huge shared trees)."""
    text = _walk(value, budget=[200])
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else f"\\x{ord(ch):02x}" if ord(ch) < 256
                   else f"\\u{ord(ch):04x}" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _walk(value, budget: list[int]) -> str:
    budget[0] -= 1
    if budget[0] < 0:
        return "…"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if budget[0] < 0:
                parts.append("…")
                break
            parts.append(f"{_walk(k, budget)}: {_walk(v, budget)}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        parts = []
        for v in value:
            if budget[0] < 0:
                parts.append("…")
                break
            parts.append(_walk(v, budget))
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, str):
        return value[:200]
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)[:200]


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"
