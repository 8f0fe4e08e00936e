"""Rewrite the generated section of a hand-written document, between two marker comments."""

from __future__ import annotations

from pathlib import Path


def replace_section(doc: Path, begin: str, end: str, text: str) -> bool:
    """Put `text` between `begin` and `end` in `doc`; False when the file or a marker is missing."""
    if not doc.exists():
        return False
    body = doc.read_text()
    if begin not in body or end not in body:
        return False
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{tail}")
    return True
