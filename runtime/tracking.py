"""Experiment tracking: plan.toml's `[logging]` table, checked, and the settings the Trainer's integrations need.

    [logging]
    report_to = ["tensorboard"]     # tensorboard | wandb | mlflow; empty (the default): outputs/metrics.jsonl only
    run_name = "my-run"             # optional; default: the project folder's name

The transformers Trainer does the reporting itself (TrainingArguments(report_to=..., run_name=...)); this module
checks the table, fails at start with one line per missing package (not after the model has loaded), and sets
the environment variables the integrations read, so that everything lands under the run's output folder:

- tensorboard: event files in outputs/tensorboard/ (TENSORBOARD_LOGGING_DIR). Works offline. Needs the
  `tensorboard` package (or `tensorboardX`). A resumed run appends to the same folder: one curve per run.
- wandb: WANDB_DIR = outputs/ (wandb writes outputs/wandb/), WANDB_PROJECT = the project folder's name. When
  HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, WANDB_MODE=offline: the run is written locally and never
  uploaded; `wandb sync outputs/wandb/offline-run-*` uploads it later. Needs `pip install wandb`.
- mlflow: MLFLOW_TRACKING_URI = a SQLite store in outputs/mlflow.db (view it with
  `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`), MLFLOW_EXPERIMENT_NAME = the project folder's
  name. Needs `pip install mlflow`.

A variable the user has already set is never changed (set WANDB_MODE=online, or MLFLOW_TRACKING_URI to a
server, to report elsewhere). Standard library only: runtime/config.py imports it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# integration -> (modules any one of which makes it work, the pip command that installs it)
INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}
KEYS = ("report_to", "run_name")
MAX_RUN_NAME = 128
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
_TRUE = ("1", "true", "yes", "on")


class TrackingError(ValueError):
    """The [logging] table is wrong, or an integration it asks for is not installed; the message names the key."""


def logging_settings(table: Any) -> dict:
    """The [logging] table of plan.toml, checked: {"report_to": [names], "run_name": str | None}.

    TrackingError, one line per problem, each naming the key as written (`logging.report_to[1]: ...`)."""
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise TrackingError("[logging] must be a table")
    problems = [f"logging.{k}: unknown key; expected {' or '.join(KEYS)}" for k in table if k not in KEYS]
    report_to = table.get("report_to", [])
    names: list[str] = []
    if isinstance(report_to, str):  # a single name written without brackets
        report_to = [report_to]
    if not isinstance(report_to, list):
        problems.append(f"logging.report_to: must be a list of {', '.join(INTEGRATIONS)}, got {report_to!r:.80}")
        report_to = []
    for i, name in enumerate(report_to):
        if name not in INTEGRATIONS:
            problems.append(f"logging.report_to[{i}]: must be one of {', '.join(INTEGRATIONS)}, got {name!r:.80}")
        elif name in names:
            problems.append(f"logging.report_to[{i}]: {name!r} is listed twice")
        else:
            names.append(name)
    run_name = table.get("run_name")
    if run_name is not None:
        if not isinstance(run_name, str) or not run_name.strip():
            problems.append(f"logging.run_name: must be a non-empty string, got {run_name!r:.80}")
        elif len(run_name) > MAX_RUN_NAME or not run_name.isprintable():
            problems.append(f"logging.run_name: must be one printable line of at most {MAX_RUN_NAME} characters")
    if problems:
        raise TrackingError("\n".join(problems))
    return {"report_to": names, "run_name": run_name}


def missing_packages(report_to: list[str], find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
    """One line per integration in `report_to` whose package is not installed, with the command that installs it."""
    out = []
    for name in report_to:
        modules, command = INTEGRATIONS[name]
        if not any(find_spec(m) is not None for m in modules):
            out.append(f"logging.report_to: {name!r} is asked for but the {modules[0]} package is not installed: "
                       f"{command} (or remove {name!r} from [logging] report_to)")
    return out


def offline(environ: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to a true value (as huggingface_hub reads them)."""
    return any(str(environ.get(k, "")).strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def planned_environment(report_to: list[str], output_dir: Path, project: str,
                        environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to set for `report_to`: only those not already in `environ` (the user's setting wins)."""
    out = Path(output_dir).resolve()
    want: dict[str, str] = {}
    if "tensorboard" in report_to:
        want["TENSORBOARD_LOGGING_DIR"] = str(out / TENSORBOARD_DIR)
    if "wandb" in report_to:
        want.update(WANDB_DIR=str(out), WANDB_PROJECT=project)
        if offline(environ):
            want["WANDB_MODE"] = "offline"
    if "mlflow" in report_to:
        want.update(MLFLOW_TRACKING_URI=f"sqlite:///{(out / MLFLOW_DB).as_posix()}", MLFLOW_EXPERIMENT_NAME=project)
    return {k: v for k, v in want.items() if not environ.get(k)}


def _notes(report_to: list[str], environ: Mapping[str, str]) -> list[str]:
    notes = []
    if "tensorboard" in report_to:
        notes.append(f"tensorboard: event files in {environ['TENSORBOARD_LOGGING_DIR']} "
                     f"(view: tensorboard --logdir {environ['TENSORBOARD_LOGGING_DIR']})")
    if "wandb" in report_to:
        mode = environ.get("WANDB_MODE", "online")
        where = f"{environ.get('WANDB_DIR', '.')}/wandb"
        if mode == "offline":
            notes.append(f"wandb: offline (HF_HUB_OFFLINE or WANDB_MODE is set): the run is written to {where}; "
                         "upload it later with wandb sync")
        else:
            notes.append(f"wandb: project {environ.get('WANDB_PROJECT', 'huggingface')!r}, mode {mode} "
                         "(set WANDB_MODE=offline to keep the run local)")
    if "mlflow" in report_to:
        uri = environ.get("MLFLOW_TRACKING_URI", "")
        note = f"mlflow: tracking URI {uri}, experiment {environ.get('MLFLOW_EXPERIMENT_NAME', 'Default')!r}"
        if offline(environ) and uri.startswith(("http://", "https://")):
            note += " (a server, although HF_HUB_OFFLINE is set: mlflow will try to reach it)"
        notes.append(note)
    return notes


@dataclass(frozen=True)
class Tracking:
    report_to: list[str]
    run_name: str | None
    env: dict[str, str] = field(default_factory=dict)  # what start_tracking set (the user's own settings are kept)
    notes: list[str] = field(default_factory=list)  # one line per integration: where it writes

    def training_arguments(self) -> dict:
        """The keyword arguments for transformers.TrainingArguments."""
        return {"report_to": list(self.report_to), "run_name": self.run_name}


def start_tracking(settings: Mapping[str, Any] | None, output_dir: Path, project: str,
                   environ: MutableMapping[str, str] = os.environ,
                   find_spec: Callable[[str], Any] = importlib.util.find_spec) -> Tracking:
    """Check that every integration asked for is installed (TrackingError, one line each, naming the pip command)
    and set the environment it reads. `settings`: logging_settings()'s result (RunConfig.logging).
    Call it before the model loads, on every process (only the main one writes)."""
    settings = logging_settings(settings or {})
    report_to = settings["report_to"]
    missing = missing_packages(report_to, find_spec)
    if missing:
        raise TrackingError("\n".join(missing))
    env = planned_environment(report_to, output_dir, project, environ)
    for key, value in env.items():
        environ[key] = value
    return Tracking(report_to, settings["run_name"] or (project if report_to else None), env,
                    _notes(report_to, environ))
