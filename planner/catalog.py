"""The bundled catalogs: model configs (`data/models.toml`) and devices (`data/gpus.toml`).

Both are data files with a source per entry; this module only reads and matches them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .rules import CPU_FP32_TFLOPS

DATA = Path(__file__).with_name("data")


@dataclass(frozen=True)
class CatalogModel:
    id: str
    aliases: tuple[str, ...]
    config: dict
    source: str
    published_parameters: int | None
    variants: tuple[str, ...] = ()  # other hub ids with the same config.json shapes (instruct/base pairs)


@dataclass(frozen=True)
class ModelMatch:
    """How a name resolved to a catalog entry: `hub_id` is what training downloads (the name asked for
    whenever it is a hub id), `how` says why its shapes are the entry's (None: the entry itself)."""

    entry: CatalogModel
    hub_id: str
    how: str | None = None
    prequantized: str | None = None  # "bnb-4bit": the checkpoint stores its decoder weights in 4-bit
    by_rule: bool = False  # matched by the [names] rules, not by a listed id, alias or variant


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
    vendor: str | None = None  # "nvidia" | "amd" (rules.advisable)
    pcie_gen: int | None = None  # the host link's PCIe generation (paging, offloading)
    compute_capability: str | None = None  # CUDA compute capability: the time model's generation

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
def _raw_models() -> dict:
    with open(DATA / "models.toml", "rb") as fh:
        return tomllib.load(fh)


def _with_nulls(config: dict, null_keys) -> dict:
    config = dict(config)
    for key in null_keys:
        if "." in key:  # a key of a nested table, e.g. "text_config.sliding_window"
            outer, inner = key.split(".", 1)
            config[outer] = _with_nulls(config.get(outer, {}), [inner])
        else:
            config[key] = None
    return config


@lru_cache(maxsize=1)
def models() -> tuple[CatalogModel, ...]:
    out = []
    for entry in _raw_models()["models"]:
        out.append(
            CatalogModel(
                id=entry["id"],
                aliases=tuple(entry.get("aliases", ())),
                config=_with_nulls(entry["config"], entry.get("null_keys", ())),
                source=entry["source"],
                published_parameters=entry.get("published_parameters"),
                variants=tuple(entry.get("variants", ())),
            )
        )
    return tuple(out)


@lru_cache(maxsize=1)
def _model_index() -> dict[str, tuple[CatalogModel, str]]:
    """lower-cased name -> (entry, hub id to download). Ids, aliases and variants, with and without org."""
    index: dict[str, tuple[CatalogModel, str]] = {}
    for m in models():
        for name in (m.id, *m.aliases):
            index.setdefault(name.lower(), (m, m.id))
        for v in m.variants:
            index.setdefault(v.lower(), (m, v))
    for m in models():  # short names (no org) after every full name, so a full name always wins
        for name, hub in ((m.id, m.id), *((a, m.id) for a in m.aliases if "/" in a), *((v, v) for v in m.variants)):
            index.setdefault(name.split("/")[-1].lower(), (m, hub))
    return index


def find_model(name: str) -> CatalogModel | None:
    hit = _model_index().get(name.strip().lower())
    return hit[0] if hit else None


@lru_cache(maxsize=1)
def _name_rules() -> tuple[frozenset[str], tuple[tuple[re.Pattern, dict], ...]]:
    """Mirror organisations, and each [[names.rules]] entry with its suffix pattern compiled once."""
    names = _raw_models().get("names", {})
    rules = tuple((re.compile(f"(?:{r['strip']})$", re.IGNORECASE), r) for r in names.get("rules", ()))
    return frozenset(o.lower() for o in names.get("mirror_orgs", ())), rules


def _strip(repo: str) -> tuple[str, list[str], str | None]:
    """`repo` without the suffixes the rules strip (pre-quantized packaging first, then instruct/base suffixes,
    repeatedly), the rules' notes, and the pre-quantized format if one was stripped."""
    notes, prequantized = [], None
    for pattern, rule in _name_rules()[1]:
        while (m := pattern.search(repo)) and m.start() > 0:
            repo = repo[: m.start()]
            notes.append(rule["note"].format(suffix=m.group(0)))
            prequantized = prequantized or rule.get("prequantized")
    return repo, notes, prequantized


@lru_cache(maxsize=1)
def _known_orgs() -> frozenset[str]:
    return frozenset(e.id.split("/")[0].lower() for e in models()) | _name_rules()[0]


@lru_cache(maxsize=1)
def _stripped_index() -> dict[str, tuple[CatalogModel, str]]:
    """Every entry's id, alias and variant, stripped by the rules (the first entry wins)."""
    out: dict[str, tuple[CatalogModel, str]] = {}
    for m in models():
        for name in (m.id, *m.aliases, *m.variants):
            out.setdefault(_strip(name.split("/")[-1])[0].lower(), (m, m.id))
    return out


def match_model(name: str) -> ModelMatch | None:
    """A catalog entry for `name`: its id, an alias or a listed variant; or, for an `org/repo` hub id, the
    entry it re-packages by the rules in models.toml [names] (mirror organisations, instruct/base and
    pre-quantized suffixes). None when nothing matches."""
    key = name.strip()
    index = _model_index()
    hit = index.get(key.lower())
    if hit:
        entry, hub = hit
        how = None
        if hub != entry.id:
            how = f"{hub} has the same config.json shapes as {entry.id} (catalog variant)"
        return ModelMatch(entry, hub, how)
    if key.count("/") != 1:
        return None
    org, repo = key.split("/")
    if org.lower() not in _known_orgs():
        return None
    stripped, notes, prequantized = _strip(repo)
    hit, via_rules = index.get(repo.lower()), False
    if hit is None:
        hit, via_rules = index.get(stripped.lower()) or _stripped_index().get(stripped.lower()), True
    if hit is None:
        return None
    entry = hit[0]
    why = [f"{key} resolves to the shapes of catalog entry {entry.id}"]
    if org.lower() in _name_rules()[0]:
        why.append(f"{org} re-uploads other organisations' checkpoints with their config.json")
    if via_rules:
        why += list(dict.fromkeys(notes))
    return ModelMatch(entry, key, "; ".join(why), prequantized if via_rules else None, by_rule=True)


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
                vendor=g.get("vendor"),
                pcie_gen=int(g["pcie_gen"]) if g.get("pcie_gen") is not None else None,
                compute_capability=str(g["compute_capability"]) if "compute_capability" in g else None,
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
        fp32_tflops=CPU_FP32_TFLOPS,  # a judgement (planner/rules.py); hardware.tflops replaces it
        memory_bandwidth_gbps=50.0,
        interconnect="none",
        interconnect_gbps=0.0,
        price_usd_per_hour=None,
        price_date=None,
        source="this machine",
        is_cpu=True,
    )
