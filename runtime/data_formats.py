"""Record formats: detection, validation, and rendering into (text, trained) segments.

Formats (one record = one dict):
- chat:        {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
               rendered with the tokenizer's chat template; only assistant turns are trained.
- instruction: {"instruction": "...", "input": "..." (optional), "output": "..."}
               rendered with INSTRUCTION_PROMPT / INSTRUCTION_PROMPT_NO_INPUT; only `output` is trained.
- completion:  {"prompt": "...", "completion": "..."}  concatenated as is; only `completion` is trained.
- text:        {"text": "..."}  every token is trained.

Standard library only; the tokenizer is duck-typed (`apply_chat_template`, `chat_template`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("chat", "instruction", "completion", "text")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10  # bad records listed in one DataError

# The keys that identify each format in `format="auto"`.
SIGNATURES = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}

INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(ValueError):
    """A dataset problem found before training; the message names the file and the line / row / record."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Record:
    """One record and where it came from, for error messages."""

    data: dict
    path: str
    where: str  # "line 3" (JSONL, 1-based) | "row 4" (CSV, header = row 1) | "record index 2" (JSON, Parquet)

    @property
    def location(self) -> str:
        return f"{self.path}, {self.where}"


def problems_error(path: str, problems: list[str], total: int | None = None, what: str = "invalid record") -> DataError:
    """One DataError listing the first MAX_REPORTED problems (each already prefixed with its location)."""
    total = len(problems) if total is None else total
    shown = problems[:MAX_REPORTED]
    head = f"{path}: {total} {what}{'s' if total != 1 else ''}"
    if total > len(shown):
        head += f" (first {len(shown)} shown)"
    return DataError(head + ":\n  " + "\n  ".join(shown), shown)


def _keys(data: dict) -> str:
    return ", ".join(sorted(map(str, data))) or "(none)"


def detect_format(records: list[Record]) -> str:
    """The format whose signature keys the first record has; DataError if none or several match."""
    if not records:
        raise DataError("no records to detect the format from")
    first = records[0]
    found = [fmt for fmt, keys in SIGNATURES.items() if all(k in first.data for k in keys)]
    expected = "; ".join(f"{'+'.join(keys)} ({fmt})" for fmt, keys in SIGNATURES.items())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{first.location}: cannot detect the data format from the keys found: {_keys(first.data)}. "
                        f"Expected one of: {expected}; or set the format explicitly.")
    raise DataError(f"{first.location}: ambiguous data format, the keys found ({_keys(first.data)}) match "
                    f"{' and '.join(found)}; set the format explicitly to one of {', '.join(found)}.")


def chat_messages(data: dict) -> Any:
    """`messages` as a list; a JSON string (CSV cell) is decoded. Returned unchanged if it isn't decodable."""
    messages = data.get("messages")
    if isinstance(messages, str):
        try:
            return json.loads(messages)
        except json.JSONDecodeError:
            return messages
    return messages


def _check_str(data: dict, key: str, problems: list[str], required: bool = True, allow_empty: bool = False):
    value = data.get(key)
    if value is None:
        if required:
            problems.append(f"missing field '{key}'")
    elif not isinstance(value, str):
        problems.append(f"field '{key}' must be a string, got {type(value).__name__}")
    elif not allow_empty and not value.strip():
        problems.append(f"field '{key}' is empty")


def _check_chat(data: dict, problems: list[str]):
    if data.get("messages") is None:
        problems.append("missing field 'messages'")
        return
    messages = chat_messages(data)
    if not isinstance(messages, list) or not messages:
        problems.append("'messages' must be a non-empty list of {role, content} objects")
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] must be an object, got {type(m).__name__}")
        elif m.get("role") not in ROLES:
            problems.append(f"messages[{i}] has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        elif not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}] ({m['role']}) needs a string 'content'")
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append("no assistant turn (nothing to train on)")


def validate_record(data: dict, fmt: str) -> list[str]:
    """Problems with one record for `fmt` (empty when fine), without the location."""
    problems: list[str] = []
    if fmt == "chat":
        _check_chat(data, problems)
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
        raise DataError(f"unknown data format {fmt!r}; expected one of: {', '.join(FORMATS)} or auto")
    if problems:
        problems[-1] += f" (format '{fmt}'; keys found: {_keys(data)})"
    return problems


def instruction_prompt(data: dict) -> str:
    extra = data.get("input") or ""
    if extra.strip():
        return INSTRUCTION_PROMPT.format(instruction=data["instruction"], input=extra)
    return INSTRUCTION_PROMPT_NO_INPUT.format(instruction=data["instruction"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) pieces, trained = an assistant turn.

    Each assistant turn's text is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True),
    so the spans are right for any template that renders a conversation's prefixes as prefixes of the whole.
    Messages after the last assistant turn are dropped (nothing to train on).
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt = _render(tokenizer, messages[:i], True)
        except Exception:
            if i:
                raise
            prompt = ""  # a conversation that opens with the assistant, and a template that can't render []
        full = _render(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"the chat template does not render message {i} (assistant) after the text rendered "
                             "for the messages before it; its assistant spans cannot be found by prefix rendering")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return segments


def segments(data: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The record as (text, trained) pieces in order; tokenized piece by piece by data.tokenize_record."""
    if fmt == "chat":
        return chat_segments(chat_messages(data), tokenizer)
    if fmt == "instruction":
        return [(instruction_prompt(data), False), (data["output"], True)]
    if fmt == "completion":
        return [(data.get("prompt") or "", False), (data["completion"], True)]
    if fmt == "text":
        return [(data["text"], True)]
    raise DataError(f"unknown data format {fmt!r}; expected one of: {', '.join(FORMATS)} or auto")
