"""Resolve a spec's model and hardware: catalog, local config.json, local Hugging Face cache.

Offline first: nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..schemas import Problem, Spec, SpecError
from . import catalog
from .catalog import Device
from .shapes import ModelShape, UnsupportedArchitecture, shape_from_config


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    source: str  # catalog | config.json | hf-cache
    location: str  # catalog source URL or the config.json path read
    config: dict
    shape: ModelShape


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


def _read_config(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(key, f"cannot read {path}: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise SpecError([Problem(key, f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}")]) from None
    if not isinstance(data, dict):
        raise SpecError([Problem(key, f"{path} does not hold a JSON object")])
    return data


def resolve_model(name: str, *, base_dir: Path | None = None) -> ResolvedModel:
    key = "model.name"
    entry = catalog.find_model(name)
    if entry is not None:
        config, source, location, shown = entry.config, "catalog", entry.source, entry.id
    else:
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
        elif is_file:
            cfg_path = path
        else:
            cfg_path = find_in_hf_cache(name)
            if cfg_path is None:
                close = catalog.close_models(name)
                hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
                raise SpecError([Problem(key, (
                    f"unknown model {name!r}: not in the catalog (`peftplan models`), not a local path, "
                    f"not in the local Hugging Face cache. {hint}"
                    "For any other model, set model.name to its local directory or to the path of its config.json."
                ))])
            config = _read_config(cfg_path, key)
            return _shaped(name, "hf-cache", str(cfg_path), config)
        config, source, location, shown = _read_config(cfg_path, key), "config.json", str(cfg_path), name
    return _shaped(shown, source, location, config)


def _shaped(name: str, source: str, location: str, config: dict) -> ResolvedModel:
    try:
        shape = shape_from_config(config)
    except UnsupportedArchitecture as exc:
        raise SpecError([Problem("model.name", f"{name}: {exc}")]) from None
    return ResolvedModel(name=name, source=source, location=location, config=config, shape=shape)


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
            notes.append(f"{hw.gpu!r} is not in the catalog: assuming bf16 support; no throughput or price known")
        elif mem is not None:
            device = replace(device, memory_bytes=mem)
            notes.append(f"memory per device from hardware.memory_gib: {hw.memory_gib:g} GiB")
    if hw.price_usd_per_hour is not None:
        device = replace(device, price_usd_per_hour=hw.price_usd_per_hour, price_date="hardware.price_usd_per_hour")
    return ResolvedHardware(device=device, count=hw.count, nodes=hw.nodes, notes=tuple(notes))
