"""The data pipeline: read local files, validate, tokenize with response-only labels, split, pack, collate.

    records = load_records("train.jsonl")              # JSONL, JSON, CSV, Parquet (needs pyarrow)
    fmt = resolve_format(records, "auto", tokenizer)    # detect + validate every record; DataError on problems
    examples = tokenize_records(records, fmt, tokenizer, seq_len=2048)
    rows = pack(examples, 2048, pad_token_id(tokenizer))  # optional
    batch = DataCollator(pad_token_id(tokenizer))(rows[:4])

or all at once: `prepare_data(path, tokenizer, seq_len=..., eval_fraction=..., packing=...)`.

Every problem found before training is a DataError naming the file and the line (JSONL, 1-based), the row
(CSV, the header being row 1) or the record index (JSON, Parquet); up to 10 bad records are listed at once.
Imports only the standard library at module level; torch is imported by the collator, pyarrow for Parquet.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data_formats import (FORMATS, MAX_REPORTED, SIGNATURES, DataError, Record, detect_format, problems_error,
                           segments, validate_record)

__all__ = [
    "FORMATS", "SIGNATURES", "DataError", "Record", "Example", "PreparedData", "TokenStats", "DataCollator",
    "load_records", "detect_format", "validate_records", "resolve_format", "tokenize_record", "tokenize_records",
    "split", "pack", "pad_token_id", "token_stats", "prepare_data",
]

IGNORE = -100
Example = dict  # {"input_ids": [...], "attention_mask": [...], "labels": [...]} (+ "position_ids" when packed)


# ---------------------------------------------------------------------------------------------------- reading


def load_records(path: str | Path) -> list[Record]:
    """Read every record of a local .jsonl / .json / .csv / .parquet file; DataError if unreadable or empty."""
    p = Path(path)
    if not p.exists():
        if _looks_like_hub_id(str(path)):
            return _read_hub(str(path))
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; "
                        "expected .jsonl, .json, .csv or .parquet")
    records = reader(p)
    if not records:
        raise DataError(f"{p}: no records (the dataset is empty)")
    return records


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "." not in Path(name).suffix


def _read_hub(name: str) -> list[Record]:
    """A hub dataset by name (`org/name`, its train split), when online and `datasets` is installed."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise DataError(f"{name}: not a local file, and HF_HUB_OFFLINE is set: the hub dataset cannot be fetched")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name}: not a local file; to read it as a hub dataset, pip install datasets") from None
    try:
        ds = load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's input problem here
        raise DataError(f"{name}: cannot load the hub dataset: {exc}") from None
    return [Record(dict(row), name, f"record index {i}") for i, row in enumerate(ds)]


def _read_jsonl(p: Path) -> list[Record]:
    records, problems = [], []
    with p.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{p}, line {n}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(data, dict):
                problems.append(f"{p}, line {n}: expected a JSON object, got {type(data).__name__}")
                continue
            records.append(Record(data, str(p), f"line {n}"))
    if problems:
        raise problems_error(str(p), problems, what="unreadable line")
    return records


def _read_json(p: Path) -> list[Record]:
    try:
        doc = json.loads(p.read_text(encoding="utf-8-sig") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(f"{p}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f"{p}: expected a JSON list of records or an object {{\"data\": [...]}}, "
                        f"got {type(doc).__name__}")
    problems = [f"{p}, record index {i}: expected an object, got {type(d).__name__}"
                for i, d in enumerate(doc) if not isinstance(d, dict)]
    if problems:
        raise problems_error(str(p), problems)
    return [Record(d, str(p), f"record index {i}") for i, d in enumerate(doc)]


def _read_csv(p: Path) -> list[Record]:
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:  # row 1 is the header, so the first record is row 2
            return [Record({k: v for k, v in row.items() if k is not None}, str(p), f"row {i}")
                    for i, row in enumerate(reader, start=2)]
        except csv.Error as e:
            raise DataError(f"{p}, line {reader.line_num}: unreadable CSV ({e})") from None


def _read_parquet(p: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet files needs pyarrow, which is not installed "
                        "(pip install pyarrow), or convert the file to JSONL") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
        raise DataError(f"{p}: unreadable Parquet file ({e})") from None
    return [Record(d, str(p), f"record index {i}") for i, d in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------- checking


def validate_records(records: Sequence[Record], fmt: str, tokenizer: Any = None) -> None:
    """DataError listing the first 10 records that don't fit `fmt` (and the missing chat template, for chat)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of: {', '.join(FORMATS)} or auto")
    if not records:
        raise DataError("no records (the dataset is empty)")
    path = records[0].path
    if fmt == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: the data is in chat format but the tokenizer has no chat template; use a "
                        "tokenizer that has one, set tokenizer.chat_template, or use the instruction/completion format")
    problems, total = [], 0
    for r in records:
        found = validate_record(r.data, fmt)
        if found:
            total += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{r.where}: " + "; ".join(found))
    if total:
        raise problems_error(path, problems, total)


def resolve_format(records: Sequence[Record], fmt: str = "auto", tokenizer: Any = None) -> str:
    """The format to use (detected when "auto"), after validating every record against it."""
    if not records:
        raise DataError("no records (the dataset is empty)")
    if fmt == "auto":
        fmt = detect_format(list(records))
    validate_records(records, fmt, tokenizer)
    return fmt


# ---------------------------------------------------------------------------------------------------- tokenizing


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text by itself (a BOS for Llama-style tokenizers, none for GPT-2)."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(with_sp) - len(without)
    return with_sp[:n] if n > 0 and with_sp[n:n + len(without)] == without else []


def _tokenize(data: dict, fmt: str, tokenizer, seq_len: int, prefix: list[int]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    if fmt != "chat":  # a chat template writes its own BOS into the text
        ids += prefix
        labels += prefix if fmt == "text" else [IGNORE] * len(prefix)
    last_trained: list[int] = []
    for text, trained in segments(data, fmt, tokenizer):
        if not text:
            continue
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
        if trained:
            last_trained = piece
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in last_trained:  # the template (or plain text) didn't end the response
        ids.append(eos)
        labels.append(eos)
    ids, labels = ids[:seq_len], labels[:seq_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_record(data: dict, fmt: str, tokenizer, seq_len: int) -> Example:
    """input_ids / attention_mask / labels for one valid record; labels are -100 outside the trained text."""
    return _tokenize(data, fmt, tokenizer, seq_len, _special_prefix(tokenizer))


def tokenize_records(records: Sequence[Record], fmt: str, tokenizer, seq_len: int,
                     drop_untrained: bool = True) -> list[Example]:
    """Tokenize validated records. With drop_untrained, examples left with no trained token (the prompt fills
    seq_len) are dropped; `len(records) - len(result)` says how many."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    prefix = _special_prefix(tokenizer)
    out, problems = [], []
    for r in records:
        try:
            ex = _tokenize(r.data, fmt, tokenizer, seq_len, prefix)
        except DataError:
            raise
        except Exception as e:  # a chat template that fails or is not prefix-stable on this record
            problems.append(f"{r.where}: cannot render the record ({type(e).__name__}: {e})")
            continue
        if not drop_untrained or any(x != IGNORE for x in ex["labels"]):
            out.append(ex)
    if problems:
        raise problems_error(records[0].path, problems)
    return out


# ---------------------------------------------------------------------------------------------------- split, pack


def split(records: Sequence, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded random eval_fraction of the items (at least 1 when the fraction is > 0), each list
    in the original order. Deterministic for the same items, fraction and seed."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    items = list(records)
    if eval_fraction == 0.0:
        return items, []
    n_eval = max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise DataError(f"cannot hold out {eval_fraction:.0%} of {len(items)} records for evaluation "
                        "and keep any for training; add records or lower eval_fraction")
    chosen = set(random.Random(seed).sample(range(len(items)), n_eval))
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])


def pack(examples: Sequence[Example], seq_len: int, pad_id: int, drop_last: bool = False) -> list[Example]:
    """Concatenate examples into rows of exactly seq_len tokens.

    Labels are kept, except the first token of each example (-100: not predicted from the previous example).
    position_ids restart at 0 at each example and at each row start (an example continued from the previous
    row starts again at 0), so flash-attention varlen / transformers' packed-sequence masks keep examples apart.
    attention_mask is all ones. The last partial row is filled with pad tokens (labels -100, positions from 0),
    or dropped with drop_last.
    """
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def flush():
        rows.append({"input_ids": ids[:], "attention_mask": [1] * seq_len, "labels": labels[:],
                     "position_ids": pos[:]})
        ids.clear(), labels.clear(), pos.clear()

    for ex in examples:
        ex_ids = list(ex["input_ids"])
        if not ex_ids:
            continue
        ex_labels = [IGNORE] + list(ex["labels"][1:])
        start = 0
        while start < len(ex_ids):
            take = min(seq_len - len(ids), len(ex_ids) - start)
            ids.extend(ex_ids[start:start + take])
            labels.extend(ex_labels[start:start + take])
            pos.extend(range(take))
            start += take
            if len(ids) == seq_len:
                flush()
    if ids and not drop_last:
        n = seq_len - len(ids)
        ids.extend([pad_id] * n), labels.extend([IGNORE] * n), pos.extend(range(n))
        flush()
    return rows


# ---------------------------------------------------------------------------------------------------- batches


def pad_token_id(tokenizer) -> int:
    """tokenizer.pad_token_id, else eos_token_id; DataError if it has neither."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")


@dataclass
class DataCollator:
    """Pads a list of examples to the longest (right padding): input_ids with pad_token_id, attention_mask 0,
    labels -100, position_ids 0. Returns torch.long tensors.

    packed_attention: when every example carries position_ids and needs no padding (packed rows), the
    attention_mask is left out so that transformers builds per-example causal masks from the position_ids
    (sdpa / eager / flex / flash-attention varlen) instead of letting packed examples attend to each other.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    packed_attention: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> "DataCollator":
        return cls(pad_token_id(tokenizer), **kwargs)

    def __call__(self, features: Sequence[Example]) -> dict:
        import torch

        if not features:
            raise ValueError("empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_pos = all("position_ids" in f for f in features)
        batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if has_pos:
            batch["position_ids"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            mask = f.get("attention_mask")
            batch["attention_mask"].append(([1] * n if mask is None else list(mask)) + [0] * pad)
            batch["labels"].append(list(f.get("labels", f["input_ids"])) + [IGNORE] * pad)
            if has_pos:
                batch["position_ids"].append(list(f["position_ids"]) + [0] * pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if self.packed_attention and has_pos and bool(out["attention_mask"].all()):
            del out["attention_mask"]
        return out


# ---------------------------------------------------------------------------------------------------- stats, all


@dataclass(frozen=True)
class TokenStats:
    count: int
    mean_tokens: float
    max_tokens: int
    trained_fraction: float  # labels != -100 over all tokens
    total_tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def token_stats(dataset: Sequence[Example]) -> TokenStats:
    """Example count, mean and max tokens per example, and the fraction of tokens that are trained."""
    lengths = [len(ex["input_ids"]) for ex in dataset]
    total = sum(lengths)
    trained = sum(sum(1 for x in ex["labels"] if x != IGNORE) for ex in dataset)
    return TokenStats(count=len(lengths), mean_tokens=total / len(lengths) if lengths else 0.0,
                      max_tokens=max(lengths, default=0), trained_fraction=trained / total if total else 0.0,
                      total_tokens=total, trained_tokens=trained)


@dataclass
class PreparedData:
    format: str
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    dropped: int = 0  # examples with no trained token left after truncation to seq_len
    packed: bool = False

    def stats(self) -> dict:
        return {"train": token_stats(self.train).as_dict(), "eval": token_stats(self.eval).as_dict()}


def prepare_data(path: str | Path, tokenizer, *, format: str = "auto", seq_len: int = 2048,
                 eval_fraction: float = 0.0, seed: int = 0, packing: bool = False,
                 eval_path: str | Path | None = None) -> PreparedData:
    """Load, validate, split (or read eval_path), tokenize and optionally pack; DataError on any problem."""
    records = load_records(path)
    fmt = resolve_format(records, format, tokenizer)
    if eval_path is not None:
        train_records, eval_records = records, load_records(eval_path)
        validate_records(eval_records, fmt, tokenizer)
    else:
        train_records, eval_records = split(records, eval_fraction, seed)
    train = tokenize_records(train_records, fmt, tokenizer, seq_len)
    evals = tokenize_records(eval_records, fmt, tokenizer, seq_len) if eval_records else []
    dropped = len(train_records) + len(eval_records) - len(train) - len(evals)
    if not train:
        raise DataError(f"{path}: no example keeps a trained token within seq_len={seq_len} "
                        "(every prompt fills the sequence); raise seq_len or shorten the prompts")
    if packing:
        pid = pad_token_id(tokenizer)
        train, evals = pack(train, seq_len, pid), pack(evals, seq_len, pid)
    return PreparedData(fmt, train, evals, dropped, packing)
