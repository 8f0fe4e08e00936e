"""docs/spec.md: every spec key with its type, default and description, from the pydantic models themselves.

One source of truth per key (STYLE §5): the description a key has here is the one `peftplan validate` quotes and
the JSON Schema carries. `make docs` writes the file; tests/schemas/test_reference.py checks it is current.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .spec import Spec

INTRO = """# Spec reference

<!-- generated from schemas/spec.py by `make docs`; do not edit -->

A spec is a TOML file with the tables below. Unknown keys are errors (with a "did you mean"). Every key may be left
out unless marked required; the planner then chooses it and the plan says what it chose and why. Strict types: `true`
is not a number and `"8"` is not a rank; no `inf`/`nan`. A complete example:

```toml
#:schema ../schemas/spec.schema.json
[model]
name = "meta-llama/Llama-3.1-8B-Instruct"

[data]
path = ["chat.jsonl", "notes.txt"]   # or one file; or [[data.sources]] tables with a weight each
eval_path = "val.jsonl"
seq_len = 2048

[hardware]
gpu = "A100-80GB"

[method]
name = "auto"

[training]
loss = "chunked"

[logging]
report_to = ["tensorboard"]
```
"""


def _type(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {_type(args[1])}" if args else "table"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(annotation, str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None or value is PydanticUndefined:
        return "—"
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def markdown() -> str:
    lines = [INTRO]
    for table, field in Spec.model_fields.items():
        model = field.annotation
        lines += [f"## `[{table}]`", "", field.description or "", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for key, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type(f.annotation)} | {_default(f)} | {desc} |")
        for key, f in model.model_fields.items():
            inner = typing.get_args(f.annotation)
            nested = [a for a in inner if typing.get_origin(a) in (list,)] + [f.annotation]
            for cand in nested:
                args = typing.get_args(cand)
                sub = args[0] if args else None
                if typing.get_origin(sub) is typing.Annotated:
                    sub = typing.get_args(sub)[0]
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    lines += ["", f"### `[[{table}.{key}]]`", "", "| key | type | default | meaning |",
                              "|---|---|---|---|"]
                    for k2, f2 in sub.model_fields.items():
                        lines.append(f"| `{k2}` | {_type(f2.annotation)} | {_default(f2)} | "
                                     f"{(f2.description or '').replace('|', chr(92) + '|')} |")
                    break
        lines.append("")
    return "\n".join(lines)
