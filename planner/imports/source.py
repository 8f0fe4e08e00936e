"""Reading the other tool's YAML: a regular file of bounded size, `yaml.safe_load`, the line of every top-level key
(for messages) and keys written twice (YAML keeps the last silently). Problems are `SpecError`s naming the file
and line; PyYAML missing says what to install.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...schemas import Problem, SpecError
from ...schemas.load import read_small_text

MAX_CONFIG_BYTES = 2**20  # training configs are a few KiB


def read_text(path: Path, what: str = "config") -> str:
    return read_small_text(path, MAX_CONFIG_BYTES, what, f"pass the {what} file itself", kind=f"training {what}")


def _yaml():
    try:
        import yaml
    except ImportError:
        raise SpecError([Problem("", "reading YAML configs needs PyYAML, which is not installed: "
                                     "pip install pyyaml")]) from None
    return yaml


def read_yaml(path: Path) -> tuple[dict, dict[str, int], list[str]]:
    """The config as a dict, the line of each top-level key, and warnings (keys written twice)."""
    yaml = _yaml()
    text = read_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p) or "invalid YAML"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise SpecError([Problem("", f"YAML syntax error: {what}", line, column=column)], path) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem("", f"not valid YAML: {str(exc)[:200]}")], path) from None
    except (RecursionError, ValueError, TypeError) as exc:  # nesting too deep; a value the loader cannot build
        raise SpecError([Problem("", f"not a usable YAML config: {type(exc).__name__}: {str(exc)[:200]}")],
                        path) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}, not a mapping of settings"
        raise SpecError([Problem("", f"the YAML document is {kind}: not an axolotl or LLaMA-Factory config")], path)
    lines: dict[str, int] = {}
    warnings: list[str] = []
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            if key in lines:
                shown = value_node.value if isinstance(value_node, yaml.ScalarNode) else "…"
                warnings.append(f"{path}:{key_node.start_mark.line + 1}: {key} is written twice (first on line "
                                f"{lines[key]}); YAML keeps the last value, {shown!r}, and so does this import")
            else:
                lines[key] = key_node.start_mark.line + 1
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise SpecError([Problem("", f"top-level keys must be names; found {bad[0]!r}")], path)
    return data, lines, warnings


def find_file(name: str, config: Path, what: str) -> Path | None:
    """A file the config names by a relative path, which the tool resolves against the directory it is run from:
    the current directory first, then the config's folder and up to three folders above it (a config inside the
    tool's own checkout, run from its root). None when not found."""
    p = Path(name).expanduser()
    try:
        if p.is_absolute():
            return p if p.is_file() else None
        candidates = [Path.cwd() / p]
        folder = config.resolve().parent
        for _ in range(4):
            candidates.append(folder / p)
            if folder.parent == folder:
                break
            folder = folder.parent
        return next((c for c in candidates if c.is_file()), None)
    except (OSError, ValueError):  # a name too long for a path, NUL bytes
        return None


def read_json(path: Path, what: str) -> dict:
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([Problem("", f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({what}): {exc.msg}")]) \
            from None
    except (ValueError, RecursionError) as exc:
        raise SpecError([Problem("", f"{path}: not usable JSON ({what}): {str(exc)[:200]}")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem("", f"{path} does not hold a JSON object ({what})")])
    return data
