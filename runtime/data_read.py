"""The readers behind data_files.read_file, streaming, one record at a time: .jsonl/.ndjson, .csv, .parquet,
.txt (.json is data_json). Each yields a Record, or a Bad (an unreadable record: where + why), per record.

Memory is bounded by the largest record, never the file. Hostile input becomes a Bad or a DataError naming the
file and the line, never another exception: bytes that are not UTF-8 (a UTF-8 BOM is accepted), UTF-16/32 or
binary files, numbers with more digits than Python reads, nesting deeper than its JSON reader allows, lines over
MAX_RECORD_BYTES, CSV fields over CSV_FIELD_LIMIT characters.

Locations: JSONL, CSV and TXT records are "line N" (the line the record starts on; a CSV header is line 1);
JSON records are "line N (record index I)"; Parquet records "record index I".

Plain text (.txt): documents are separated by one or more blank lines (lines holding only whitespace); each
document is one `text` record, its line breaks kept. With txt_split="line", every non-blank line is a record.
Standard library only; pyarrow is imported for Parquet files.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from .data_formats import DataError, Record

MAX_RECORD_BYTES = 128 * 2**20  # one line / one JSON element / one text document
CSV_FIELD_LIMIT = MAX_RECORD_BYTES  # characters; Python's default (131072) is too small for long documents
TXT_SPLITS = ("blank_line", "line")
FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
_CHUNK = 1 << 20

__all__ = ["Bad", "FILE_TYPES", "TXT_SPLITS", "MAX_RECORD_BYTES", "CSV_FIELD_LIMIT", "read_jsonl", "read_csv",
           "read_txt", "read_parquet", "check_text_file"]


@dataclass(frozen=True)
class Bad:
    """An unreadable record: where it is in the file and why ("line 3", "invalid JSON (...)")."""

    where: str
    message: str


class BadBytes(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def decode_line(raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[: e.start].decode("utf-8", "replace")) + 1
        raise BadBytes(line, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); "
                              "save the file as UTF-8") from None


def json_problem(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested deeper than Python's JSON reader allows"
    if "integer string conversion" in str(e):
        return f"invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits (the most Python reads)"
    return f"invalid JSON ({e})"


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; bytes is None for a line over MAX_RECORD_BYTES (its rest is skipped)."""
    n = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield n, None
            continue
        yield n, (raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)


def too_long(what: str) -> str:
    return f"{what} longer than {MAX_RECORD_BYTES:,} bytes"


def read_jsonl(path: str, f: IO[bytes]) -> Iterator[Record | Bad]:
    for n, raw in _lines(f):
        where = f"line {n}"
        if raw is None:
            yield Bad(where, too_long("a line") + " (a JSON list? name the file .json)")
            continue
        try:
            text = decode_line(raw, n)
        except BadBytes as e:
            yield Bad(where, e.message)
            continue
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            hint = " (a JSON list? name the file .json)" if n == 1 and text.lstrip().startswith("[") else ""
            yield Bad(where, json_problem(e) + hint)
            continue
        if isinstance(data, dict):
            yield Record(data, path, where)
        else:
            yield Bad(where, f"expected a JSON object, got {type(data).__name__}")


def read_txt(path: str, f: IO[bytes], split: str) -> Iterator[Record | Bad]:
    doc: list[str] = []
    start, size, bad = 0, 0, None  # bad: (line, why) of the first unreadable line of the document

    def finish():
        if bad:
            return Bad(f"line {bad[0]}", bad[1])
        text = "".join(doc)
        return Record({"text": text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")}, path, f"line {start}")

    for n, raw in _lines(f):
        text, why = None, None
        if raw is None:
            why = too_long("a line")
        else:
            try:
                text = decode_line(raw, n)
            except BadBytes as e:
                why = e.message
        if text is not None and not text.strip():  # a blank line ends the document
            if start:
                yield finish()
            doc, start, size, bad = [], 0, 0, None
            continue
        if split == "line":
            yield Bad(f"line {n}", why) if why else Record({"text": text.rstrip("\r\n")}, path, f"line {n}")
            continue
        start = start or n
        size += len(raw) if raw is not None else MAX_RECORD_BYTES
        if why is None and size > MAX_RECORD_BYTES:
            why = too_long("a document") + " (no blank lines between documents?)"
        if why and bad is None:
            bad, doc = (n, why), []
        if bad is None:
            doc.append(text)
    if start:
        yield finish()


def read_csv(path: str, f: IO[bytes]) -> Iterator[Record | Bad]:
    def text_lines():
        for n, raw in _lines(f):
            if raw is None:
                raise BadBytes(n, too_long("a line"))
            yield decode_line(raw, n)

    old = csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(text_lines())
    start = 1
    try:
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            if not row:
                continue
            if header is None:
                header = row
                continue
            yield Record(dict(zip(header, row, strict=False)), path, f"line {start}")
    except BadBytes as e:
        yield Bad(f"line {e.line}", e.message + " (reading stopped here)")
    except csv.Error as e:
        why = (f"a field longer than {CSV_FIELD_LIMIT:,} characters (an unclosed quote?)"
               if "field limit" in str(e) else f"unreadable CSV ({e})")
        yield Bad(f"line {start}", why + " (reading stopped here)")
    finally:
        csv.field_size_limit(old)


def read_parquet(path: str) -> Iterator[Record | Bad]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow, which is not installed "
                        "(pip install pyarrow), or convert the file to JSONL") from None
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield Record(row, path, f"record index {i}")
                i += 1
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own ArrowInvalid / OSError types
        raise DataError(f"{path}: unreadable Parquet file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_text_file(path: str, f: IO[bytes]) -> None:
    head = f.read(4096)
    f.seek(0)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 or UTF-32 text (it starts with that byte order mark); "
                        "save it as UTF-8")
    if b"\x00" in head:
        line = head[: head.index(b"\x00")].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: a NUL byte: this is binary data or UTF-16/32 text, not UTF-8; "
                        "save it as UTF-8")
