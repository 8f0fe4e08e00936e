"""Resolve a spec's model and hardware: catalog, local config.json, local Hugging Face cache.

Offline first: nothing here touches the network. Order for a model name: a catalog id, alias or
variant; a local directory or config.json; the local Hugging Face cache; a catalog entry the name
re-packages (mirror organisations, instruct/base and pre-quantized suffixes: catalog.match_model).

A config.json whose architecture the closed form does not know is described by the model built on
the meta device (runtime.exact.describe), when a describer is registered with `set_describer`: the
planner never imports the runtime itself, the command line wires it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..schemas import Problem, Spec, SpecError
from . import catalog
from .catalog import Device
from .shapes import MalformedConfig, ModelShape, UnsupportedArchitecture, shape_from_config, shape_from_description

INSTALL_HINT = "pip install 'peftplan[train]' (PyTorch and transformers; install torch first for a CPU-only build)"


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what training loads: a hub id (the one asked for) or a local path
    source: str  # catalog | config.json | hf-cache
    location: str  # catalog source URL or the config.json path read
    config: dict
    shape: ModelShape
    notes: tuple[str, ...] = ()  # how the name was resolved, what the shape assumes
    prequantized: str | None = None  # "bnb-4bit": a checkpoint stored in 4-bit (only QLoRA/QDoRA train it as is)
    # the shape comes from the model built on the meta device, not the closed form: `estimate` traces it
    described: bool = False


Describer = Callable[[dict], dict]
_describer: Describer | None = None


def set_describer(describe: Describer | None) -> None:
    """Register the function that describes any architecture from its config.json (runtime.exact.describe).
    It may raise ImportError (no torch: the [train] extra is missing) or ValueError (transformers does not
    know the architecture)."""
    global _describer
    _describer = describe


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The config.json of `repo_id` in the local Hugging Face cache (the snapshot refs/main points at)."""
    if repo_id.count("/") != 1:
        return None
    folder = "models--" + repo_id.replace("/", "--")
    for cache in _hf_cache_dirs():
        root = cache / folder
        if not root.is_dir():
            continue
        ref = root / "refs" / "main"
        if ref.is_file():
            candidate = root / "snapshots" / ref.read_text().strip() / "config.json"
            if candidate.is_file():
                return candidate
        snapshots = sorted((root / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if snapshots:
            return snapshots[-1]
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _read_config(path: Path, key: str) -> dict:
    try:
        if path.stat().st_size > 16 * 2**20:
            raise SpecError([Problem(key, f"{path} is larger than 16 MiB: not a model's config.json")])
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(key, f"cannot read {path}: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise SpecError([Problem(key, f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}")]) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, an integer beyond Python's digit limit, nesting
        raise SpecError([Problem(key, f"{path}: not usable JSON: {str(exc)[:200]}")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(key, f"{path} does not hold a JSON object")])
    return data


def resolve_model(name: str, *, base_dir: Path | None = None, describe: Describer | None = None) -> ResolvedModel:
    key = "model.name"
    describe = describe or _describer
    match = catalog.match_model(name)
    if match is not None and not match.by_rule:
        return _from_catalog(match, describe)
    try:
        path = Path(name).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError) as exc:  # a name too long for a path, NUL bytes, …
        raise SpecError([Problem(key, f"not a catalog id and not a usable path: {exc}")]) from None
    if is_dir:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise SpecError([Problem(key, f"{path} is a directory without a config.json")])
        return _shaped(name, "config.json", str(cfg_path), _read_config(cfg_path, key), describe)
    if is_file:
        return _shaped(name, "config.json", str(path), _read_config(path, key), describe)
    cfg_path = find_in_hf_cache(name)
    if cfg_path is not None:  # the real config.json beats a catalog entry the name only looks like
        return _shaped(name, "hf-cache", str(cfg_path), _read_config(cfg_path, key), describe)
    if match is not None:
        return _from_catalog(match, describe)
    close = catalog.close_models(name)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise SpecError([Problem(key, (
        f"unknown model {name!r}: not in the catalog (`peftplan models`), not a local path, "
        f"not in the local Hugging Face cache. {hint}"
        "For any other model, set model.name to its local directory or to the path of its config.json."
    ))])


def _from_catalog(match: catalog.ModelMatch, describe: Describer | None) -> ResolvedModel:
    entry = match.entry
    model = _shaped(match.hub_id, "catalog", entry.source, entry.config, describe)
    notes = list(model.notes)
    if match.how:
        notes.insert(0, match.how)
    return replace(model, notes=tuple(notes), prequantized=match.prequantized)


def _shaped(name: str, source: str, location: str, config: dict, describe: Describer | None = None) -> ResolvedModel:
    from .config_check import config_problems

    bad = config_problems(config)  # malformed numbers: named one by one, before anything divides by them
    if bad:
        raise SpecError([Problem("model.name", f"{location}: {p}") for p in bad])
    try:
        shape = shape_from_config(config)
    except MalformedConfig as exc:  # a known architecture: building it would only fail the same way
        raise SpecError([Problem("model.name", f"{name}: {exc}")]) from None
    except UnsupportedArchitecture as exc:
        return _described(name, source, location, config, str(exc), describe)
    if shape.parameters <= 0 or shape.num_layers < 1 or shape.hidden_size < 1:
        raise SpecError([Problem("model.name", f"{location}: describes a model with {shape.parameters:,} parameters "
                                               f"and {shape.num_layers} layers: not a usable config.json")])
    quantized = _prequantized(config)
    notes = list(shape.notes)
    if quantized:
        notes.append(f"{name}'s config.json carries a {quantized} quantization_config: a pre-quantized checkpoint "
                     "(only QLoRA/QDoRA train it as it is)")
    return ResolvedModel(name=name, source=source, location=location, config=config, shape=shape,
                         notes=tuple(notes), prequantized=quantized)


def _prequantized(config: dict) -> str | None:
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        return "bnb-4bit"
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return "bnb-8bit"
    return str(q.get("quant_method") or "quantized")


def _described(name: str, source: str, location: str, config: dict, why: str,
               describe: Describer | None) -> ResolvedModel:
    """The any-architecture path: the model built on the meta device describes its own modules."""
    key = "model.name"
    model_type = config.get("model_type", "?")
    if describe is None:
        raise SpecError([Problem(key, f"{name}: {why}")])
    try:
        desc = describe(config)
    except ImportError as exc:
        raise SpecError([Problem(key, (
            f"{name}: {why}. peftplan can still estimate model_type {model_type!r} by building the model from its "
            f"config.json with PyTorch, which is not installed here ({exc}): {INSTALL_HINT}"))]) from None
    except Exception as exc:  # transformers does not know it, or cannot build it on the meta device
        raise SpecError([Problem(key, (
            f"{name}: {why}; building it with transformers failed too ({_first_line(exc)}). "
            "A model whose code lives in its repository (trust_remote_code) needs model.trust_remote_code = true "
            "and is estimated with `peftplan estimate` on that code"))]) from None
    try:
        shape = shape_from_description(desc)
    except UnsupportedArchitecture as exc:
        raise SpecError([Problem(key, f"{name}: {why}; {exc}")]) from None
    note = (f"model_type {model_type!r} is not one the closed form knows: shapes described from the model built on "
            f"the meta device in {desc.get('seconds', 0):.1f} s (not calibrated; `peftplan estimate` traces a "
            "training step instead)")
    return ResolvedModel(name=name, source=source, location=location, config=config, shape=shape,
                         notes=(note, *shape.notes), prequantized=_prequantized(config), described=True)


def machine_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30


@dataclass(frozen=True)
class ResolvedHardware:
    device: Device
    count: int
    nodes: int
    notes: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        """Devices in all: per node × nodes."""
        return self.count * self.nodes


def resolve_hardware(spec: Spec) -> ResolvedHardware:
    hw = spec.hardware
    notes: list[str] = []
    mem = int(hw.memory_gib * 2**30) if hw.memory_gib else None
    if hw.gpu.strip().lower() == "cpu":
        if mem is None:
            mem = machine_memory_bytes()
            notes.append(f"hardware.memory_gib not set: using this machine's RAM, {mem / 2**30:.1f} GiB")
        device = catalog.cpu_device(mem)
    else:
        device = catalog.find_device(hw.gpu)
        if device is None:
            if mem is None:
                close = catalog.close_devices(hw.gpu)
                hint = f"closest: {', '.join(close)}; " if close else ""
                raise SpecError([Problem("hardware.gpu", (
                    f"unknown device {hw.gpu!r} ({hint}see `peftplan gpus`); "
                    "for a device not in the catalog, also set hardware.memory_gib"
                ))])
            device = Device(
                id=hw.gpu, name=hw.gpu, memory_bytes=mem, bf16=True, bf16_tflops=0.0, fp16_tflops=0.0,
                fp32_tflops=0.0, memory_bandwidth_gbps=0.0, interconnect="pcie", interconnect_gbps=0.0,
                price_usd_per_hour=None, price_date=None, source="hardware.memory_gib",
            )
            unknown = [what for what, given in (("throughput (set hardware.tflops)", hw.tflops),
                                                 ("price (set hardware.price_per_hour)",
                                                  hw.price_per_hour if hw.price_per_hour is not None
                                                  else hw.price_usd_per_hour)) if given is None]
            notes.append(f"{hw.gpu!r} is not in the catalog: assuming bf16 support"
                         + (f"; no {' or '.join(unknown)} known" if unknown else ""))
        elif mem is not None:
            device = replace(device, memory_bytes=mem)
            notes.append(f"memory per device from hardware.memory_gib: {hw.memory_gib:g} GiB")
    if hw.price_per_hour is not None and hw.price_usd_per_hour is not None:
        raise SpecError([Problem("hardware.price_per_hour", "set either price_per_hour or its earlier name "
                                                            "price_usd_per_hour, not both")])
    price_key = "price_per_hour" if hw.price_per_hour is not None else "price_usd_per_hour"
    price = hw.price_per_hour if hw.price_per_hour is not None else hw.price_usd_per_hour
    if price is not None:
        device = replace(device, price_usd_per_hour=price, price_date=f"hardware.{price_key}")
    if hw.tflops is not None:
        notes.append(f"peak throughput from hardware.tflops: {hw.tflops:g} TFLOPS per device")
    return ResolvedHardware(device=device, count=hw.count, nodes=hw.nodes, notes=tuple(notes))


def _first_line(exc: Exception) -> str:
    """What went wrong, in the library's words, without the Python exception's class name."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return (text[:200] + "…") if len(text) > 200 else (text or "no reason given")
