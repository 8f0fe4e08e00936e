"""Tokenizing records: response-only labels, and long texts tokenized only as far as seq_len needs.

    ex = tokenize_record({"prompt": "Q:", "completion": " A"}, "completion", tokenizer, seq_len=2048)
    examples = tokenize_records(records, "chat", tokenizer, seq_len=2048)

A record becomes its (text, trained) segments (data_formats.segments), each tokenized without special tokens;
labels are -100 outside trained text; the tokenizer's own prefix (a BOS) starts non-chat records (chat templates
write their own); an EOS ends the response unless the template already did; then everything is cut to seq_len.

Bounded work per record: encode_prefix tokenizes at most about 3 * (budget + MARGIN) * chars_per_token characters
of a text it keeps `budget` tokens of, and chat content is cut before rendering, so a 50 MB record with
seq_len=64 hands the tokenizer a few thousand characters and yields exactly the tokens and labels the whole
record would have had in its first 64 positions. Standard library only; the tokenizer is duck-typed
(`__call__(text, add_special_tokens=...)["input_ids"]`, `eos_token_id`, `get_vocab`, `apply_chat_template`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .data_files import FileCheck, resolve_roles
from .data_formats import CHAT_FORMATS, DataError, Record, segments

__all__ = ["IGNORE", "MARGIN", "Example", "chars_per_token", "encode_prefix", "tokenize_record", "tokenize_records",
           "try_tokenize", "trained", "context"]

IGNORE = -100
MARGIN = 64  # tokens read past what is kept, so that where a text is cut changes only tokens that are dropped
Example = dict  # {"input_ids": [...], "attention_mask": [...], "labels": [...]} (+ "position_ids" when packed)


def chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token stands for: the longest token string in the vocabulary
    (byte-level vocabularies spell each byte as one character, so this bounds characters too)."""
    try:
        return max(1, max(map(len, tokenizer.get_vocab()), default=1))
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: encode_prefix still grows until it has enough
        return 16


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prefix(tokenizer, text: str, budget: int, cpt: int) -> list[int]:
    """The first `budget` tokens of `text` (all of them if it has fewer), tokenizing only a prefix of it.

    A token stands for at most `cpt` characters (chars_per_token), so (budget + MARGIN) * cpt characters give at
    least budget + MARGIN tokens; where the text is cut changes only the last tokens (the pre-token the cut falls
    in). The first `budget` tokens are kept when cutting at n and at 2n characters agrees on them; otherwise, or
    with fewer tokens than expected (a normalizer that shrinks text), n doubles, up to the whole text.
    """
    n = (budget + MARGIN) * cpt
    while n < len(text):
        ids = _encode(tokenizer, text[:n])
        if len(ids) >= budget + MARGIN:
            longer = _encode(tokenizer, text[: 2 * n]) if 2 * n < len(text) else _encode(tokenizer, text)
            if longer[:budget] == ids[:budget]:
                return ids[:budget]
        n *= 2
    return _encode(tokenizer, text)[:budget]


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text by itself (a BOS for Llama-style tokenizers, none for GPT-2)."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(with_sp) - len(without)
    return with_sp[:n] if n > 0 and with_sp[n:n + len(without)] == without else []


@dataclass(frozen=True)
class Context:
    tokenizer: Any
    seq_len: int
    prefix: list
    cpt: int
    roles: Mapping[str, str] | None


def context(tokenizer, seq_len: int, roles=None) -> Context:
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    return Context(tokenizer, seq_len, _special_prefix(tokenizer), chars_per_token(tokenizer), resolve_roles(roles))


def _tokenize_once(data: dict, fmt: str, c: Context, cap: int) -> tuple[Example, bool]:
    pieces, cut = segments(data, fmt, c.tokenizer, c.roles, cap)
    ids: list[int] = []
    labels: list[int] = []
    if fmt not in CHAT_FORMATS:  # a chat template writes its own BOS into the text
        ids += c.prefix
        labels += c.prefix if fmt == "text" else [IGNORE] * len(c.prefix)
    last_trained: list[int] = []
    for text, trained in pieces:
        if len(ids) >= c.seq_len:
            break
        if not text:
            continue
        piece = encode_prefix(c.tokenizer, text, c.seq_len - len(ids), c.cpt)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
        if trained:
            last_trained = piece
    eos = c.tokenizer.eos_token_id
    if len(ids) < c.seq_len and eos is not None and eos not in last_trained:  # the response wasn't ended
        ids.append(eos)
        labels.append(eos)
    ids, labels = ids[: c.seq_len], labels[: c.seq_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, cut


def _tokenize(data: dict, fmt: str, c: Context) -> Example:
    """Chat content is cut at (seq_len + MARGIN) * cpt characters before rendering (a cut record still fills
    seq_len); if it falls short of seq_len anyway, the cut is retried four times longer, up to no cut."""
    cap = (c.seq_len + MARGIN) * c.cpt
    while True:
        ex, cut = _tokenize_once(data, fmt, c, cap)
        if not cut or len(ex["input_ids"]) >= c.seq_len:
            return ex
        cap *= 4


def tokenize_record(data: dict, fmt: str, tokenizer, seq_len: int, roles: Mapping[str, str] | None = None) -> Example:
    """input_ids / attention_mask / labels for one valid record; labels are -100 outside the trained text."""
    return _tokenize(data, fmt, context(tokenizer, seq_len, roles))


def try_tokenize(record: Record, fmt: str, c: Context) -> tuple[Example | None, str]:
    """(example, "") or (None, why): a chat template that fails or is not prefix-stable on this record."""
    try:
        return _tokenize(record.data, fmt, c), ""
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the template is the model's code; any failure is this record's problem
        return None, f"cannot render the record ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def trained(example: Example) -> bool:
    return any(x != IGNORE for x in example["labels"])


def tokenize_records(records: Sequence[Record], fmt: str, tokenizer, seq_len: int, drop_untrained: bool = True,
                     roles: Mapping[str, str] | None = None) -> list[Example]:
    """Tokenize validated records. With drop_untrained, examples left with no trained token (the prompt fills
    seq_len) are dropped; `len(records) - len(result)` says how many."""
    c = context(tokenizer, seq_len, roles)
    out, check = [], FileCheck(records[0].path if records else "")
    for r in records:
        ex, why = try_tokenize(r, fmt, c)
        if ex is None:
            check.add(r.where, why)
        elif not drop_untrained or trained(ex):
            out.append(ex)
    if check.count:
        raise check.error()
    return out
