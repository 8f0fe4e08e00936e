"""Trainer callbacks: a rich progress display, the metrics file, the measured peak memory, NaN guard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback


def _is_main(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


class MetricsFile(TrainerCallback):
    """Appends one JSON line per logged step to `metrics.jsonl`, and once the measured peak memory
    next to the plan's prediction."""

    def __init__(self, path: Path, tokens_per_step: int, prediction: dict):
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step  # real (non-padding) tokens per optimizer step, across devices
        self.prediction = prediction
        self._t0 = None
        self._step0 = 0

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")  # NaN/inf become null: every line stays valid JSON

    def on_train_begin(self, args, state, control, **kw):
        self._t0, self._step0 = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if not _is_main(state) or not logs:
            return
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        steps = max(state.global_step - self._step0, 1)
        record = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items()
                                                                       if isinstance(v, (int, float, str))}}
        record["tokens_per_second"] = self.tokens_per_step * steps / elapsed if elapsed > 0 else None
        predicted = self.prediction.get("tokens_per_second")
        if isinstance(predicted, (int, float)) and predicted > 0 and "loss" in logs:
            record["predicted_tokens_per_second"] = predicted  # the plan's time model, real tokens per second
        record["memory_bytes"] = current_memory()
        record["time"] = time.time()
        self.write(record)


def current_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001 - memory reporting never stops training
        return None
    from .memprobe import rss_bytes

    return rss_bytes()


def local_parameter_fraction(model) -> float:
    """The share of the model's parameter elements this process holds: 1.0 unsharded, about 1/N under FSDP
    over N processes (its parameters are DTensors whose local shards are what this rank stores)."""
    full = local = 0
    for p in model.parameters():
        full += p.numel()
        local += (p.to_local() if hasattr(p, "to_local") else p).numel()
    return round(local / full, 4) if full else 1.0


def predicted_at_row_length(prediction: dict, row: int | None) -> int | None:
    """The plan's predicted peak for rows of `row` tokens: linear between its [row length, bytes] points."""
    points = prediction.get("peak_by_row_length")
    if not points or not row:
        return None
    if row <= points[0][0]:
        return int(points[0][1])
    for (a, pa), (b, pb) in zip(points, points[1:], strict=False):
        if row <= b:
            return int(pa + (pb - pa) * (row - a) / (b - a))
    return int(points[-1][1])


class PeakMemory(TrainerCallback):
    """Measures one steady-state optimizer step (the second: optimizer state exists) and records it.

    CUDA: torch.cuda.max_memory_allocated / max_memory_reserved over that step. CPU: peak live tensor
    bytes (memprobe.LiveTensorBytes), the CPU equivalent of max_memory_allocated.
    """

    def __init__(self, metrics: MetricsFile, measure_step: int = 1):
        self.metrics = metrics
        self.measure_step = measure_step
        self._mode = None
        self._local_fraction = None
        self.result: dict | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step != self.measure_step or self.result is not None:
            return
        import torch

        state.longest_batch_shape = None  # PlanTrainer.training_step keeps the longest micro-batch of this step
        self._local_fraction = local_parameter_fraction(model) if model is not None else None

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        from .memprobe import LiveTensorBytes, model_tensors

        state_tensors = []
        if optimizer is not None:
            for st in getattr(optimizer, "state", {}).values():
                state_tensors += [t for t in st.values() if isinstance(t, torch.Tensor)]
        self._mode = LiveTensorBytes(model_tensors(model) + state_tensors)
        self._mode.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step != self.measure_step + 1 or self.result is not None:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            measured = {"measured_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                        "measured_peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                        "device": torch.cuda.get_device_name()}
        elif self._mode is not None:
            self._mode.__exit__(None, None, None)
            measured = {"measured_peak_allocated_bytes": int(self._mode.peak), "device": "cpu",
                        "method": "peak live tensor bytes (TorchDispatchMode)"}
            self._mode = None
        else:
            return
        predicted = self.metrics.prediction.get("peak_allocated_bytes")
        shape = getattr(state, "longest_batch_shape", None) or getattr(state, "last_batch_shape", None)
        at_shape = predicted_at_row_length(self.metrics.prediction, shape[1] if shape else None)
        got = measured["measured_peak_allocated_bytes"]
        self.result = {"event": "peak_memory", "step": state.global_step, **measured,
                       "measured_batch_shape": shape,
                       "parameters_held_locally": self._local_fraction,
                       "predicted_peak_allocated_bytes": predicted,
                       "predicted_for_measured_shape": at_shape,
                       "predicted_device_total_bytes": self.metrics.prediction.get("device_total_bytes"),
                       "error": (at_shape - got) / got if at_shape else None,
                       "error_vs_full_rows": (predicted - got) / got if predicted else None,
                       "note": "error: the prediction for the measured batch shape (its longest row), interpolated "
                               "between the plan's predictions by row length; error_vs_full_rows: against full rows "
                               "of seq_len, the plan's worst case"}
        if _is_main(state):
            self.metrics.write(self.result)

    def on_train_end(self, args, state, control, **kw):
        if self._mode is not None:  # training ended inside the measured step
            self._mode.__exit__(None, None, None)
            self._mode = None


class RichProgress(TrainerCallback):
    """Step, loss, tokens/s, ETA and memory on one live line (main process only)."""

    def __init__(self, tokens_per_step: int, console=None):
        self.tokens_per_step = tokens_per_step
        self.console = console
        self.progress = None
        self.task = None
        self.loss = math.nan
        self._t0 = time.perf_counter()
        self._step0 = 0

    def on_train_begin(self, args, state, control, **kw):
        if not _is_main(state):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TextColumn("mem {task.fields[mem]}"), TimeRemainingColumn(), console=self.console,
                                 transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="…", tps="…", mem="…")
        self._t0, self._step0 = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kw):
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        tps = self.tokens_per_step * (state.global_step - self._step0) / elapsed if elapsed > 0 else 0
        mem = current_memory()
        self.progress.update(self.task, completed=state.global_step, tps=f"{tps:,.0f}",
                             mem=f"{mem / 2**30:.2f} GiB" if mem else "?",
                             loss=f"{self.loss:.4f}" if self.loss == self.loss else "…")

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
