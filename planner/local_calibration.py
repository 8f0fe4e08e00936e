"""A local correction learnt from this user's own runs: measured ÷ predicted, per device model × method.

Every run logs its measured peak memory next to the prediction (`outputs/metrics.jsonl`: the probe's record,
`peftplan run DIR --probe`, and each training run's `peak_memory` record) and its measured tokens/s next to the
predicted one (the logged training steps). `peftplan calibrate RUN_DIR ...` reads those records and keeps, in the
user's config folder, the ratios and the runs they came from; the correction for a device model × method is the
median ratio (robust to one odd run). `estimate` and `plan` multiply the closed form's memory by it and the time
model's tokens/s by its own, and say so (planner/local_correction.py). The file is this module's own (written
atomically, read defensively): a file that is not one it wrote is ignored with a warning, never a traceback.

A record counts only when it ran on the device model its plan was made for (a time measured on an L4 says
nothing about an A100 plan's time) and when its ratio lies in a sane band (MEMORY_BAND, TIME_BAND below); a
record outside is refused with the reason, named by its file and line.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_ENV = "PEFTPLAN_CONFIG_DIR"  # overrides $XDG_CONFIG_HOME/peftplan (tests point it into a temporary folder)
FILE_NAME = "calibration.json"
FORMAT = "peftplan local calibration 1"

# The sane bands, measured ÷ predicted. Memory: the closed form is within 8.8% of every one of 464 measured CPU
# steps (docs/accuracy.md, section 1) and within 2.3% of the published runs of peftplan's own stack; a ratio
# beyond -20% / +25% is not a local allocator difference but another measurement (another batch shape, another
# process's memory, a sharded run read as one device) or an estimator bug to report: correcting by it would hide
# it. Time: the time model's held-out error is 14.5% at p90 on the Hugging Face stack and other stacks differ by
# 38% median, 74% p90 (docs/accuracy.md, section 5); a device 3× slower or faster than predicted is a different
# device, a throttled or shared machine, or a CPU whose hardware.tflops was never set — a spec fix, not a factor.
MEMORY_BAND = (0.8, 1.25)
TIME_BAND = (1 / 3, 3.0)
BANDS = {"memory": MEMORY_BAND, "tokens_per_second": TIME_BAND}


class CalibrationError(ValueError):
    """A run folder that cannot be read as one (not a project, no metrics): the user's input (exit 2)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def config_dir() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "peftplan"


def store_path() -> Path:
    return config_dir() / FILE_NAME


def device_key(name: str) -> str:
    """A device as calibration keys it: "cpu", the catalog id of a known GPU (CUDA's "NVIDIA L4" → "L4"), or the
    name as given."""
    if name.strip().lower() == "cpu":
        return "cpu"
    from .catalog import find_device

    found = find_device(name)
    return found.id if found is not None else name.strip()


@dataclass(frozen=True)
class Sample:
    """One measured ÷ predicted ratio, with where it came from."""

    run: str  # the project folder
    line: int  # its line in outputs/metrics.jsonl
    source: str  # probe | peak_memory | training steps
    quantity: str  # memory | tokens_per_second
    device: str  # device_key of the device it ran on
    device_name: str  # as the run recorded it
    method: str
    measured: float
    predicted: float

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted

    def where(self) -> str:
        return f"{Path(self.run) / 'outputs' / 'metrics.jsonl'}, line {self.line}"


@dataclass(frozen=True)
class Correction:
    device: str
    device_name: str
    method: str
    memory: float | None = None  # × the predicted peak memory
    memory_runs: int = 0
    tokens_per_second: float | None = None  # × the predicted tokens/s
    time_runs: int = 0
    runs: tuple[str, ...] = ()

    def describe(self) -> str:
        """"lora: memory +3.1% from 4 runs, tokens/s -12.0% from 2 runs on NVIDIA L4"."""
        parts = []
        if self.memory is not None:
            parts.append(f"memory {self.memory - 1:+.1%} from {self.memory_runs} run{'s' * (self.memory_runs != 1)}")
        if self.tokens_per_second is not None:
            parts.append(f"tokens/s {self.tokens_per_second - 1:+.1%} from {self.time_runs} "
                         f"run{'s' * (self.time_runs != 1)}")
        return f"{self.method}: {', '.join(parts)} on {self.device_name}"


@dataclass
class Reading:
    samples: list[Sample] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # records outside a band or on another device, with why
    skipped: list[str] = field(default_factory=list)  # lines that are not records peftplan wrote


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _plan(run: Path) -> tuple[str | None, str | None, dict[str, float]]:
    """(method, planned device, the local correction the plan applied per quantity) from the project's plan.toml,
    for records that do not carry them. The ratios are fitted against the uncorrected closed form: a plan made
    with a correction has it divided out again, or each refit would undo the last."""
    try:
        raw = tomllib.loads((run / "plan.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None, None, {}
    method = raw.get("method", {}).get("name") if isinstance(raw.get("method"), dict) else None
    prediction = raw.get("prediction") if isinstance(raw.get("prediction"), dict) else {}
    device = prediction.get("device")
    applied = {q: f for q, key in (("memory", "memory_correction"),
                                   ("tokens_per_second", "tokens_per_second_correction"))
               if (f := _number(prediction.get(key))) is not None}
    return (method if isinstance(method, str) else None), (device if isinstance(device, str) else None), applied


@dataclass
class _RunRecords:
    """One project's metrics.jsonl as it is read, record by record, into `reading`: a training run's tokens/s is
    its last logged step's, added when the run's segment ends (the next start record, or the end of the file)."""
    run: Path
    path: Path
    reading: Reading
    plan_method: str | None
    plan_device: str | None
    applied: dict[str, float]  # the local correction the plan applied per quantity
    segment: dict = field(default_factory=dict)  # the current training run's start record
    last_speed: tuple[int, dict] | None = None

    def add(self, n: int, rec: dict, source: str, quantity: str, measured, predicted, device, method,
            planned) -> None:
        m, p = _number(measured), _number(predicted)
        if p is not None:
            p /= self.applied.get(quantity, 1.0)  # the uncorrected prediction
        where = f"{self.path}, line {n}"
        if m is None or p is None:
            self.reading.skipped.append(f"{where}: a {source} record without positive measured and predicted numbers")
            return
        if not isinstance(device, str) or not isinstance(method, str):
            self.reading.skipped.append(f"{where}: a {source} record that does not say which device or method it "
                                        "measured (a run from before peftplan recorded them)")
            return
        key = device_key(device)
        if isinstance(planned, str) and device_key(planned) != key:
            self.reading.refused.append(f"{where}: {source} ran on {device}, but its plan was made for {planned}: it "
                                        "says nothing about either; left out")
            return
        sample = Sample(str(self.run), n, source, quantity, key, device, method, m, p)
        low, high = BANDS[quantity]
        if not low <= sample.ratio <= high:
            self.reading.refused.append(f"{where}: {source} {quantity.replace('_', ' ')} measured {m:,.6g} vs "
                                        f"predicted {p:,.6g} (×{sample.ratio:.3g}), outside the sane band "
                                        f"[{low:.3g}, {high:.3g}]: {_band_reason(quantity)}; left out")
            return
        self.reading.samples.append(sample)

    def close_segment(self) -> None:
        if self.last_speed is not None:
            n, rec = self.last_speed
            segment = self.segment
            self.add(n, rec, "training steps", "tokens_per_second", rec.get("tokens_per_second"),
                     rec.get("predicted_tokens_per_second"), segment.get("device"),
                     segment.get("method", self.plan_method), segment.get("planned_device", self.plan_device))
        self.last_speed = None

    def record(self, n: int, rec: dict) -> None:
        """One JSON object of the file, line `n`."""
        event = rec.get("event")
        if event == "start":
            self.close_segment()
            self.segment = rec
        elif rec.get("kind") == "probe" or event == "probe":
            if rec.get("out_of_memory"):
                self.reading.refused.append(f"{self.path}, line {n}: the probe ran out of memory: no complete "
                                            "measurement; left out")
                return
            self.add(n, rec, "probe", "memory", rec.get("measured_peak_allocated_bytes"),
                     rec.get("predicted_peak_allocated_bytes"), rec.get("device"), rec.get("method", self.plan_method),
                     rec.get("planned_device", self.plan_device))
        elif event == "peak_memory":
            self.add(n, rec, "peak_memory", "memory", rec.get("measured_peak_allocated_bytes"),
                     rec.get("predicted_for_measured_shape") or rec.get("predicted_peak_allocated_bytes"),
                     rec.get("device"), self.segment.get("method", self.plan_method),
                     self.segment.get("planned_device", self.plan_device))
            self.segment.setdefault("device", rec.get("device"))  # runs from before the start record named it
        elif event is None and "predicted_tokens_per_second" in rec and isinstance(rec.get("step"), int):
            if rec["step"] >= 2:  # the first step alone is mostly warm-up
                self.last_speed = (n, rec)


def read_run(run: Path, reading: Reading) -> None:
    """Add the measured-vs-predicted records of one project's outputs/metrics.jsonl to `reading`."""
    run = run.resolve()
    path = run / "outputs" / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise CalibrationError([f"{run}: no run to calibrate from ({path}: {exc.strerror or exc}); run it first "
                                "(peftplan run DIR, or peftplan run DIR --probe)"]) from None
    plan_method, plan_device, applied = _plan(run)
    records = _RunRecords(run, path, reading, plan_method, plan_device, applied)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            reading.skipped.append(f"{path}, line {n}: not JSON")
            continue
        if not isinstance(rec, dict):
            reading.skipped.append(f"{path}, line {n}: not a JSON object")
            continue
        records.record(n, rec)
    records.close_segment()


def _band_reason(quantity: str) -> str:
    if quantity == "memory":
        return ("not a local allocator difference but another measurement (another batch shape, another process's "
                "memory) or an estimator bug worth reporting")
    return ("a different or throttled device, or a CPU whose hardware.tflops is not set in the spec: fix the spec, "
            "not the factor")


def read_runs(runs: list[str | Path]) -> Reading:
    """Every run's records; CalibrationError listing every folder that is not a project with metrics."""
    reading, problems = Reading(), []
    for r in runs:
        p = Path(r)
        if not (p / "plan.toml").is_file():
            problems.append(f"{p}: not a project folder written by peftplan generate (no plan.toml)")
            continue
        try:
            read_run(p, reading)
        except CalibrationError as exc:
            problems += exc.problems
    if problems:
        raise CalibrationError(problems)
    return reading


def fit(samples: list[Sample]) -> tuple[dict[tuple[str, str], Correction], list[str]]:
    """The correction per (device, method): the median ratio of each quantity. A median outside its band (only
    possible for samples not checked on reading, e.g. a file edited by hand) is refused with the reason."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.device, s.method), []).append(s)
    out, refused = {}, []
    for key, group in sorted(groups.items()):
        values = {}
        for quantity in BANDS:
            ratios = [s.ratio for s in group if s.quantity == quantity]
            if not ratios:
                continue
            median = statistics.median(ratios)
            low, high = BANDS[quantity]
            if not low <= median <= high:
                refused.append(f"{key[1]} on {key[0]}: a {quantity.replace('_', ' ')} correction of ×{median:.3g} is "
                               f"outside the sane band [{low:.3g}, {high:.3g}]; not applied")
                continue
            values[quantity] = (round(median, 4), len(ratios))
        if not values:
            continue
        mem, tps = values.get("memory", (None, 0)), values.get("tokens_per_second", (None, 0))
        out[key] = Correction(key[0], group[0].device_name, key[1], mem[0], mem[1], tps[0], tps[1],
                              tuple(sorted({s.run for s in group})))
    return out, refused


# --- the stored file ------------------------------------------------------------------------------------------
@dataclass
class Store:
    path: Path
    samples: list[Sample] = field(default_factory=list)
    corrections: dict[tuple[str, str], Correction] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lookup(self, device: str, method: str) -> Correction | None:
        return self.corrections.get((device_key(device), method))


def load(path: Path | None = None) -> Store:
    """The stored calibration (an empty one when there is none); a file this module did not write is ignored with
    a warning, and each stored ratio is checked against its band again."""
    path = path or store_path()
    store = Store(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return store
    except (OSError, ValueError, RecursionError) as exc:
        store.warnings.append(f"{path}: not a calibration peftplan wrote ({exc}); ignored (peftplan calibrate --clear)")
        return store
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("samples"), list):
        store.warnings.append(f"{path}: not a calibration peftplan wrote; ignored (peftplan calibrate --clear)")
        return store
    names = [f.name for f in Sample.__dataclass_fields__.values()]
    for i, s in enumerate(raw["samples"]):
        try:
            sample = Sample(**{k: s[k] for k in names})
            ok = (sample.quantity in BANDS and _number(sample.measured) and _number(sample.predicted)
                  and all(isinstance(getattr(sample, k), str) for k in ("run", "device", "device_name", "method")))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            store.warnings.append(f"{path}: samples[{i}] is not a record peftplan wrote; ignored")
            continue
        low, high = BANDS[sample.quantity]
        if not low <= sample.ratio <= high:
            store.warnings.append(f"{path}: samples[{i}] ({sample.where()}) has a ratio ×{sample.ratio:.3g} outside "
                                  f"the sane band [{low:.3g}, {high:.3g}]; ignored")
            continue
        store.samples.append(sample)
    store.corrections, refused = fit(store.samples)
    store.warnings += refused
    return store


def save(store: Store) -> None:
    """Write the store atomically: a temporary file in the same folder, then os.replace."""
    store.path.parent.mkdir(parents=True, exist_ok=True)
    corrections = [{**c.__dict__, "runs": list(c.runs)} for c in store.corrections.values()]
    text = json.dumps({"format": FORMAT, "bands": {k: list(v) for k, v in BANDS.items()},
                       "corrections": corrections, "samples": [s.__dict__ for s in store.samples]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".tmp", dir=store.path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, store.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def calibrate(runs: list[str | Path], path: Path | None = None) -> tuple[Store, Reading]:
    """Read `runs`, replace what the store held from those runs by what they hold now, refit, save."""
    reading = read_runs(runs)
    store = load(path)
    again = {str(Path(r).resolve()) for r in runs}
    store.samples = [s for s in store.samples if s.run not in again] + reading.samples
    store.corrections, refused = fit(store.samples)
    store.warnings += refused
    if reading.samples:
        save(store)
    return store, reading
