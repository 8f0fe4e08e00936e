"""The bundled catalogs: model configs (`data/models.toml`) and devices (`data/gpus.toml`).

Both are data files with a source per entry; this module only reads and matches them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).with_name("data")


@dataclass(frozen=True)
class CatalogModel:
    id: str
    aliases: tuple[str, ...]
    config: dict
    source: str
    published_parameters: int | None


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    memory_bytes: int  # what the driver reports as total (nvidia-smi), or the advertised size
    bf16: bool
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gbps: float
    interconnect: str
    interconnect_gbps: float
    price_usd_per_hour: float | None
    price_date: str | None
    source: str
    is_cpu: bool = False

    @property
    def kind(self) -> str:
        return "cpu" if self.is_cpu else "cuda"


def _norm(name: str) -> str:
    """Loose form of a name: lower case, 'nvidia'/'tesla'/'geforce' dropped, punctuation as spaces."""
    s = name.lower()
    s = re.sub(r"\b(nvidia|tesla|geforce|amd|instinct)\b", " ", s)
    s = re.sub(r"[^a-z0-9.]+", " ", s)
    return " ".join(s.split())


@lru_cache(maxsize=1)
def models() -> tuple[CatalogModel, ...]:
    with open(DATA / "models.toml", "rb") as fh:
        raw = tomllib.load(fh)["models"]
    out = []
    for entry in raw:
        config = dict(entry["config"])
        for key in entry.get("null_keys", ()):
            config[key] = None
        out.append(
            CatalogModel(
                id=entry["id"],
                aliases=tuple(entry.get("aliases", ())),
                config=config,
                source=entry["source"],
                published_parameters=entry.get("published_parameters"),
            )
        )
    return tuple(out)


@lru_cache(maxsize=1)
def _model_index() -> dict[str, CatalogModel]:
    index: dict[str, CatalogModel] = {}
    for m in models():
        for name in (m.id, *m.aliases, m.id.split("/")[-1]):
            index.setdefault(name.lower(), m)
    return index


def find_model(name: str) -> CatalogModel | None:
    return _model_index().get(name.strip().lower())


def close_models(name: str, n: int = 3) -> list[str]:
    import difflib

    ids = {m.id.lower(): m.id for m in models()}
    short = {m.id.split("/")[-1].lower(): m.id for m in models()}
    key = name.strip().lower()
    hits = difflib.get_close_matches(key, list(ids), n=n, cutoff=0.4)
    hits += [short[s] for s in difflib.get_close_matches(key.split("/")[-1], list(short), n=n, cutoff=0.5)]
    return list(dict.fromkeys(ids.get(h, h) for h in hits))[:n]


@lru_cache(maxsize=1)
def _raw_devices() -> list[dict]:
    with open(DATA / "gpus.toml", "rb") as fh:
        return tomllib.load(fh)["gpus"]


@lru_cache(maxsize=1)
def devices() -> tuple[Device, ...]:
    raw = _raw_devices()
    out = []
    for g in raw:
        mib = g.get("memory_total_mib")
        memory = int(mib) * 2**20 if mib else int(float(g["memory_gb"]) * 2**30)
        out.append(
            Device(
                id=g["id"],
                name=g["name"],
                memory_bytes=memory,
                bf16=bool(g["bf16"]),
                bf16_tflops=float(g["bf16_tflops"]),
                fp16_tflops=float(g["fp16_tflops"]),
                fp32_tflops=float(g["fp32_tflops"]),
                memory_bandwidth_gbps=float(g["memory_bandwidth_gbps"]),
                interconnect=g["interconnect"],
                interconnect_gbps=float(g["interconnect_gbps"]),
                price_usd_per_hour=g.get("price_usd_per_hour"),
                price_date=g.get("price_date"),
                source=g["source"],
            )
        )
    return tuple(out)


@lru_cache(maxsize=1)
def _device_index() -> dict[str, Device]:
    index: dict[str, Device] = {}
    by_id = {d.id: d for d in devices()}
    for g in _raw_devices():
        for name in (g["id"], g["name"], *g.get("aliases", ())):
            index.setdefault(_norm(name), by_id[g["id"]])
    return index


def find_device(name: str) -> Device | None:
    """Match a device name loosely: exact id/alias first, then a unique loose form."""
    key = _norm(name)
    index = _device_index()
    if key in index:
        return index[key]
    squashed = key.replace(" ", "")
    hits = {d.id: d for k, d in index.items() if k.replace(" ", "") == squashed}
    return next(iter(hits.values())) if len(hits) == 1 else None


def close_devices(name: str, n: int = 3) -> list[str]:
    import difflib

    key = _norm(name)
    index = _device_index()
    hits = difflib.get_close_matches(key, list(index), n=8, cutoff=0.4)
    return list(dict.fromkeys(index[h].id for h in hits))[:n]


def cpu_device(memory_bytes: int) -> Device:
    return Device(
        id="cpu",
        name="CPU",
        memory_bytes=memory_bytes,
        bf16=False,
        bf16_tflops=0.0,
        fp16_tflops=0.0,
        fp32_tflops=1.0,  # order of magnitude for a many-core server CPU; refined by the planner issue
        memory_bandwidth_gbps=50.0,
        interconnect="none",
        interconnect_gbps=0.0,
        price_usd_per_hour=None,
        price_date=None,
        source="this machine",
        is_cpu=True,
    )
