"""The spec's data files, read before anything is planned or written (`validate`, `plan`, `generate`).

The runtime's streaming scanner (`runtime/data_scan.py`, standard library only) reads every file: format,
record count, the first problems with file and line (the very messages training would stop with), and token
lengths. Problems are exit 2 before anything is written; the counts fill `data.num_examples` and
`data.avg_tokens` when the spec leaves them out, and a count that disagrees with the file is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Exact token counts run the model's tokenizer over every record (~1 MB/s of JSONL here); above this much data
# the scanner estimates lengths from characters instead, and says so.
EXACT_COUNT_BYTES = 20 * 2**20


@dataclass
class DataCheck:
    summary: object | None  # runtime.data_scan.DataSummary
    lines: list[str] = field(default_factory=list)  # what to show the user
    warnings: list[str] = field(default_factory=list)
    spec: object | None = None  # the spec with num_examples / avg_tokens filled from the data

    @property
    def ok(self) -> bool:
        return self.summary is None or self.summary.ok

    @property
    def lengths(self) -> dict | None:
        """Tokens per example -> examples (the planner's time model reads the distribution, not just the mean)."""
        if self.summary is None or not self.summary.ok:
            return None
        return self.summary.histogram() or None


def _files(spec) -> list[str]:
    d = spec.data
    paths = [] if d.path is None else ([d.path] if isinstance(d.path, str) else list(d.path))
    paths += [s.path for s in d.sources or []]
    return paths


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except (OSError, ValueError):  # a name too long for the file system, NUL bytes: the scanner reports it
        return 0


def _local_tokenizer(spec, base_dir: Path) -> Path | None:
    """The folder holding the model's tokenizer.json, when the model is a local folder or config.json."""
    try:
        candidate = Path(spec.model.name).expanduser()
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        folder = candidate if candidate.is_dir() else candidate.parent if candidate.is_file() else None
    except (OSError, ValueError):
        return None
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


def check_data(spec, spec_path: Path) -> DataCheck:
    """Scan the spec's data files; returns what to print and, when the data tells, a spec with the counts."""
    from .runtime.data_files import looks_like_hub_id
    from .runtime.data_formats import DataError
    from .runtime.data_scan import format_summary, scan_data
    from .schemas import Problem, SpecError

    files = _files(spec)
    if not files:
        return DataCheck(None, spec=spec)
    base = spec_path.parent
    if all(looks_like_hub_id(f) and not _size(base / f) for f in files):
        return DataCheck(None, [f"data: {', '.join(files)}: a hub dataset, read when the run starts (not checked "
                                "here)"], spec=spec)
    size = sum(_size(base / f) for f in files)
    tok = _local_tokenizer(spec, base) if size <= EXACT_COUNT_BYTES else None
    d = spec.data
    sources = [*([d.path] if isinstance(d.path, str) else d.path or []),
               *[{"path": s.path, **({"format": s.format} if s.format else {}),
                  **({"weight": s.weight} if s.weight is not None else {})} for s in d.sources or []]]
    try:
        summary = scan_data(sources, format=d.format, roles=d.roles, seq_len=d.seq_len, tokenizer_dir=tok,
                            eval_path=d.eval_path, eval_fraction=d.eval_fraction, txt_split=d.txt_split,
                            base_dir=base)
    except DataError as exc:
        raise SpecError([Problem("data.path", str(exc))]) from None
    check = DataCheck(summary, format_summary(summary), spec=spec)
    if not summary.ok:
        return check
    found = summary.train_examples
    fill = {}
    if d.num_examples is None:
        fill["num_examples"] = max(1, found)
    elif found and abs(d.num_examples - found) > max(1, 0.02 * found):
        check.warnings.append(f"data.num_examples = {d.num_examples:,}, but the data holds {found:,} training "
                              "examples: time, cost and steps follow data.num_examples")
    if d.avg_tokens is None and summary.mean_tokens:
        fill["avg_tokens"] = max(1, round(summary.mean_tokens))
    if fill:
        check.spec = spec.model_copy(update={"data": d.model_copy(update=fill)})
        check.lines.append("note: " + ", ".join(f"data.{k} not set: {v:,} (from the data)" for k, v in fill.items()))
    return check
