"""Argument types shared by the project's entry scripts (train, sample) and the peftplan CLI."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """A whole number ≥ 1 (steps, prompts, tokens), or argparse's usage error (exit 2) saying why not."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n
