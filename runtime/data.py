"""The data pipeline: read local files, validate, tokenize with response-only labels, split, weight, pack, collate.

    prepared = prepare_data(["chat.jsonl", {"path": "notes.txt", "weight": 0.5}], tokenizer, seq_len=2048,
                            eval_path="val.jsonl", packing=True)

or step by step:

    records = load_records("train.jsonl")               # JSONL, JSON, CSV, Parquet (needs pyarrow), TXT
    fmt = resolve_format(records, "auto", tokenizer)    # detect + validate every record; DataError on problems
    examples = tokenize_records(records, fmt, tokenizer, seq_len=2048)
    rows = pack(examples, 2048, pad_token_id(tokenizer))  # optional
    batch = DataCollator(pad_token_id(tokenizer))(rows[:4])

Every problem found before training is a DataError naming the file and the line (JSONL, CSV, TXT: the line the
record starts on; JSON: the line and record index; Parquet: the record index); up to 10 bad records per file
are listed at once. Files are read streaming (data_files.read_file) and checked by the same code as the
torch-free scanner (data_scan.scan_data), which reports the same problems.

Long records cost what they keep: a text is tokenized only as far as seq_len needs (encode_prefix), so a 50 MB
record with seq_len=64 hands the tokenizer a few thousand characters, not 50 million.
Imports only the standard library at module level; torch is imported by the collator, pyarrow for Parquet.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data_files import (
    FileCheck,
    Source,
    apply_weight,
    as_sources,
    check_records,
    load_records,
    looks_like_hub_id,
    rebase,
    resolve_roles,
)
from .data_formats import (
    FORMATS,
    SIGNATURES,
    DataError,
    Record,
    detect_format,
    template_check,
    template_record_problems,
    unknown_format,
    validate_record,
)
from .data_tokens import IGNORE, Example, chars_per_token, context, encode_prefix, tokenize_record, tokenize_records

__all__ = [
    "FORMATS", "SIGNATURES", "DataError", "Record", "Source", "Example", "PreparedData", "TokenStats",
    "DataCollator", "load_records", "as_sources", "detect_format", "validate_records", "resolve_format",
    "tokenize_record", "tokenize_records", "encode_prefix", "chars_per_token", "split", "pack", "pad_token_id",
    "token_stats", "prepare_data",
]


# ---------------------------------------------------------------------------------------------------- checking


def validate_records(records: Sequence[Record], fmt: str, tokenizer: Any = None,
                     roles: Mapping[str, str] | None = None) -> None:
    """DataError listing the first 10 records that don't fit `fmt` (and the missing chat template, or tool turns
    the template does not render, for chat formats when a tokenizer is given)."""
    if fmt not in FORMATS:
        raise unknown_format(fmt)
    if not records:
        raise DataError("no records (the dataset is empty)")
    path = records[0].path
    support = template_check(tokenizer, fmt, path)
    roles = resolve_roles(roles)
    check = FileCheck(path)
    for r in records:
        found = validate_record(r.data, fmt, roles) or template_record_problems(r.data, fmt, support, roles)
        if found:
            check.add(r.where, "; ".join(found))
    if check.count:
        raise check.error()


def resolve_format(records: Sequence[Record], fmt: str = "auto", tokenizer: Any = None,
                   roles: Mapping[str, str] | None = None) -> str:
    """The format to use (detected from the first record when "auto"), after validating every record against it."""
    if not records:
        raise DataError("no records (the dataset is empty)")
    if fmt == "auto":
        fmt = detect_format(list(records))
    validate_records(records, fmt, tokenizer, roles)
    return fmt


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
    def from_tokenizer(cls, tokenizer, **kwargs) -> DataCollator:
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
    format: str  # the files' format, or their formats joined with "+" ("chat+text") when they differ
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    dropped: int = 0  # examples with no trained token left after truncation to seq_len
    packed: bool = False
    sources: list[dict] = field(default_factory=list)  # per file: path, role, format, records, weight, examples
    notes: list[str] = field(default_factory=list)  # things to tell the user (e.g. eval_fraction ignored)

    def stats(self) -> dict:
        return {"train": token_stats(self.train).as_dict(), "eval": token_stats(self.eval).as_dict()}


def _load(sources: list[Source], tokenizer, roles, txt_split: str) -> list[tuple[list[Record], str]]:
    """Every source's valid records and format; one DataError for the problems of all files."""
    out, errors = [], []
    for s in sources:
        if not Path(s.path).exists() and looks_like_hub_id(s.path):  # a hub dataset by name, when online
            records = load_records(s.path)
            out.append((records, resolve_format(records, s.format, tokenizer, roles)))
            continue
        check = FileCheck(s.path)
        records = [c.record for c in check_records(s, check=check, roles=roles, tokenizer=tokenizer,
                                                   txt_split=txt_split)]
        if check.count:
            errors.append(check.error())
        out.append((records, check.format or "text"))
    if errors:
        raise errors[0] if len(errors) == 1 else DataError("\n".join(map(str, errors)),
                                                           [p for e in errors for p in e.problems])
    return out


def prepare_data(path: Any, tokenizer, *, format: str = "auto", seq_len: int = 2048, eval_fraction: float = 0.0,
                 seed: int = 0, packing: bool = False, eval_path: Any = None, roles: Mapping[str, str] | None = None,
                 txt_split: str = "blank_line", base_dir: str | Path | None = None) -> PreparedData:
    """Load, validate, split (or read eval_path), tokenize, weight and optionally pack; DataError on any problem.

    path: a file, a list of files, or sources {path, format, weight} (data_files.as_sources); each file's format
    is its own (detected from its first record unless set), so formats may be mixed. eval_path: held-out files
    (then eval_fraction is not used: PreparedData.notes says so when both are set). Weights repeat or subsample
    each file's training examples (data_files.apply_weight); with several files or a weight other than 1, the
    training examples are shuffled (seeded) so that packed rows mix the files. Relative paths are relative to
    base_dir when given. The problems of every file, training and held-out, are reported in one DataError.
    """
    c = context(tokenizer, seq_len, roles)
    sources = rebase(as_sources(path, format), base_dir)
    eval_sources = rebase(as_sources(eval_path, format, "data.eval_path", weights=False), base_dir) if (
        eval_path is not None) else []
    everything = _load(sources + eval_sources, tokenizer, c.roles, txt_split)
    loaded, held = everything[: len(sources)], everything[len(sources):]
    fmts, eval_fmts = [fmt for _, fmt in loaded], [fmt for _, fmt in held]
    items = [(i, r) for i, (records, _) in enumerate(loaded) for r in records]
    notes = []
    if eval_sources:
        train_items, eval_items = items, [(i, r) for i, (records, _) in enumerate(held) for r in records]
        if eval_fraction:
            notes.append(f"data.eval_fraction = {eval_fraction:g} is ignored: data.eval_path holds the evaluation "
                         "examples")
    else:
        train_items, eval_items = split(items, eval_fraction, seed)
        eval_fmts = fmts

    def tokenized(pairs, formats) -> dict[int, list[Example]]:
        groups: dict[int, list[Record]] = {}
        for i, r in pairs:
            groups.setdefault(i, []).append(r)
        return {i: tokenize_records(rs, formats[i], tokenizer, seq_len, roles=c.roles) for i, rs in groups.items()}

    train_by, eval_by = tokenized(train_items, fmts), tokenized(eval_items, eval_fmts)
    dropped = len(train_items) + len(eval_items) - sum(map(len, [*train_by.values(), *eval_by.values()]))
    train: list[Example] = []
    info = []
    for i, s in enumerate(sources):
        examples = apply_weight(train_by.get(i, []), s.weight, seed * 1_000_003 + i)
        train += examples
        info.append({"path": s.path, "role": "train", "format": fmts[i], "records": len(loaded[i][0]),
                     "weight": s.weight, "examples": len(examples)})
    evals = [ex for i in sorted(eval_by) for ex in eval_by[i]]
    info += [{"path": s.path, "role": "eval", "format": eval_fmts[i], "records": len(held[i][0]), "weight": 1.0,
              "examples": len(eval_by.get(i, []))} for i, s in enumerate(eval_sources)]
    if not train:
        names = ", ".join(s.path for s in sources)
        raise DataError(f"{names}: no example keeps a trained token within seq_len={seq_len} "
                        "(every prompt fills the sequence); raise seq_len or shorten the prompts")
    if len(sources) > 1 or any(s.weight != 1.0 for s in sources):
        random.Random(seed).shuffle(train)
    if packing:
        pid = pad_token_id(tokenizer)
        train, evals = pack(train, seq_len, pid), pack(evals, seq_len, pid)
    return PreparedData("+".join(dict.fromkeys(fmts)), train, evals, dropped, packing, info, notes)
