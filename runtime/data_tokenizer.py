"""A model directory's tokenizer without torch or transformers, for counting tokens before a run.

    tok = LiteTokenizer("models/my-model")      # tokenizer.json (+ tokenizer_config.json, chat_template.jinja)
    tok("Hello", add_special_tokens=False)["input_ids"]
    tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

Ids come from the `tokenizers` package (Tokenizer.from_file, the file transformers' fast tokenizers load); the
chat template is rendered with jinja2 the way transformers' apply_chat_template renders it: a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` block, the `tojson`
filter, `raise_exception` and `strftime_now`, the named special tokens as variables, and message keys whose
value is None dropped. It offers what data_tokens needs (__call__, eos_token_id, get_vocab, chat_template,
apply_chat_template), so the scanner counts tokens with the same code that tokenizes for training.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .data_formats import DataError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(d: Path, config: dict) -> str | dict | None:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _json_file(d / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t and "template" in t}
    return template if isinstance(template, str) else None


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}` marks assistant text; rendered as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class LiteTokenizer:
    """The tokenizer of a model directory (or of a tokenizer.json path), read with `tokenizers` and jinja2."""

    def __init__(self, path: str | Path):
        p = Path(path)
        d = p.parent if p.is_file() else p
        file = p if p.is_file() else d / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"{d}: no tokenizer.json to count tokens with")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("counting tokens needs the `tokenizers` package (pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the Rust side raises its own exception type
            raise DataError(f"{file}: not a readable tokenizer.json ({e})") from None
        config = _json_file(d / "tokenizer_config.json")
        smap = _json_file(d / "special_tokens_map.json")
        self.path = str(file)
        self.special = {name: text for name in SPECIAL_TOKENS
                        if (text := _token_text(config.get(name, smap.get(name)))) is not None}
        eos = self.special.get("eos_token")
        self.eos_token_id = self._tok.token_to_id(eos) if eos is not None else None
        self.chat_template = _chat_template(d, config)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], tools: list | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("LiteTokenizer renders text only (tokenize=False)")
        template = self.chat_template
        if isinstance(template, dict):
            template = template.get("tool_use") if tools and "tool_use" in template else template.get("default")
        if not template:
            raise ValueError("the tokenizer has no chat template")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special)
