"""axolotl's datasets: `datasets` and `test_datasets` entries (path or data_files, and a type), mapped onto
peftplan's data formats (src/axolotl/utils/schemas/datasets.py; docs/dataset-formats): alpaca → instruction,
completion (field text) → text, chat_template with messages/role/content → chat and with conversations/from/value
(message_property_mappings) → sharegpt. Nothing is read here: `peftplan plan` and `generate` read local files.
"""

from __future__ import annotations

from pathlib import Path

from .common import as_float, data_entries
from .result import Collector, shown


def _datasets(c: Collector, key: str) -> list[tuple[str, str | None, str, str]]:
    entries = []
    value = c.get(key)
    if value is not None and not isinstance(value, list):
        c.problem(key, f"must be a list of datasets, each with a path (got {shown(value)})")
    for n, ds in enumerate(value if isinstance(value, list) else []):
        where = f"{key}[{n}]"
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
            c.problem(key, f"item {n}: each dataset needs a path")
            continue
        files = ds.get("data_files")
        paths = [files] if isinstance(files, str) else [str(f) for f in files] if isinstance(files, list) else \
            [ds["path"]]
        fmt, why = _format(ds)
        if why:
            c.skip(f"{where}.type", why, "not supported", value=ds.get("type"))
        for extra in ("split", "name", "shards", "train_on_split"):
            if ds.get(extra) is not None:
                c.skip(f"{where}.{extra}", "a part of the dataset: peftplan reads every record of the file (time "
                                           "and steps follow the whole set)", value=ds.get(extra))
        entries += [(p, fmt, f"{where}.{'data_files' if files else 'path'}", f"{where}.type: {shown(ds.get('type'))}")
                    for p in paths]
    return entries


def _format(ds: dict) -> tuple[str | None, str]:
    kind = ds.get("type")
    if isinstance(kind, dict):
        return None, "a custom prompt format (type as a table): no peftplan format matches; data.format is detected"
    kind = str(kind or "")
    base = kind.split(":")[0].split(".")[0]
    if base.startswith("alpaca"):
        custom = [k for k in ("field_instruction", "field_input", "field_output") if ds.get(k)]
        return ("instruction", "") if not custom else \
            (None, f"alpaca with renamed fields ({', '.join(custom)}): "
                   "peftplan's instruction format reads instruction/input/output")
    if base == "completion":
        field = ds.get("field") or "text"
        return ("text", "") if field == "text" else (None, f"completion from field {field!r}: peftplan's text format "
                                                           "reads 'text'")
    if base in ("sharegpt", "chat_template"):
        messages = ds.get("field_messages") or ("conversations" if base == "sharegpt" else "messages")
        roles = ds.get("message_property_mappings") or {}
        role = roles.get("role") or ds.get("message_field_role") or ("from" if base == "sharegpt" else "role")
        content = roles.get("content") or ds.get("message_field_content") or (
            "value" if base == "sharegpt" else "content")
        if (messages, role, content) == ("messages", "role", "content"):
            return "chat", ""
        if (messages, role, content) == ("conversations", "from", "value"):
            return "sharegpt", ""
        return None, (f"chat records under {messages!r} with {role!r}/{content!r}: peftplan reads messages with "
                      "role/content (chat) or conversations with from/value (sharegpt)")
    if not kind:
        return None, "no type: data.format is detected from each file's first record"
    return None, f"type {kind}: no peftplan data format matches; data.format is detected from each file"


def read_data(c: Collector, config: Path, out_dir: Path) -> None:
    entries = _datasets(c, "datasets")
    evals = [e[0] for e in _datasets(c, "test_datasets")]
    if c.has("pretraining_dataset"):
        c.unsupported("pretraining_dataset", "a streamed pretraining dataset: peftplan reads files or hub datasets "
                                             "whole")
    data_entries(c, entries, config, out_dir, evals)
    val = c.get("val_set_size", 0.0)
    fraction = as_float(c, "val_set_size", val)
    if fraction is not None and evals:
        c.skip("val_set_size", "test_datasets is the held-out set")
    elif fraction is not None and fraction < 1:
        c.set("data.eval_fraction", fraction, "val_set_size" if c.has("val_set_size") else "(axolotl default)")
    elif fraction is not None:
        c.skip("val_set_size", f"{shown(val)} examples held out: peftplan holds out a fraction "
                               "(data.eval_fraction); set it from your data's size", "not supported")
    c.assume("data.num_examples is not set: the dataset is not read here, so `plan` has no time or cost until you set "
             "it (or point data.path at local files, which are counted)")
