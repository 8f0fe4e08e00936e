"""`python train.py --probe` (`peftplan run DIR --probe`): will this plan's worst step fit on *this* device?

The plan's memory is an estimate; the device in front of the user is the final word. The probe loads the model
exactly as training does (runtime/train.py: the method, the chunked or full loss, checkpointing, autocast, the
optimizer, activation offloading) and runs the Trainer for a few optimizer steps on a synthetic batch of the
plan's worst-case shape: `micro_batch_size` rows of the full `seq_len`, random token ids, every token labelled (the
chunked loss's worst case), packed rows as two documents each when the plan packs. With gradient accumulation an
optimizer step takes two micro-batches, so the second forward runs with the first one's gradients held, as every
later one does. It trains nothing that is kept: no checkpoint, no adapter, no tracker; only one record appended to
`outputs/metrics.jsonl` (`"kind": "probe"`).

- Step 1 warms up and creates the optimizer state; the plan predicts a steady-state step, so step 2 is the one
  measured (callbacks.PeakMemory, as in every training run: CUDA max_memory_allocated / max_memory_reserved, on
  the CPU peak live tensor bytes). On the CPU that count slows step 2, so step 3 is the one timed.
- Fit: on CUDA, the device memory in use right after the measured step (`torch.cuda.mem_get_info`: the caching
  allocator keeps its reserve, plus the CUDA context and any other process) against this GPU's memory; on the CPU,
  the peak live tensor bytes plus the plan's allocator slack against the plan's `prediction.device_memory_bytes`
  (hardware.memory_gib), else this machine's RAM. Over the memory: does not fit (exit 5; a CUDA out-of-memory
  error is the same verdict). Over the memory less the planner's headroom: too tight to start a long run (exit 6).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from .config import RunConfig
from .messages import say

EXIT_NOFIT, EXIT_TIGHT = 5, 6
# The planner's fit headroom (planner/assumptions.py FIT_HEADROOM_FRACTION: the share of device memory a plan
# keeps free); plan.toml's prediction.headroom_fraction, when the plan records it, is used instead.
HEADROOM_FRACTION = 0.05
MEASURED_STEP = 1  # callbacks.PeakMemory's measure_step: the step that starts at global_step 1, the second


@dataclass(frozen=True)
class DeviceMemory:
    total: int
    source: str
    headroom: float

    @property
    def usable(self) -> int:
        return int(self.total * (1 - self.headroom))


def device_memory(prediction: dict, cuda: bool) -> DeviceMemory:
    """The memory the probe's step must fit in: this GPU's (whatever the plan assumed), or on the CPU the plan's
    (hardware.memory_gib; plan.toml prediction.device_memory_bytes) and else this machine's RAM."""
    headroom = prediction.get("headroom_fraction")
    headroom = float(headroom) if isinstance(headroom, (int, float)) and 0 <= headroom < 1 else HEADROOM_FRACTION
    if cuda:
        import torch

        return DeviceMemory(int(torch.cuda.mem_get_info()[1]), f"this GPU ({torch.cuda.get_device_name()})", headroom)
    planned = prediction.get("device_memory_bytes")
    if isinstance(planned, int) and planned > 0:
        return DeviceMemory(planned, "the plan's hardware.memory_gib", headroom)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceMemory(int(ram), "this machine's RAM", headroom)


def synthetic_rows(count: int, seq_len: int, vocab: int, seed: int, packing: bool) -> list[dict]:
    """`count` rows of `seq_len` random token ids, labels = ids; packed rows hold two documents (position ids
    restart), so the collator leaves the mask out and transformers builds per-document masks, as for real packs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq_len), generator=g).tolist()
    rows = []
    half = seq_len // 2
    for row in ids:
        r = {"input_ids": row, "labels": list(row)}
        if packing:
            r["position_ids"] = list(range(half)) + list(range(seq_len - half))
        rows.append(r)
    return rows


class _Collected:
    """What callbacks.PeakMemory writes to, kept here instead of metrics.jsonl: the probe writes one record."""

    def __init__(self, prediction: dict):
        self.prediction = prediction
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def _watch(timed: int, measured: int):
    """A callback timing the optimizer step that starts at global_step `timed` (CUDA synchronized) and, on CUDA,
    reading the device memory in use when the step starting at `measured` ends (before anything is freed)."""
    from transformers import TrainerCallback

    class StepWatch(TrainerCallback):
        seconds: float | None = None
        device_used: int | None = None
        _t0: float | None = None

        def _sync(self) -> bool:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                return True
            return False

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == timed:
                self._sync()
                self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == timed + 1 and self._t0 is not None:
                self._sync()
                self.seconds = time.perf_counter() - self._t0
            if state.global_step == measured + 1 and self._sync():
                import torch

                free, total = torch.cuda.mem_get_info()
                self.device_used = int(total - free)

    return StepWatch()


def measure(config: RunConfig) -> dict:
    """Run the probe's steps; the measurements as a record (not yet judged)."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    from .callbacks import PeakMemory
    from .train import load_tokenizer, load_training_model, make_trainer, training_arguments

    t, d = config.training, config.data
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, seq_len, accumulation = t["micro_batch_size"], d["seq_len"], t["gradient_accumulation_steps"]
    micro_batches = min(accumulation, 2)  # the second forward runs with the first one's gradients held
    steps = 2 if cuda else 3  # warm-up, measured (and timed on CUDA), timed (CPU: the live-byte count slows step 2)
    timed = MEASURED_STEP if cuda else MEASURED_STEP + 1

    tokenizer = load_tokenizer(config)
    model, _ = load_training_model(config)
    vocab = max(2, min(len(tokenizer), model.get_input_embeddings().num_embeddings))
    rows = synthetic_rows(steps * micro_batches * micro * world, seq_len, vocab, t["seed"], d["packing"])
    args = training_arguments(config, steps, evaluate=False, tracking=None, gradient_accumulation_steps=micro_batches,
                              save_strategy="no", logging_strategy="no", logging_first_step=False)
    collected = _Collected(config.prediction)
    peak, watch = PeakMemory(collected, measure_step=MEASURED_STEP), _watch(timed, MEASURED_STEP)
    trainer = make_trainer(config, model, args, tokenizer, rows, None, [peak, watch])
    trainer.remove_callback(PrinterCallback)  # the end-of-training summary line means nothing here
    record = {"event": "probe",  # an event, so that readers of training steps (card, plot) pass it by
              "kind": "probe", "time": time.time(), "device": _device_name(cuda),
              "planned_device": config.prediction.get("device"), "method": config.method["name"],
              "micro_batch_size": micro, "seq_len": seq_len, "gradient_accumulation_steps": accumulation,
              "micro_batches_per_step": micro_batches, "gradient_checkpointing": t["gradient_checkpointing"],
              "loss_implementation": t["loss"], "optimizer": t["optimizer"], "precision": t["precision"],
              "packing": d["packing"], "world_size": world}
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a verdict; anything else is re-raised
        if not _out_of_memory(exc):
            raise
        text = str(exc).strip()
        record.update(out_of_memory=True, out_of_memory_message=text.splitlines()[0][:300] if text else
                      type(exc).__name__)
        if cuda:
            record.update(measured_peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                          measured_peak_reserved_bytes=int(torch.cuda.max_memory_reserved()))
        return record
    got = collected.records[0] if collected.records else {}
    record["out_of_memory"] = False
    for key in ("measured_peak_allocated_bytes", "measured_peak_reserved_bytes", "parameters_held_locally"):
        if key in got:
            record[key] = got[key]
    record["memory_measured_as"] = ("torch.cuda.max_memory_allocated over the step" if cuda else
                                    "peak live tensor bytes over the step (TorchDispatchMode)")
    if watch.device_used is not None:  # CUDA: the caching allocator's reserve, the context, other processes
        record["measured_device_used_bytes"] = watch.device_used
    tokens = micro_batches * micro * seq_len * world
    if watch.seconds:
        record.update(step_seconds=round(watch.seconds, 4), tokens_per_second=round(tokens / watch.seconds, 1),
                      seconds_per_optimizer_step=round(watch.seconds * accumulation / micro_batches, 4))
    return record


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if cuda else "cpu"


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()))


def judge(record: dict, prediction: dict, memory: DeviceMemory) -> int:
    """Add the prediction and the verdict to `record`; the exit code (0, EXIT_NOFIT, EXIT_TIGHT)."""
    pred_peak, pred_total = prediction.get("peak_allocated_bytes"), prediction.get("device_total_bytes")
    pred_tps = prediction.get("tokens_per_second")
    record.update(predicted_peak_allocated_bytes=pred_peak, predicted_device_total_bytes=pred_total,
                  device_memory_bytes=memory.total, device_memory_source=memory.source,
                  headroom_fraction=memory.headroom, usable_bytes=memory.usable)
    measured = record.get("measured_peak_allocated_bytes")
    if isinstance(pred_peak, int) and pred_peak > 0 and measured and not record["out_of_memory"]:
        record["error"] = round((pred_peak - measured) / measured, 4)  # as in the run's peak_memory record
    if isinstance(pred_tps, (int, float)) and pred_tps > 0:
        per_step = (record["gradient_accumulation_steps"] * record["micro_batch_size"] * record["seq_len"]
                    * record["world_size"])
        record.update(predicted_tokens_per_second=pred_tps, predicted_seconds_per_optimizer_step=round(
            per_step / pred_tps, 4))
    if record["out_of_memory"]:
        record.update(needed_bytes=None, fits=False, verdict="out of memory", exit_code=EXIT_NOFIT)
        return EXIT_NOFIT
    if "measured_device_used_bytes" in record:
        needed = record["measured_device_used_bytes"]
    else:  # the CPU: live tensor bytes, plus the allocator slack the plan counts on top of its peak
        slack = pred_total - pred_peak if isinstance(pred_total, int) and isinstance(pred_peak, int) else 0
        needed = int(measured or 0) + max(0, slack)
    record["needed_bytes"] = needed
    if needed > memory.total:
        verdict, code = "does not fit", EXIT_NOFIT
    elif needed > memory.usable:
        verdict, code = "within the headroom", EXIT_TIGHT
    else:
        verdict, code = "fits", 0
    record.update(fits=code != EXIT_NOFIT, verdict=verdict, exit_code=code)
    return code


def advice(config: RunConfig) -> list[str]:
    """What would lower the step's memory, for this plan's settings (each a spec key to change)."""
    t, d, m = config.training, config.data, config.method["name"]
    out = []
    if t["micro_batch_size"] > 1:
        out.append(f"training.micro_batch_size = {t['micro_batch_size'] // 2} (now {t['micro_batch_size']}; "
                   "peftplan keeps the effective batch with more gradient accumulation)")
    if not t["gradient_checkpointing"]:
        out.append("training.gradient_checkpointing = true")
    if t["loss"] == "full":
        out.append('training.loss = "chunked" (never holds tokens × vocabulary)')
    if m in ("full", "lora", "dora"):
        out.append(f'method.name = "{"qlora" if m != "dora" else "qdora"}" (a 4-bit base)')
    if t["optimizer"] in ("adamw_torch", "paged_adamw_32bit"):
        out.append('training.optimizer = "adamw_8bit"')
    out.append(f"data.seq_len below {d['seq_len']} (rows are truncated to it)")
    return out


def _size(n) -> str:
    if not isinstance(n, (int, float)) or not math.isfinite(n):
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_lines(record: dict) -> list[str]:
    r = record
    lines = [f"probe: {r['method']} on {r['device']}, micro-batch {r['micro_batch_size']} × {r['seq_len']} tokens "
             f"(full rows), {r['micro_batches_per_step']} micro-batch(es) per step, gradient checkpointing "
             f"{'on' if r['gradient_checkpointing'] else 'off'}, {r['loss_implementation']} loss, {r['optimizer']}"]
    err = f" (prediction {r['error']:+.1%})" if isinstance(r.get("error"), float) else ""
    lines.append(f"  peak allocated   measured {_size(r.get('measured_peak_allocated_bytes'))}, predicted "
                 f"{_size(r.get('predicted_peak_allocated_bytes'))}{err}")
    if "measured_peak_reserved_bytes" in r:
        lines.append(f"  peak reserved    {_size(r['measured_peak_reserved_bytes'])}; device memory in use after the "
                     f"step {_size(r.get('measured_device_used_bytes'))}; predicted device total "
                     f"{_size(r.get('predicted_device_total_bytes'))}")
    lines.append(f"  memory           needs {_size(r.get('needed_bytes'))} of {_size(r['usable_bytes'])} usable "
                 f"({_size(r['device_memory_bytes'])} from {r['device_memory_source']}, "
                 f"{r['headroom_fraction']:.0%} headroom)")
    if r.get("seconds_per_optimizer_step") is not None:
        predicted = r.get("predicted_seconds_per_optimizer_step")
        lines.append(f"  optimizer step   {r['seconds_per_optimizer_step']:.3g} s measured "
                     f"({r['tokens_per_second']:,.0f} tokens/s)"
                     + (f", {predicted:.3g} s predicted ({r['predicted_tokens_per_second']:,.0f} real "
                        "tokens/s; with padded data an upper bound for full rows)" if predicted else ""))
    measured, predicted = r.get("tokens_per_second"), r.get("predicted_tokens_per_second")
    if measured and predicted and not 1 / 3 <= measured / predicted <= 3:  # planner/local_calibration.py's band
        where = ("on the CPU, set hardware.tflops in the spec to what this machine does" if r["device"] == "cpu"
                 else "is this the device the plan was made for?")
        lines.append(f"  note: {measured / predicted:.3g}× the predicted speed, too far off for a correction; {where}")
    return lines


def run_probe(config: RunConfig) -> int:
    """Measure, judge, write the record (main process), say what it means. The exit code: 0, 5 or 6."""
    import torch

    from .callbacks import MetricsFile

    record = measure(config)
    memory = device_memory(config.prediction, torch.cuda.is_available())
    code = judge(record, config.prediction, memory)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        metrics = MetricsFile(config.output_dir / "metrics.jsonl", 0, config.prediction)
        metrics.write(record)
        for line in report_lines(record):
            print(line)
        where = config.output_dir / "metrics.jsonl"
        if code == 0:
            print(f"probe: fits ({record['needed_bytes'] / memory.usable:.1%} of the usable memory); record in {where}")
        else:
            what = {"out of memory": "ran out of memory", "does not fit": "does not fit in the device's memory",
                    "within the headroom": f"fits, but inside the {memory.headroom:.0%} headroom the planner keeps "
                                           "free: a longer row, fragmentation or another process would end it"}
            say(f"probe: the plan's worst-case step {what[record['verdict']]} (record in {where}). To lower its "
                "memory, regenerate the project from a spec with one of:")
            for line in advice(config):
                say(f"  {line}")
            if not record["out_of_memory"]:
                say(f"  or let `peftplan calibrate {config.path.parent}` fold this measurement into the planner's "
                    "estimates for this device, then plan again")
    sys.stdout.flush()
    return code
