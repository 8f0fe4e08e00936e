"""The prompts `sample.py` completes: from a file the user gives, or from the plan's data.

From a file (`--prompts FILE`), through the same readers as training data (data_files.read_file):
- .jsonl / .json / .csv / .parquet records, each one of
    {"prompt": "..."}                          plain text; wrapped as one user turn when the training data is chat
    {"messages": [...]} / {"conversations": [...]}   chat: the conversation up to its last user turn
    {"instruction": "...", "input": "..."}    the instruction prompt training used
    {"text": "..."}                            plain text, like "prompt"
  A record that also has the answer (an assistant turn after the last user turn, "completion", "output") keeps it as
  the reference.
- .txt: one prompt per line; or, when the file has blank lines, one prompt per blank-line-separated block.

From the plan (the default): the held-out split training used (data.eval_path, or the same seeded
data.eval_fraction split as data.prepare_data), or, with none, the first training records (the model has seen
them: the note says so). Each record gives its prompt as above, and its answer in the data as the reference;
a text record is cut after the middle word: the first half is the prompt, the rest the reference.

Standard library only; the tokenizer is duck-typed (chat template checks and rendering, as data_chat).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_chat import DEFAULT_ROLES, conversation, record_tools, render_chat
from .data_files import FileCheck, read_file
from .data_formats import CHAT_FORMATS, DataError, Record, instruction_prompt
from .data_read import Bad

PROMPT_KEYS = ("messages", "conversations", "instruction", "prompt", "text")


@dataclass(frozen=True)
class Prompt:
    source: str  # "data.jsonl:17": the file and the line (or record index) it came from
    messages: list | None = None  # chat: the conversation up to and including the last user turn
    text: str | None = None  # not chat: the text itself
    tools: list | None = None  # a chat record's tool schemas, passed to the template
    reference: str | None = None  # the answer in the data, when there is one

    def render(self, tokenizer) -> tuple[str, bool]:
        """(the model's input text, whether the tokenizer adds its special tokens): a chat prompt through the chat
        template with the assistant's turn opened (the template writes its own BOS, as in training); plain text
        as it is, with the tokenizer's own prefix (a BOS), as training tokenized non-chat records."""
        if self.messages is not None:
            return render_chat(tokenizer, self.messages, True, self.tools), False
        return self.text or "", True


def where(record: Record, base: Path | None = None) -> str:
    """`file:line` for a record ("data.jsonl:17"); a path inside `base` is shown relative to it."""
    path = Path(record.path)
    if base is not None:
        try:
            path = path.resolve().relative_to(Path(base).resolve())
        except (ValueError, OSError):
            pass
    m = re.match(r"line (\d+)", record.where)
    return f"{path}:{m.group(1) if m else record.where}"


def _chat(data: dict, fmt: str, roles: Mapping[str, str]) -> tuple[list | None, str | None, str]:
    """(messages up to the last user turn, the assistant's answer after it or None, problem)."""
    key = "conversations" if fmt == "sharegpt" else "messages"
    turns = data.get(key)
    if isinstance(turns, list):  # a prompt may end with the user's turn: conversation() wants an assistant turn
        name = next((k for k, v in roles.items() if v == "assistant"), "assistant")
        reply = {"from": name, "value": ""} if turns and isinstance(turns[-1], dict) and "from" in turns[-1] \
            else {"role": name, "content": ""}
        data = {**data, key: turns + [reply]}
    messages, problems = conversation(data, fmt, roles)
    if messages is None:
        return None, None, "; ".join(problems)
    messages = messages[:-1] if isinstance(turns, list) else messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return None, None, f"'{key}' has no user turn to answer"
    last = users[-1]
    after = [m.get("content") for m in messages[last + 1:] if m["role"] == "assistant" and m.get("content")]
    return messages[: last + 1], (after[0] if after else None), ""


def _half(text: str) -> tuple[str, str | None]:
    """A text cut after its middle word: (prompt, rest)."""
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        return text, None
    end = words[len(words) // 2 - 1].end()
    return text[:end], text[end:].strip() or None


def prompt_of(data: dict, fmt: str | None, source: str, chat: bool,
              roles: Mapping[str, str] = DEFAULT_ROLES, from_data: bool = False) -> tuple[Prompt | None, str]:
    """The Prompt of one record (fmt: its data format, or None to go by its keys), or None and why.
    chat: plain prompts become one user turn. from_data: a text record is halved (prompt, reference)."""
    if fmt is None:
        key = next((k for k in PROMPT_KEYS if k in data), None)
        if key is None:
            return None, f"expected one of the keys {', '.join(PROMPT_KEYS)}; found {', '.join(map(str, data))[:200]}"
        fmt = {"messages": "chat", "conversations": "sharegpt", "instruction": "instruction"}.get(key, key)
    if fmt in CHAT_FORMATS:
        messages, reference, why = _chat(data, fmt, roles)
        tools = record_tools(data)[0]
        return (Prompt(source, messages=messages, tools=tools, reference=reference), "") if messages else (None, why)
    if fmt == "instruction":
        if not isinstance(data.get("instruction"), str) or not data["instruction"].strip():
            return None, "field 'instruction' must be a non-empty string"
        if not isinstance(data.get("input") or "", str):
            return None, "field 'input' must be a string"
        reference = data.get("output") if isinstance(data.get("output"), str) else None
        return Prompt(source, text=instruction_prompt(data), reference=reference), ""
    key = "prompt" if fmt in ("prompt", "completion") else "text"
    text = data.get(key)
    if not isinstance(text, str):
        return None, f"field '{key}' must be a string"
    reference = data.get("completion") if isinstance(data.get("completion"), str) else None
    if from_data and fmt == "text":
        text, reference = _half(text)
    if not text.strip() and not (from_data and fmt == "completion"):
        return None, f"field '{key}' is empty"
    if chat:
        return Prompt(source, messages=[{"role": "user", "content": text}], reference=reference), ""
    return Prompt(source, text=text, reference=reference), ""


def _txt_split(path: str) -> str:
    """"line" for a .txt file without blank lines between its lines, else "blank_line"."""
    docs = [r for r in read_file(path, txt_split="blank_line") if isinstance(r, Record)]
    return "line" if len(docs) == 1 and "\n" in docs[0].data["text"] else "blank_line"


def prompts_from_file(path: str | Path, *, chat: bool, roles: Mapping[str, str] = DEFAULT_ROLES,
                      limit: int | None = None) -> list[Prompt]:
    """Every prompt of a prompts file (the first `limit`); DataError naming the file and line of each bad one."""
    name = str(path)
    split = _txt_split(name) if Path(name).suffix.lower() == ".txt" and Path(name).is_file() else "blank_line"
    check, out = FileCheck(name), []
    for item in read_file(name, txt_split=split):
        if isinstance(item, Bad):
            check.add(item.where, item.message)
            continue
        prompt, why = prompt_of(item.data, None, where(item), chat, roles)
        if prompt is None:
            check.add(item.where, why)
        elif limit is None or len(out) < limit:
            out.append(prompt)
    if check.count:
        raise check.error()
    if not out:
        raise DataError(f"{name}: no prompts in the file")
    return out


def training_format(config: Any) -> str | None:
    """The training data's format: data.format, or detected from the first data file's first record (None when
    that file cannot be read here)."""
    from .data_formats import format_of

    fmt = config.data["format"]
    if fmt != "auto":
        return fmt
    source = config.data["sources"][0]
    if source.format != "auto":
        return source.format
    path = Path(source.path)
    path = path if path.is_absolute() else config.path.parent / path
    if path.suffix.lower() == ".txt":
        return "text"
    try:
        for item in read_file(path, txt_split=config.data["txt_split"]):
            if isinstance(item, Record):
                return format_of(item.data)[0]
    except DataError:
        return None
    return None


def prompts_from_plan(config: Any, tokenizer, limit: int) -> tuple[list[Prompt], str]:
    """The held-out split's first `limit` prompts (or the first training records when there is none), and a note
    saying which. Reads and checks the data as training did (data.prepare_data's loading, split and seed)."""
    from .config import data_arguments
    from .data import _load, split
    from .data_files import as_sources, rebase, resolve_roles

    args = data_arguments(config)
    base = config.path.parent
    roles = resolve_roles(args["roles"])
    sources = rebase(as_sources(args["sources"], args["format"]), base)
    held = rebase(as_sources(args["eval_path"], args["format"], "data.eval_path", weights=False), base) \
        if args["eval_path"] else []
    loaded = _load(sources + held, tokenizer, roles, args["txt_split"])
    train_part, eval_part = loaded[: len(sources)], loaded[len(sources):]
    fmts = [fmt for _, fmt in loaded]
    items = [(i, r) for i, (records, _) in enumerate(train_part) for r in records]
    if held:
        chosen = [(len(sources) + i, r) for i, (records, _) in enumerate(eval_part) for r in records]
        note = f"the held-out file{'s' if len(held) > 1 else ''} (data.eval_path)"
    else:
        train_items, chosen = split(items, args["eval_fraction"], args["seed"])
        note = f"the held-out split (data.eval_fraction = {args['eval_fraction']:g}, seed {args['seed']})"
    if not chosen:
        chosen = items
        note = ("the first training examples: this plan holds no examples out (data.eval_fraction = 0), so the "
                "model has seen these; set data.eval_fraction or pass --prompts FILE for unseen ones")
    out = []
    for i, record in chosen:
        if len(out) >= limit:
            break
        prompt, _ = prompt_of(record.data, fmts[i], where(record, base), False, roles, from_data=True)
        if prompt is not None:
            out.append(prompt)
    if not out:
        raise DataError(f"{config.path}: no usable prompt in {note}")
    return out, note
