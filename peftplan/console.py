"""The one way peftplan writes to a terminal: text that came from users is never interpreted.

Names, paths and messages reach the output from specs, config.json files, data files and the file system.
Printed naively they can inject rich markup (`[link=…]`, or a `[/]` that raises MarkupError) or terminal
control sequences (ANSI escapes, bidi overrides that reorder a line, line separators). So:

- `Console` never parses markup: styles come only from `styled()` / `Text` pieces built by peftplan itself;
- every string it renders, and every line `emit()` prints, passes through `printable()` (runtime/messages.py,
  shared with the training runtime), which shows control characters as visible escapes instead of sending them.
"""

from __future__ import annotations

import sys

from .runtime.messages import printable


def styled(*parts):
    """A rich `Text` from plain strings and (text, style) pairs; every piece is made printable."""
    from rich.text import Text

    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(printable(part[0]), style=part[1])
        elif isinstance(part, Text):
            text.append_text(part)
        else:
            text.append(printable(part))
    return text


def make_console(stderr: bool = False):
    """A rich Console that parses no markup and shows control characters as escapes."""
    from rich.console import Console as _Console

    class Console(_Console):
        def render_str(self, text, **kwargs):
            kwargs["markup"] = False
            kwargs["emoji"] = False
            return super().render_str(printable(text, newlines=True), **kwargs)

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 132  # pipes and CI logs: wide enough for the breakdown bars
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width, markup=False, emoji=False)


def emit(message: object, file=None) -> None:
    """Print a plain message line by line (errors, notes), each line made printable."""
    stream = file if file is not None else sys.stdout
    for line in str(message).split("\n"):
        print(printable(line), file=stream)
