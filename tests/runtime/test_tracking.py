"""Experiment tracking: the [logging] table's checks, the start-up error for a missing package, the environment each
integration gets, and TensorBoard event files written by a short real training through the Trainer."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import struct
from pathlib import Path

import pytest

from peftplan.runtime.tracking import (
    TrackingError,
    logging_settings,
    missing_packages,
    offline,
    planned_environment,
    start_tracking,
)

ENV_KEYS = ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "WANDB_PROJECT", "WANDB_MODE", "MLFLOW_TRACKING_URI",
            "MLFLOW_EXPERIMENT_NAME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.mark.parametrize("table, expected", [
    ({}, {"report_to": [], "run_name": None}),
    (None, {"report_to": [], "run_name": None}),
    ({"report_to": []}, {"report_to": [], "run_name": None}),
    ({"report_to": ["tensorboard"]}, {"report_to": ["tensorboard"], "run_name": None}),
    ({"report_to": ["mlflow", "wandb", "tensorboard"], "run_name": "exp 1"},
     {"report_to": ["mlflow", "wandb", "tensorboard"], "run_name": "exp 1"}),
    ({"report_to": "wandb"}, {"report_to": ["wandb"], "run_name": None}),
])
def test_valid_tables(table, expected):
    assert logging_settings(table) == expected


@pytest.mark.parametrize("table, lines", [
    ({"report_to": ["tensorbord"]},
     ["logging.report_to[0]: must be one of tensorboard, wandb, mlflow, got 'tensorbord'"]),
    ({"report_to": ["wandb", "wandb"]}, ["logging.report_to[1]: 'wandb' is listed twice"]),
    ({"report_to": 3}, ["logging.report_to: must be a list of tensorboard, wandb, mlflow, got 3"]),
    ({"report_to": ["all"]}, ["logging.report_to[0]: must be one of tensorboard, wandb, mlflow, got 'all'"]),
    ({"reportto": ["wandb"]}, ["logging.reportto: unknown key; expected report_to or run_name"]),
    ({"run_name": ""}, ["logging.run_name: must be a non-empty string, got ''"]),
    ({"run_name": "a\nb"}, ["logging.run_name: must be one printable line of at most 128 characters"]),
    ({"run_name": "x" * 129}, ["logging.run_name: must be one printable line of at most 128 characters"]),
    # every problem at once, one line each
    ({"report_to": ["x", "tensorboard"], "colour": 1},
     ["logging.colour: unknown key; expected report_to or run_name",
      "logging.report_to[0]: must be one of tensorboard, wandb, mlflow, got 'x'"]),
])
def test_bad_tables_name_the_key(table, lines):
    with pytest.raises(TrackingError) as err:
        logging_settings(table)
    assert str(err.value).split("\n") == lines


def test_a_table_that_is_not_a_table():
    with pytest.raises(TrackingError, match=r"^\[logging\] must be a table$"):
        logging_settings(["tensorboard"])


def test_missing_package_names_the_pip_command():
    absent = {"wandb", "mlflow", "tensorboard"}

    def find_spec(name):  # as importlib.util.find_spec answers for modules that are not installed
        return None if name in absent else importlib.util.find_spec("json")

    lines = missing_packages(["tensorboard", "wandb", "mlflow"], find_spec)
    assert lines == [
        "logging.report_to: 'wandb' is asked for but the wandb package is not installed: pip install wandb "
        "(or remove 'wandb' from [logging] report_to)",
        "logging.report_to: 'mlflow' is asked for but the mlflow package is not installed: pip install mlflow "
        "(or remove 'mlflow' from [logging] report_to)",
    ]  # tensorboardX stands in for tensorboard
    absent.add("tensorboardX")
    assert missing_packages(["tensorboard"], find_spec)[0].endswith(
        "the tensorboard package is not installed: pip install tensorboard (or remove 'tensorboard' from [logging] "
        "report_to)")


def test_start_fails_for_packages_this_environment_lacks(tmp_path):
    """With the real importlib: whichever of wandb / mlflow is not installed here is one error line each, and
    nothing is set in the environment."""
    wanted = ["wandb", "mlflow"]
    lacking = [n for n in wanted if importlib.util.find_spec(n) is None]
    env: dict[str, str] = {}
    if not lacking:
        start_tracking({"report_to": wanted}, tmp_path / "outputs", "proj", environ=env)
        assert env["WANDB_PROJECT"] == "proj"
        return
    with pytest.raises(TrackingError) as err:
        start_tracking({"report_to": wanted}, tmp_path / "outputs", "proj", environ=env)
    lines = str(err.value).split("\n")
    assert len(lines) == len(lacking)
    for name, line in zip(lacking, lines, strict=True):
        assert line.startswith(f"logging.report_to: {name!r} is asked for") and f"pip install {name}" in line
    assert env == {}


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("on", True),
                                             ("0", False), ("", False), ("false", False)])
def test_offline_reads_both_variables(value, expected):
    assert offline({"HF_HUB_OFFLINE": value}) is expected
    assert offline({"TRANSFORMERS_OFFLINE": value}) is expected


def test_environment_for_each_integration(tmp_path):
    out = tmp_path / "outputs"
    got = planned_environment(["tensorboard", "wandb", "mlflow"], out, "my-proj", {})
    assert got == {
        "TENSORBOARD_LOGGING_DIR": str(out.resolve() / "tensorboard"),
        "WANDB_DIR": str(out.resolve()), "WANDB_PROJECT": "my-proj",
        "MLFLOW_TRACKING_URI": "sqlite:///" + (out.resolve() / "mlflow.db").as_posix(),
        "MLFLOW_EXPERIMENT_NAME": "my-proj",
    }
    assert got["MLFLOW_TRACKING_URI"].startswith("sqlite:////")  # an absolute path: four slashes
    # offline: wandb writes locally and never uploads
    assert planned_environment(["wandb"], out, "p", {"HF_HUB_OFFLINE": "1"})["WANDB_MODE"] == "offline"
    # the user's own settings win: nothing of theirs is replaced
    user = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "online", "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
            "TENSORBOARD_LOGGING_DIR": "/somewhere"}
    got = planned_environment(["tensorboard", "wandb", "mlflow"], out, "p", user)
    assert not set(got) & set(user)
    assert planned_environment([], out, "p", {}) == {}


def test_start_sets_the_environment_and_the_trainer_arguments(tmp_path):
    from transformers import TrainingArguments

    env = {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    t = start_tracking({"report_to": ["tensorboard"]}, tmp_path / "outputs", "proj", environ=env,
                       find_spec=lambda name: importlib.util.find_spec("json"))
    assert env["TENSORBOARD_LOGGING_DIR"] == str((tmp_path / "outputs" / "tensorboard").resolve())
    assert t.env == {"TENSORBOARD_LOGGING_DIR": env["TENSORBOARD_LOGGING_DIR"]}
    assert t.training_arguments() == {"report_to": ["tensorboard"], "run_name": "proj"}  # default: the project
    assert t.notes == [f"tensorboard: event files in {env['TENSORBOARD_LOGGING_DIR']} (view: tensorboard --logdir "
                       f"{env['TENSORBOARD_LOGGING_DIR']})"]
    none = start_tracking({}, tmp_path / "outputs", "proj", environ={})
    assert none.training_arguments() == {"report_to": [], "run_name": None} and none.notes == []
    named = start_tracking({"report_to": [], "run_name": "r1"}, tmp_path, "proj", environ={})
    assert named.run_name == "r1"
    # what transformers makes of them: no integration at all when the list is empty (not "all")
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, **none.training_arguments())
    assert args.report_to == []
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, **t.training_arguments())
    assert args.report_to == ["tensorboard"] and args.run_name == "proj"


# ------------------------------------------------------------------------------------------ a real training run


def _event_proto():
    for module in ("tensorboard.compat.proto.event_pb2", "tensorboardX.proto.event_pb2"):
        try:
            return importlib.import_module(module).Event
        except ImportError:
            continue
    return None



def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under `folder`, read straight from the TFRecord framing
    (uint64 length, uint32 crc, payload, uint32 crc) with the Event protobuf."""
    Event = _event_proto()
    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else (v.tensor.float_val[0] if v.tensor.float_val
                                                                          else None)
                if value is not None:
                    out.setdefault(v.tag, {})[event.step] = value
    return out


@pytest.mark.slow
def test_tensorboard_event_files_from_a_real_training(tmp_path, monkeypatch):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("neither tensorboard nor tensorboardX is installed: the [train] extra needs `tensorboard` "
                    "(pip install tensorboard) for report_to = [\"tensorboard\"]")
    pytest.importorskip("torch")
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from peftplan.runtime.data import DataCollator, prepare_data
    from peftplan.runtime.model import MethodSetup, load_model
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)  # restored after the test, whatever start_tracking sets
    model_dir = build_tiny_model(tmp_path / "model")
    write_dataset(tmp_path / "data.jsonl", "chat", 16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(str(tmp_path / "data.jsonl"), tok, seq_len=64)
    model = load_model(str(model_dir), MethodSetup(method="lora", dtype="float32", gradient_checkpointing=False,
                                                   rank=4, alpha=8, dropout=0.0))
    out = tmp_path / "outputs"
    tracking = start_tracking({"report_to": ["tensorboard"]}, out, "proj")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(out.resolve() / "tensorboard")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, **tracking.training_arguments())
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=DataCollator.from_tokenizer(tok))
    trainer.train()
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    scalars = read_scalars(out / "tensorboard")
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}  # the Trainer's own record
    assert sorted(logged) == [1, 2, 3, 4]
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    for step, loss in logged.items():
        assert math.isclose(scalars["train/loss"][step], loss, rel_tol=1e-6)  # float32 in the event file
    assert "train/learning_rate" in scalars
