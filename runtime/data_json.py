"""Streaming a .json file: a list of records `[{...}, ...]` or `{"data": [{...}, ...], ...}`, one record in memory
at a time, each located as "line N (record index I)" (the line its object starts on).

The text is read in chunks; each element is parsed with json.JSONDecoder.raw_decode and, when a chunk ends
inside it, parsed again with more text (the chunk doubling, so a large element costs O(size log size)).
A .json file that holds one object per line (JSON Lines) is read as JSON Lines.
An element that cannot be parsed ends the file's reading: where the next one starts is unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import IO

from . import data_read
from .data_formats import DataError, Record
from .data_read import Bad, json_problem, too_long

_WS = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 20
_NEAR_END = 16
_DECODER = json.JSONDecoder()  # a parse error this close to the end of the text read so far may only mean "read more"


class _Stop(Exception):
    """The rest of the file cannot be read: (line, why)."""

    def __init__(self, line: int, why: str):
        super().__init__(why)
        self.line, self.why = line, why


class _Text:
    """Decoded text of a binary file, read on demand, with line numbers for any position."""

    def __init__(self, f: IO[bytes]):
        self.f, self.buf, self.pos, self.eof = f, "", 0, False
        self.pending = b""  # the bytes of a character cut by the end of a chunk
        self.line, self.line_pos = 1, 0  # self.line is the line number at buffer index self.line_pos
        self.first = True
        self.error: _Stop | None = None  # a bad byte found after the text still to be parsed

    def line_at(self, p: int) -> int:
        if p >= self.line_pos:
            self.line += self.buf.count("\n", self.line_pos, p)
            self.line_pos = p
            return self.line
        return self.line - self.buf.count("\n", p, self.line_pos)

    def more(self, at_least: int = _CHUNK) -> bool:
        """Read more text (dropping what was consumed); False at the end of the file."""
        if self.error:
            raise self.error
        if self.eof:
            return False
        if self.pos:
            self.line_at(self.pos)
            self.buf, self.line_pos, self.pos = self.buf[self.pos:], 0, 0
        if len(self.buf) > data_read.MAX_RECORD_BYTES:
            raise _Stop(self.line, too_long("a record"))
        data = self.f.read(max(_CHUNK, at_least))
        if not data:
            self.eof = True
            if self.pending:
                raise _Stop(self.line_at(len(self.buf)), "not UTF-8 text (the file ends inside a character)")
            return False
        data, self.pending = self.pending + data, b""
        if self.first:
            data, self.first = data.removeprefix(b"\xef\xbb\xbf"), False
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            text = data[: e.start].decode("utf-8")
            if e.reason == "unexpected end of data" and e.end == len(data):
                self.pending = data[e.start:]  # a character cut by the end of the chunk
            else:  # the text before the bad byte is read first; the error comes when more is needed
                nl = data.rfind(b"\n", 0, e.start)
                line = self.line_at(len(self.buf)) + data[: e.start].count(b"\n")
                before = (len(text) - (text.rfind("\n") + 1) if nl >= 0
                          else len(self.buf) - (self.buf.rfind("\n") + 1) + len(text))
                self.error = _Stop(line, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {before + 1}); "
                                         "save the file as UTF-8")
        self.buf += text
        return True

    def skip_ws(self) -> bool:
        """Move past whitespace; False at the end of the file."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if not self.more():
                return False

    def peek(self) -> str:
        return self.buf[self.pos] if self.skip_ws() else ""

    def value(self):
        grow = _CHUNK
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self.eof and (e.pos >= len(self.buf) - _NEAR_END or e.msg.startswith("Unterminated string")):
                    self.more(grow)
                    grow *= 2
                    continue
                line = self.line_at(self.pos) + self.buf.count("\n", self.pos, e.pos)
                col = e.pos - (self.buf.rfind("\n", 0, e.pos) + 1) + 1
                raise _Stop(line, f"invalid JSON ({e.msg} at column {col})") from None
            except (ValueError, RecursionError) as e:
                raise _Stop(self.line_at(self.pos), json_problem(e)) from None
            if end == len(self.buf) and self.more(grow):  # a number may go on in the next chunk
                grow *= 2
                continue
            self.pos = end
            return obj

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            found = f"{c!r}" if c else "the end of the file"
            raise _Stop(self.line_at(self.pos), f"invalid JSON (expected {what}, found {found})")
        self.pos += 1
        return c


def _elements(t: _Text, path: str) -> Iterator[Record | Bad]:
    """The elements of the list whose '[' is at t.pos."""
    t.expect("[", "'['")
    if t.peek() == "]":
        t.pos += 1
        return
    i = 0
    while True:
        t.skip_ws()
        where = f"line {t.line_at(t.pos)} (record index {i})"
        obj = t.value()
        yield Record(obj, path, where) if isinstance(obj, dict) else \
            Bad(where, f"expected an object, got {type(obj).__name__}")
        i += 1
        if t.expect(",]", "',' or ']' after a record") == "]":
            return


def read_json(path: str, f: IO[bytes], read_jsonl: Callable) -> Iterator[Record | Bad]:
    t = _Text(f)
    shape = "expected a JSON list of records or an object {\"data\": [...]}"
    try:
        c = t.peek()
        if not c:
            return  # an empty file: no records
        if c == "[":
            yield from _elements(t, path)
        elif c == "{":
            start = t.pos
            t.pos += 1
            first_key = t.value() if t.peek() == '"' else None
            if first_key == "data" and t.expect(":", "':'") and t.peek() == "[":
                yield from _elements(t, path)
                while t.expect(",}", "',' or '}'") == ",":
                    t.peek()
                    t.value()
                    t.expect(":", "':'")
                    t.peek()
                    t.value()
            else:
                t.pos = start
                doc = t.value()
                if t.peek() == "{":  # one object per line: JSON Lines in a .json file
                    f.seek(0)
                    yield from read_jsonl(path, f)
                    return
                if not isinstance(doc.get("data"), list):
                    raise DataError(f"{path}: {shape}, got an object with keys {', '.join(sorted(doc)) or '(none)'}")
                for i, d in enumerate(doc["data"]):
                    where = f"record index {i}"
                    yield Record(d, path, where) if isinstance(d, dict) else \
                        Bad(where, f"expected an object, got {type(d).__name__}")
        else:
            raise DataError(f"{path}: {shape}, got {type(t.value()).__name__}")
        if t.peek():
            raise _Stop(t.line_at(t.pos), "invalid JSON (extra data after the list)")
    except _Stop as e:
        yield Bad(f"line {e.line}", e.why + " (reading stopped here)")
