"""Scan data files before a run, without torch or transformers: format, record count, the first problems (the
same messages training gives) and tokens per example for the time model.

    summary = scan_data(["chat.jsonl", {"path": "notes.txt", "weight": 0.5}], seq_len=2048,
                        tokenizer_dir="models/my-model", eval_path="val.jsonl")
    summary.ok, summary.problems, summary.train_examples, summary.mean_tokens
    print("\\n".join(format_summary(summary)))
    summary.as_dict()                           # plain data, for the planner

Every file is read streaming (memory bounded by the largest record) and every record goes through the checks
training uses (data_files.check_records). Token counts:
- "tokenizer": with `tokenizer_dir` (a model directory holding tokenizer.json), each record is tokenized by
  the training code (data_tokens) with a LiteTokenizer (the `tokenizers` package, the chat template through
  jinja2): the lengths are the examples' lengths in training, truncated to seq_len, and records training
  would drop (no trained token within seq_len) are counted apart.
- "estimate": without one, ceil(characters / CHARS_PER_TOKEN) per piece of text, plus MESSAGE_OVERHEAD tokens
  per chat message and 1 (the EOS) per record.
Standard library only at import; `tokenizers` and jinja2 are imported when a tokenizer is given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data_files import (
    FileCheck,
    Source,
    as_sources,
    check_records,
    exists,
    looks_like_hub_id,
    rebase,
    resolve_roles,
    weighted_count,
)
from .data_formats import MAX_REPORTED, DataError, segments
from .data_tokens import context, trained, try_tokenize

# English text averages about 4 characters per token with today's BPE vocabularies: OpenAI, "What are tokens
# and how to count them?" (help.openai.com/en/articles/4936856); Google Vertex AI, "Count tokens" ("a token is
# equivalent to about 4 characters" for Gemini models). Code and other languages take more tokens per character.
CHARS_PER_TOKEN = 4.0
# Tokens a chat template adds per message: ChatML's <|im_start|>, the role, "\n", <|im_end|>, "\n" (Llama 3's
# header tokens and <|eot_id|> are also 5); measured on runtime/testing.py's tokenizer by
# tests/runtime/test_data_scan.py.
MESSAGE_OVERHEAD = 5
NO_LIMIT = 2**31

__all__ = ["CHARS_PER_TOKEN", "MESSAGE_OVERHEAD", "FileSummary", "DataSummary", "scan_data", "format_summary"]


@dataclass
class FileSummary:
    path: str
    role: str  # "train" | "eval"
    format: str | None  # as set or detected; None when it could not be detected
    weight: float = 1.0
    records: int = 0  # readable records
    valid: int = 0  # records that pass every check
    problems: list[str] = field(default_factory=list)  # the first ones, each "path, line 3: why"
    problem_count: int = 0
    lengths: dict[int, int] = field(default_factory=dict)  # tokens per example -> examples (those training keeps)
    untrained: int = 0  # valid records with no trained token within seq_len: training drops them
    at_seq_len: int = 0  # examples that fill seq_len (most were cut to it)
    note: str = ""

    @property
    def examples(self) -> int:
        return sum(self.lengths.values())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["lengths"] = [[n, c] for n, c in sorted(self.lengths.items())]
        d["examples"] = self.examples
        return d


@dataclass
class DataSummary:
    files: list[FileSummary]
    method: str  # "tokenizer" (exact counts) | "estimate" (CHARS_PER_TOKEN, MESSAGE_OVERHEAD)
    tokenizer: str | None = None
    chars_per_token: float | None = None
    seq_len: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p for f in self.files for p in f.problems]

    @property
    def problem_count(self) -> int:
        return sum(f.problem_count for f in self.files)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def _train(self) -> list[FileSummary]:
        return [f for f in self.files if f.role == "train"]

    @property
    def train_examples(self) -> int:
        """Training examples per epoch, weights applied (before any eval_fraction is held out)."""
        return sum(weighted_count(f.examples, f.weight) for f in self._train())

    @property
    def eval_examples(self) -> int:
        return sum(f.examples for f in self.files if f.role == "eval")

    @property
    def total_tokens(self) -> float:
        """Tokens per epoch, weights applied."""
        return sum(f.weight * n * c for f in self._train() for n, c in f.lengths.items())

    @property
    def mean_tokens(self) -> float:
        weighted = sum(f.weight * f.examples for f in self._train())
        return self.total_tokens / weighted if weighted else 0.0

    @property
    def max_tokens(self) -> int:
        return max((n for f in self._train() for n in f.lengths), default=0)

    def histogram(self) -> dict[int, int]:
        """Tokens per example -> examples over the training files (unweighted)."""
        out: Counter = Counter()
        for f in self._train():
            out.update(f.lengths)
        return dict(sorted(out.items()))

    def as_dict(self) -> dict:
        return {"method": self.method, "tokenizer": self.tokenizer, "chars_per_token": self.chars_per_token,
                "seq_len": self.seq_len, "ok": self.ok, "problem_count": self.problem_count,
                "problems": self.problems, "train_examples": self.train_examples,
                "eval_examples": self.eval_examples, "mean_tokens": round(self.mean_tokens, 2),
                "max_tokens": self.max_tokens, "total_tokens": round(self.total_tokens),
                "files": [f.as_dict() for f in self.files], "notes": list(self.notes)}


def _estimate(data: dict, fmt: str, messages: list | None, seq_len: int) -> tuple[int, bool]:
    """(estimated tokens, cut to seq_len; whether a trained token starts within seq_len)."""
    if messages is not None:
        pieces = [(len(m["content"]) + (len(str(m["tool_calls"])) if "tool_calls" in m else 0),
                   m["role"] == "assistant", 1) for m in messages]
        last = max(i for i, p in enumerate(pieces) if p[1])
        pieces = pieces[: last + 1]
    else:
        pieces = [(len(text), is_trained, 0) for text, is_trained in segments(data, fmt, None)[0]]
    tokens, first_trained = 0, None
    for chars, is_trained, messages in pieces:
        if is_trained and first_trained is None:
            first_trained = tokens + messages * MESSAGE_OVERHEAD
        tokens += math.ceil(chars / CHARS_PER_TOKEN) + messages * MESSAGE_OVERHEAD
    tokens += 1  # the EOS (a chat template's closing tokens are in MESSAGE_OVERHEAD)
    return min(tokens, seq_len), first_trained is not None and first_trained < seq_len


def _scan_file(source: Source, role: str, *, roles, tok, ctx, seq_len: int, txt_split: str,
               max_problems: int) -> FileSummary:
    summary = FileSummary(source.path, role, None if source.format == "auto" else source.format, source.weight)
    if not exists(source.path) and looks_like_hub_id(source.path):
        summary.note = "a hub dataset name: not scanned (read when training, online)"
        return summary
    check = FileCheck(source.path, max_problems=max_problems)
    lengths: Counter = Counter()
    try:
        for record, fmt, messages in check_records(source, check=check, roles=roles, tokenizer=tok,
                                                   txt_split=txt_split):
            if ctx is not None:
                ex, why = try_tokenize(record, fmt, ctx)
                if ex is None:
                    check.valid -= 1
                    check.add(record.where, why)
                    continue
                n, keeps = len(ex["input_ids"]), trained(ex)
            else:
                n, keeps = _estimate(record.data, fmt, messages, seq_len)
            if not keeps:
                summary.untrained += 1
                continue
            lengths[n] += 1
            summary.at_seq_len += n >= seq_len
    except DataError as e:  # the file as a whole: missing, unsupported, not UTF-8, no chat template, empty
        check.count += 1
        summary.problems.append(str(e).splitlines()[0])
    summary.format = check.format or summary.format
    summary.records, summary.valid, summary.lengths = check.records, check.valid, dict(sorted(lengths.items()))
    summary.problems += [f"{source.path}, {p}" for p in check.problems]
    summary.problem_count = check.count
    return summary


def scan_data(sources: Any, *, format: str = "auto", roles: Mapping[str, str] | None = None,
              seq_len: int | None = None, tokenizer_dir: str | Path | None = None,
              max_problems: int = MAX_REPORTED, eval_path: Any = None, eval_fraction: float | None = None,
              txt_split: str = "blank_line", base_dir: str | Path | None = None) -> DataSummary:
    """Read every file (sources as prepare_data takes them: a path, a list, or tables {path, format, weight}) and
    summarize it; problems are reported in the summary, not raised, except for bad arguments (DataError naming
    the key). Relative paths are relative to base_dir when given."""
    role_map = resolve_roles(roles)
    train = as_sources(sources, format)
    held = as_sources(eval_path, format, "data.eval_path", weights=False) if eval_path is not None else []
    train, held = rebase(train, base_dir), rebase(held, base_dir)
    tok, ctx, notes = None, None, []
    limit = seq_len or NO_LIMIT
    if tokenizer_dir is not None:
        from .data_tokenizer import LiteTokenizer

        tok = LiteTokenizer(tokenizer_dir)
        ctx = context(tok, limit, role_map)
    if held and eval_fraction:
        notes.append(f"data.eval_fraction = {eval_fraction:g} is ignored: data.eval_path holds the evaluation examples")
    files = [_scan_file(s, role, roles=role_map, tok=tok, ctx=ctx, seq_len=limit, txt_split=txt_split,
                        max_problems=max_problems)
             for role, group in (("train", train), ("eval", held)) for s in group]
    return DataSummary(files, "tokenizer" if tok else "estimate", tok.path if tok else None,
                       None if tok else CHARS_PER_TOKEN, seq_len, notes)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def format_summary(summary: DataSummary) -> list[str]:
    """Lines for a terminal: one per file, then the problems (one per line, "path, line N: why"), then notes."""
    how = (f"counted with {summary.tokenizer}" if summary.method == "tokenizer"
           else f"estimated: {summary.chars_per_token:g} characters per token, no tokenizer given")
    lines = [f"data: {summary.train_examples:,} training examples per epoch, tokens per example mean "
             f"{summary.mean_tokens:,.0f}, max {summary.max_tokens:,} ({how})"]
    for f in summary.files:
        parts = [f.format or "format unknown", _count(f.records, "record")]
        if f.problem_count:
            parts.append(_count(f.problem_count, "problem"))
        if f.weight != 1.0:
            parts.append(f"weight {f.weight:g} -> {weighted_count(f.examples, f.weight):,} examples")
        if f.untrained:
            parts.append(f"{f.untrained:,} without a trained token within seq_len (dropped)")
        if f.at_seq_len and summary.seq_len:
            parts.append(f"{f.at_seq_len:,} at seq_len {summary.seq_len:,} (cut)")
        lines.append(f"  {f.path}{' (eval)' if f.role == 'eval' else ''}: {f.note or ', '.join(parts)}")
    for f in summary.files:
        lines += f.problems
        if f.problem_count > len(f.problems):
            lines.append(f"{f.path}: {f.problem_count - len(f.problems):,} more problems not shown")
    lines += [f"note: {n}" for n in summary.notes]
    return lines
