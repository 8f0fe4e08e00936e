"""LLaMA-Factory's datasets: names looked up in `<dataset_dir>/dataset_info.json` (dataset_dir defaults to "data",
resolved against the directory LLaMA-Factory runs from), each entry a local file (file_name), a Hugging Face dataset
(hf_hub_url) or a ModelScope/Modelers one. Its `formatting` (alpaca, the default, or sharegpt), `columns` and `tags`
say which peftplan format reads the records (src/llamafactory/data/parser.py, data/README.md). The files are not
read here: `peftplan plan` and `generate` read local ones.
"""

from __future__ import annotations

from pathlib import Path

from .common import as_float, as_int, data_entries, hub_id
from .result import Collector, shown
from .source import find_file, read_json

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
CHAT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return [str(n).strip() for n in value] if isinstance(value, list) else []


def _format(entry: dict, stage: str) -> tuple[str | None, str]:
    """The peftplan format of a dataset_info.json entry, or None and why none matches."""
    columns = entry.get("columns") or {}
    if stage == "pt":
        return ("text", "") if columns.get("prompt", "text") == "text" else (
            None, f"pretraining text in column {columns.get('prompt')!r}: peftplan's text format reads 'text'")
    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        renamed = {k: v for k, v in columns.items() if ALPACA_COLUMNS.get(k) != v}
        if not renamed:
            return "instruction", ""
        return None, (f"alpaca columns renamed ({', '.join(f'{k} → {v}' for k, v in renamed.items())}): peftplan's "
                      "instruction format reads instruction/input/output")
    if formatting == "sharegpt":
        messages = columns.get("messages", "conversations")
        tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})}
        if messages == "conversations" and all(tags[k] == SHAREGPT_TAGS[k] for k in ("role_tag", "content_tag")):
            extra = [k for k in ("user_tag", "assistant_tag") if tags[k] != SHAREGPT_TAGS[k]]
            return "sharegpt", "" if not extra else f"role names {shown({k: tags[k] for k in extra})}: add them " \
                                                    "under data.roles"
        if messages == "messages" and all(tags[k] == CHAT_TAGS[k] for k in CHAT_TAGS):
            return "chat", ""
        return None, (f"sharegpt records under {messages!r} with {tags['role_tag']!r}/{tags['content_tag']!r}: "
                      "peftplan reads messages with role/content or conversations with from/value")
    return None, f"formatting {shown(formatting)} is not one peftplan reads"


def _entries(c: Collector, key: str, names: list[str], info: dict | None, info_dir: Path | None, stage: str,
             dataset_dir: str) -> list[tuple[str, str | None, str, str]]:
    out = []
    for name in names:
        where = f"{key}: {name}"
        if dataset_dir == "ONLINE":  # names are hub datasets (LLaMA-Factory's ONLINE dataset_dir)
            out.append((name, None, where, where))
            continue
        entry = info.get(name) if isinstance(info, dict) else None
        if not isinstance(entry, dict):
            missing = f"no {dataset_dir}/dataset_info.json found here" if info is None else \
                f"not in {dataset_dir}/dataset_info.json"
            c.assume(f"{where}: {missing}; set data.path to its file")
            continue
        if entry.get("ranking"):
            c.skip(key, f"{name}: preference pairs (ranking): not supervised fine-tuning data", "not supported",
                   value=name)
            continue
        fmt, why = _format(entry, stage)
        if why and fmt is None:
            c.skip(key, f"{name}: {why}; data.format is detected from the file", "not supported", value=name)
        elif why:
            c.assume(f"{name}: {why}")
        if entry.get("file_name") and info_dir is not None:
            out.append((str(info_dir / str(entry["file_name"])), fmt, f"{where} (its file_name)",
                        f"{where} (formatting {entry.get('formatting', 'alpaca')})"))
        elif entry.get("hf_hub_url") and hub_id(str(entry["hf_hub_url"])):
            out.append((str(entry["hf_hub_url"]), fmt, f"{where} (its hf_hub_url)",
                        f"{where} (formatting {entry.get('formatting', 'alpaca')})"))
            for extra in ("subset", "split", "folder"):
                if entry.get(extra):
                    c.skip(key, f"{name}: {extra} {shown(entry[extra])} of a hub dataset: peftplan reads its train "
                                "split", value=name)
        else:
            c.skip(key, f"{name}: a ModelScope/Modelers or script dataset: peftplan reads local files and Hugging Face "
                        "datasets", "not supported", value=name)
    return out


def read_data(c: Collector, config: Path, out_dir: Path, stage: str) -> None:
    dataset_dir = str(c.get("dataset_dir", "data"))
    names, evals = _names(c.get("dataset")), _names(c.get("eval_dataset"))
    info = info_dir = None
    if dataset_dir != "ONLINE" and (names or evals):
        found = find_file(str(Path(dataset_dir) / "dataset_info.json"), config, "dataset_info.json")
        if found is not None:
            info, info_dir = read_json(found, "LLaMA-Factory dataset_info.json"), found.parent
    train = _entries(c, "dataset", names, info, info_dir, stage, dataset_dir)
    held = [e[0] for e in _entries(c, "eval_dataset", evals, info, info_dir, stage, dataset_dir)]
    data_entries(c, train, config, out_dir, held)
    cap = c.get("max_samples")
    cap = as_int(c, "max_samples", cap) if cap is not None else None
    if cap:
        c.skip("max_samples", "caps the examples read from each dataset: time and steps, not memory (see the "
                              "assumption on data.num_examples)")
    note = f"; max_samples {cap} caps the run at {cap:,} examples per dataset" if cap else ""
    c.assume("data.num_examples is not set: the data is not read here, so `plan` has no time or cost until you set "
             f"it (local files named by data.path are counted){note}")
    val = c.get("val_size")
    fraction = as_float(c, "val_size", val) if val is not None else 0.0
    if evals:
        if val is not None:
            c.skip("val_size", "eval_dataset is the held-out set")
    elif fraction is not None and fraction < 1:
        c.set("data.eval_fraction", fraction, "val_size" if val is not None else "(LLaMA-Factory default: 0)")
    elif fraction is not None:
        c.skip("val_size", f"{shown(val)} examples held out: peftplan holds out a fraction (data.eval_fraction); set "
                           "it from your data's size", "not supported")
    for key in ("streaming", "mix_strategy", "interleave_probs"):
        if c.has(key):
            c.skip(key, "how datasets are mixed or streamed: peftplan concatenates the files (time follows all "
                        "records)", value=c.get(key))
