"""Record formats: detection, validation, and rendering into (text, trained) segments.

Formats (one record = one dict):
- chat:        {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...]}
               rendered with the tokenizer's chat template; only assistant turns are trained.
- sharegpt:    {"conversations": [{"from": "human|gpt|system|...", "value": "..."}, ...], "system": "..." (optional)}
               roles mapped to chat roles (data_chat.DEFAULT_ROLES, extended by data.roles), then like chat.
- instruction: {"instruction": "...", "input": "..." (optional), "output": "..."}
               rendered with INSTRUCTION_PROMPT / INSTRUCTION_PROMPT_NO_INPUT; only `output` is trained.
- completion:  {"prompt": "...", "completion": "..."}  concatenated as is; only `completion` is trained.
- text:        {"text": "..."}  every token is trained (plain .txt files are read as text records).

Every format becomes (text, trained) segments, so files of different formats can be mixed in one run.
Standard library only; the tokenizer is duck-typed (`apply_chat_template`, `chat_template`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .data_chat import (
    DEFAULT_ROLES,
    ROLES,
    cap_messages,
    chat_segments,
    conversation,
    record_tools,
    template_problems,
    template_support,
    turns_key,
    unicode_problem,
)

FORMATS = ("chat", "sharegpt", "instruction", "completion", "text")
CHAT_FORMATS = ("chat", "sharegpt")
MAX_REPORTED = 10  # bad records listed in one DataError

# The keys that identify each format in `format="auto"`.
SIGNATURES = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}

INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

__all__ = ["FORMATS", "CHAT_FORMATS", "SIGNATURES", "ROLES", "DataError", "Record", "problems_error", "format_of",
           "detect_format", "check_record", "validate_record", "template_check", "segments", "instruction_prompt",
           "unknown_format"]


class DataError(ValueError):
    """A dataset problem found before training; the message names the file and the line / record.

    `problems` lists each problem on its own, located: "data.jsonl, line 3: missing field 'output' (...)".
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Record:
    """One record and where it came from, for error messages."""

    data: dict
    path: str
    where: str  # "line 3" (JSONL, CSV, TXT: the line the record starts on) | "line 2 (record index 0)" (JSON)
    #             | "record index 2" (Parquet, hub datasets)

    @property
    def location(self) -> str:
        return f"{self.path}, {self.where}"


def problems_error(path: str, problems: list[str], total: int | None = None, what: str = "invalid record") -> DataError:
    """One DataError for the problems of one file, each "line 3: ..." (located in the file, not naming it).

    One problem is one line, "data.jsonl, line 3: ..."; several are a head line naming the file and count, then
    the first MAX_REPORTED problems, one per line.
    """
    total = len(problems) if total is None else total
    shown = problems[:MAX_REPORTED]
    located = [f"{path}, {p}" for p in shown]
    if total == 1 and len(shown) == 1:
        return DataError(located[0], located)
    head = f"{path}: {total} {what}{'s' if total != 1 else ''}"
    if total > len(shown):
        head += f" (first {len(shown)} shown)"
    return DataError(head + ":\n  " + "\n  ".join(shown), located)


def unknown_format(fmt: Any) -> DataError:
    return DataError(f"unknown data format {fmt!r}; expected one of: {', '.join(FORMATS)} or auto")


def _keys(data: dict) -> str:
    keys = sorted(str(k)[:40] for k in data)
    return (", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")) or "(none)"



def format_of(data: dict) -> tuple[str | None, str]:
    """The format whose signature keys `data` has, or None and why (no format, or several, match)."""
    found = [fmt for fmt, keys in SIGNATURES.items() if all(k in data for k in keys)]
    if len(found) == 1:
        return found[0], ""
    if not found:
        expected = "; ".join(f"{'+'.join(keys)} ({fmt})" for fmt, keys in SIGNATURES.items())
        return None, (f"cannot detect the data format from the keys found: {_keys(data)}. "
                      f"Expected one of: {expected}; or set the format explicitly.")
    return None, (f"ambiguous data format, the keys found ({_keys(data)}) match {' and '.join(found)}; "
                  f"set the format explicitly to one of {', '.join(found)}.")


def detect_format(records: list[Record]) -> str:
    """The format of the first record (see format_of); DataError naming its location if none or several match."""
    if not records:
        raise DataError("no records to detect the format from")
    fmt, why = format_of(records[0].data)
    if fmt is None:
        raise DataError(f"{records[0].location}: {why}", [f"{records[0].location}: {why}"])
    return fmt


def _check_str(data: dict, key: str, problems: list[str], required: bool = True, allow_empty: bool = False):
    value = data.get(key)
    if value is None:
        if required:
            problems.append(f"missing field '{key}'")
    elif not isinstance(value, str):
        problems.append(f"field '{key}' must be a string, got {type(value).__name__}")
    elif not allow_empty and not value.strip():
        problems.append(f"field '{key}' is empty")
    else:
        bad = unicode_problem(value)
        if bad:
            problems.append(f"field '{key}' {bad}")


def check_record(data: dict, fmt: str, roles: Mapping[str, str] | None = None) -> tuple[list[str], list | None]:
    """(problems without the location, the template messages of a valid chat record or None)."""
    problems: list[str] = []
    messages = None
    if fmt in CHAT_FORMATS:
        messages, problems = conversation(data, fmt, roles or DEFAULT_ROLES)
    elif fmt == "instruction":
        _check_str(data, "instruction", problems)
        _check_str(data, "input", problems, required=False, allow_empty=True)
        _check_str(data, "output", problems)
    elif fmt == "completion":
        _check_str(data, "prompt", problems, allow_empty=True)
        _check_str(data, "completion", problems)
    elif fmt == "text":
        _check_str(data, "text", problems)
    else:
        raise unknown_format(fmt)
    if problems:
        problems = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
        problems[-1] += f" (format '{fmt}'; keys found: {_keys(data)})"
    return problems, messages


def validate_record(data: dict, fmt: str, roles: Mapping[str, str] | None = None) -> list[str]:
    """Problems with one record for `fmt` (empty when fine), without the location."""
    return check_record(data, fmt, roles)[0]


def template_check(tokenizer, fmt: str, path: str) -> Any:
    """For chat formats: the template's TemplateSupport (DataError naming `path` if there is no template)."""
    if fmt not in CHAT_FORMATS or tokenizer is None:
        return None
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: the data is in {fmt} format but the tokenizer has no chat template; use a "
                        "tokenizer that has one, set tokenizer.chat_template, or use the instruction/completion format")
    return template_support(tokenizer)


def template_record_problems(data: dict, fmt: str, support, roles: Mapping[str, str] | None = None,
                             messages: list | None = None) -> list[str]:
    """Turns of a valid chat record that the template would not render (tool turns, tool calls)."""
    if support is None or fmt not in CHAT_FORMATS or (support.tool_messages and support.tool_calls):
        return []
    if messages is None:
        messages = conversation(data, fmt, roles or DEFAULT_ROLES)[0] or []
    found = template_problems(messages, support, turns_key(fmt))
    return found[:5] + ([f"and {len(found) - 5} more turns like these"] if len(found) > 5 else [])


def instruction_prompt(data: dict) -> str:
    extra = data.get("input") or ""
    if extra.strip():
        return INSTRUCTION_PROMPT.format(instruction=data["instruction"], input=extra)
    return INSTRUCTION_PROMPT_NO_INPUT.format(instruction=data["instruction"])


def segments(data: dict, fmt: str, tokenizer, roles: Mapping[str, str] | None = None,
             cap: int | None = None) -> tuple[list[tuple[str, bool]], bool]:
    """The record as (text, trained) pieces in order, and whether they were cut short.

    cap: for chat formats, the most characters of message content to render, and of rendered text to split into
    turns; the conversation is cut after the message that reaches it (data_tokens picks a cap that keeps every
    token within seq_len).
    """
    if fmt in CHAT_FORMATS:
        messages, problems = conversation(data, fmt, roles or DEFAULT_ROLES)
        if messages is None:
            raise DataError("; ".join(problems))
        cut = False
        if cap is not None:
            messages, cut = cap_messages(messages, cap)
        pieces, stopped = chat_segments(messages, tokenizer, record_tools(data)[0], cap)
        return pieces, cut or stopped
    if fmt == "instruction":
        return [(instruction_prompt(data), False), (data["output"], True)], False
    if fmt == "completion":
        return [(data.get("prompt") or "", False), (data["completion"], True)], False
    if fmt == "text":
        return [(data["text"], True)], False
    raise unknown_format(fmt)
