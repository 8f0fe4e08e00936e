"""Conversations: the `messages` (chat) and `conversations` (ShareGPT) layouts, role names, tool calls, and
rendering through the model's chat template into (text, trained) segments.

Both layouts accept turns written either way, and turn them into the messages chat templates expect:

    {"messages":      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "..."}

Role names are mapped with DEFAULT_ROLES, which `data.roles` extends or overrides, onto system / user /
assistant / tool, or `tool_call`: an assistant turn whose value is a call `{"name": ..., "arguments": {...}}`
(or a list of calls), as ShareGPT's `function_call` turns are. Assistant turns may carry OpenAI-style
`tool_calls`; tool turns keep `name` and `tool_call_id`. A record's `tools` (a list of function schemas, or
that list as a JSON string) is passed to the template. Only assistant turns are trained.

Standard library only; the tokenizer is duck-typed (`apply_chat_template`, `chat_template`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL = "tool_call"
ROLE_TARGETS = ROLES + (TOOL_CALL,)
DEFAULT_ROLES: dict[str, str] = {
    **{r: r for r in ROLES},
    "human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant", "function_call": TOOL_CALL, "observation": "tool", "function": "tool", "ipython": "tool",
}
KEPT_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")  # what a template sees of each message
MAX_DEPTH = 32  # nesting allowed inside tool calls and tool schemas


def turns_key(fmt: str) -> str:
    return "conversations" if fmt == "sharegpt" else "messages"


def decode_json_text(value: Any) -> Any:
    """A JSON string (a CSV cell, a ShareGPT `tools` column) decoded; returned unchanged if it isn't JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError, a 5000-digit number, deep nesting
            return value
    return value


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized (an unpaired surrogate from a JSON \\ud800 escape), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start} (not valid Unicode)"
    return None


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/objects nest deeper than `limit` (iterative: safe on any depth)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d >= limit:
                return True
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _one_call(call: Any) -> tuple[dict | None, str]:
    """{"type": "function", "function": {"name", "arguments"}} from OpenAI's form or a bare {"name", "arguments"}."""
    if not isinstance(call, dict):
        return None, f"a tool call must be an object, got {type(call).__name__}"
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return None, "a tool call needs a function 'name'"
    args = decode_json_text(fn.get("arguments", fn.get("parameters", {})))
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out, ""


def tool_calls(value: Any) -> tuple[list[dict] | None, str]:
    """A turn's calls as a list in OpenAI's form, or None and why not."""
    value = decode_json_text(value)
    calls = value if isinstance(value, list) else [value]
    if not calls:
        return None, "an empty list of tool calls"
    if too_deep(calls):
        return None, f"tool calls nested deeper than {MAX_DEPTH} levels"
    out = []
    for c in calls:
        one, why = _one_call(c)
        if one is None:
            return None, why
        out.append(one)
    return out, ""


def record_tools(data: dict) -> tuple[list | None, str]:
    """The record's `tools` (function schemas passed to the template), or None and a problem."""
    if data.get("tools") in (None, "", []):
        return None, ""
    tools = decode_json_text(data["tools"])
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return None, "field 'tools' must be a list of function schemas (objects), or that list as a JSON string"
    if too_deep(tools):
        return None, f"field 'tools' is nested deeper than {MAX_DEPTH} levels"
    return tools, ""


def _names(t: dict) -> tuple[str, str]:
    """The turn's role and text keys: from/value (ShareGPT) or role/content."""
    return ("from", "value") if "from" in t and "role" not in t else ("role", "content")


def _turn(t: dict, target: str, where: str) -> tuple[dict | None, str]:
    role_key, text_key = _names(t)
    name, text = t[role_key], t.get(text_key)
    if target == TOOL_CALL:
        calls, why = tool_calls(text if text is not None else t.get("tool_calls"))
        return ({"role": "assistant", "content": "", "tool_calls": calls}, "") if calls else (None, f"{where}: {why}")
    msg = {"role": target, "content": text}
    if t.get("tool_calls") is not None:
        if target != "assistant":
            return None, f"{where} ({name}) has tool_calls, which only an assistant turn may have"
        calls, why = tool_calls(t["tool_calls"])
        if calls is None:
            return None, f"{where}: {why}"
        msg["tool_calls"] = calls
        msg["content"] = text = "" if text is None else text
    if len(t) > 2:  # a tool's name or call id
        for key in ("name", "tool_call_id"):
            if isinstance(t.get(key), str):
                msg[key] = t[key]
    if not isinstance(text, str):
        return None, f"{where} ({name}) needs a string '{text_key}'"
    if not text.isascii():
        bad = unicode_problem(text)
        if bad:
            return None, f"{where} ({name}) '{text_key}' {bad}"
    return msg, ""


def conversation(data: dict, fmt: str, roles: Mapping[str, str] = DEFAULT_ROLES) -> tuple[list[dict] | None, list[str]]:
    """The record's turns as template messages, or None and its problems (without the location)."""
    key = turns_key(fmt)
    if data.get(key) is None:
        return None, [f"missing field '{key}'"]
    turns = decode_json_text(data[key])
    if not isinstance(turns, list) or not turns:
        return None, [f"'{key}' must be a non-empty list of {{role, content}} or {{from, value}} objects"]
    problems: list[str] = []
    out: list[dict] = []
    system = data.get("system") if fmt == "sharegpt" else None
    if system is not None:
        if not isinstance(system, str):
            problems.append(f"field 'system' must be a string, got {type(system).__name__}")
        elif system.strip():
            out.append({"role": "system", "content": system})
    unknown = []
    for i, t in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{where} must be an object, got {type(t).__name__}")
            continue
        role_key = _names(t)[0]
        name = t.get(role_key)
        target = roles.get(name) if isinstance(name, str) else None
        if target is None:
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
            unknown.append(f"{where} has {role_key} {shown}")
            continue
        msg, why = _turn(t, target, where)
        if msg is None:
            problems.append(why)
        else:
            out.append(msg)
    if unknown:
        known = ", ".join(sorted(roles))
        listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more turns" if len(unknown) > 3 else "")
        problems.append(f"{listed}, which is not a known role ({known}); map it with data.roles" if len(unknown) == 1
                        else f"{listed}: not known roles ({known}); map them with data.roles")
    _, why = record_tools(data)
    if why:
        problems.append(why)
    if not problems and not any(m["role"] == "assistant" for m in out):
        problems.append("no assistant turn (nothing to train on)")
    return (None, problems) if problems else (out, [])


# ---------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class TemplateSupport:
    """What the chat template renders, found by rendering probe conversations and looking for their text."""

    tool_messages: bool  # a tool turn's content appears
    tool_calls: bool  # an assistant turn's tool call (function name and argument) appears


_PROBE_CALL = {"type": "function", "id": "a1b2c3d4e",
               "function": {"name": "probe_lookup_fn", "arguments": {"query": "probe-argument-value"}}}


def template_support(tokenizer) -> TemplateSupport:
    def render(messages) -> str:
        try:
            return render_chat(tokenizer, messages, False)
        except Exception:  # noqa: BLE001 - a template that rejects the probe does not support it
            return ""

    user = {"role": "user", "content": "probe question"}
    result = {"role": "tool", "name": "probe_lookup_fn", "tool_call_id": "a1b2c3d4e", "content": "probe-tool-result"}
    answer = {"role": "assistant", "content": "probe answer"}
    with_call = render([user, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}, result, answer])
    tool_only = render([user, {"role": "assistant", "content": "probe step"}, result, answer])
    return TemplateSupport(tool_messages="probe-tool-result" in (with_call + tool_only),
                           tool_calls="probe_lookup_fn" in with_call and "probe-argument-value" in with_call)


def template_problems(messages: list[dict], support: TemplateSupport, key: str = "messages") -> list[str]:
    """Turns this template would drop: tool turns or tool calls it does not render."""
    problems = []
    for i, m in enumerate(messages):
        if m["role"] == "tool" and not support.tool_messages:
            problems.append(f"{key}[{i}] is a tool turn, but the model's chat template does not render tool turns "
                            "(a probe's tool result was missing from its output); remove tool turns or use a model "
                            "whose template supports tools")
        if m.get("tool_calls") and not support.tool_calls:
            problems.append(f"{key}[{i}] has tool calls, but the model's chat template does not render them "
                            "(a probe's call was missing from its output); remove them or use a model whose "
                            "template supports tool calls")
    return problems


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, tools: list | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def cap_messages(messages: list[dict], cap: int) -> tuple[list[dict], bool]:
    """The messages up to the one whose content takes the running total of content characters past `cap`,
    that one cut to fit; (messages, False) when nothing is cut."""
    out, total = [], 0
    for m in messages:
        text = m.get("content") or ""
        if total + len(text) > cap:
            out.append({**m, "content": text[: cap - total]})
            return out, True
        total += len(text)
        out.append(m)
    return out, False


def chat_segments(messages: list[dict], tokenizer, tools: list | None = None,
                  max_chars: int | None = None) -> tuple[list[tuple[str, bool]], bool]:
    """Split the rendered conversation into (text, trained) pieces, trained = an assistant turn; and whether
    rendering stopped early: after the assistant turn whose text takes the rendering past `max_chars`.

    Each assistant turn's text is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True),
    so the spans are right for any template that renders a conversation's prefixes as prefixes of the whole.
    Messages after the last assistant turn are dropped (nothing to train on); with no assistant turn the
    whole conversation is one untrained piece.
    """
    messages = [{k: m[k] for k in KEPT_KEYS if m.get(k) is not None} for m in messages]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return [(render_chat(tokenizer, messages, False, tools), False)], False
    messages = messages[: assistant[-1] + 1]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in assistant:
        try:
            prompt = render_chat(tokenizer, messages[:i], True, tools)
        except Exception:
            if i:
                raise
            prompt = ""  # a conversation that opens with the assistant, and a template that can't render []
        full = render_chat(tokenizer, messages[: i + 1], False, tools)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"the chat template does not render message {i} (assistant) after the text rendered "
                             "for the messages before it; its assistant spans cannot be found by prefix rendering")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
        if max_chars is not None and len(done) > max_chars and i != assistant[-1]:
            return segments, True
    return segments, False
