"""Text for terminals and logs, made safe: the one implementation (the peftplan CLI imports it too).

Paths, model names and data reach messages from users' files. Printed as they are, control characters in them
(ANSI escapes, bidi overrides that reorder a line, Unicode line separators) would act on the terminal instead of
being shown. `printable()` shows each as a visible escape (`\\x1b`, `\\u202e`); `say()` prints through it.
"""

from __future__ import annotations

import sys
import unicodedata

# Besides the C0/C1 controls: bidi embeddings, overrides and isolates ("Trojan Source", CVE-2021-42574), the
# left-to-right / right-to-left / Arabic letter marks, and the Unicode line and paragraph separators.
_DANGEROUS = {0x2028, 0x2029, 0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def printable(value: object, *, newlines: bool = False, limit: int | None = None) -> str:
    """`value` as text safe to show: control and bidi characters and lone surrogates (undecodable bytes in file
    names) become visible escapes. With `newlines`, line breaks and tabs are kept; otherwise one line. With
    `limit`, longer text is cut and says how much was left out."""
    text = str(value)
    cut = 0
    if limit is not None and len(text) > limit:
        cut, text = len(text) - limit, text[:limit]
    out = []
    for ch in text:
        n = ord(ch)
        if newlines and ch in "\n\t":
            out.append(ch)
        elif n < 0x20 or 0x7F <= n < 0xA0 or n in _DANGEROUS or 0xD800 <= n < 0xE000 \
                or unicodedata.category(ch) in ("Zl", "Zp"):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out) + (f"… ({cut:,} more characters)" if cut else "")


def say(message: object, stream=None) -> None:
    """Print a message line by line, each line made printable (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    for line in str(message).split("\n"):
        print(printable(line), file=stream, flush=True)
