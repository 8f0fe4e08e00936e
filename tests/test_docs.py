"""The reference in docs/ is generated from the code users run: it must be current, and nothing in the repository
points users outside it."""

from __future__ import annotations

import re
from pathlib import Path

from peftplan.parser import build_parser
from peftplan.parser import markdown as cli_markdown
from peftplan.schemas.reference import markdown as spec_markdown
from peftplan.schemas.spec import Spec

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_markdown(), "run `make docs`"


def test_spec_reference_is_current():
    assert (ROOT / "docs" / "spec.md").read_text() == spec_markdown(), "run `make docs`"


def test_every_spec_key_is_in_the_reference():
    text = (ROOT / "docs" / "spec.md").read_text()
    for table, field in Spec.model_fields.items():
        assert f"## `[{table}]`" in text
        for key in field.annotation.model_fields:
            assert f"| `{key}` |" in text, f"{table}.{key} missing from docs/spec.md"


def test_every_command_and_option_has_help_and_an_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, cmd in sub.choices.items():
        assert cmd.description and cmd.epilog and f"peftplan {name}" in cmd.epilog, name
        for action in cmd._actions:
            if action.dest != "help":
                assert action.help, f"peftplan {name} {action.option_strings or action.dest} has no help"


def test_nothing_points_outside_the_repository():
    """Users never see the team's shared notes: no file in the repository refers to them."""
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".j2", ".toml")
               and ".venv" not in p.parts and ".git" not in p.parts and "egg-info" not in str(p)]
    for p in tracked:
        text = p.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"CONTRACT\.md|\.\./shared|DESIGN\.md|STYLE\.md", text), p
