"""Which checkpoint a resume can trust: verified before it is used, the newest loadable one wins.

A checkpoint the Trainer wrote holds trainer_state.json, the weights (safetensors), and for the exact resume
the optimizer, scheduler, RNG (and scaler) state as torch pickles, each a zip archive. A run killed while
saving, a full disk or a copy gone wrong leaves any of them truncated; `torch.load` would then fail deep inside
`trainer.train()` with a traceback. So each file is checked first, cheaply (a truncated zip has no central
directory; small members are CRC-checked), and a checkpoint with any unreadable file is skipped with a warning
naming it. A checkpoint of another adapter shape (the project was regenerated with another rank or targets) is
not skipped but refused: every older one would mismatch as well, and training from scratch is the user's call.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from .messages import say

TORCH_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt")
CRC_CHECK_BELOW = 256 * 2**20  # CRC-check whole archives up to this size; larger ones: structure only


class CheckpointMismatch(ValueError):
    """The newest checkpoint was trained with other adapter settings than the plan's."""


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def readable_safetensors(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key)  # header and offsets consistent with the file size
        return True
    except Exception:  # noqa: BLE001 - any failure to read means: do not resume from it
        return False


def readable_torch_archive(path: Path) -> bool:
    """A torch.save file (a zip archive) that is complete: central directory present, members CRC-checked when
    the archive is not huge."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return False
            if path.stat().st_size <= CRC_CHECK_BELOW:
                return zf.testzip() is None
            return True
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when every file it holds reads back."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError, RecursionError):
        return "trainer_state.json is missing or unreadable"
    weights = list(ckpt.glob("*.safetensors"))
    if not weights and not any(p.is_dir() for p in ckpt.glob("pytorch_model_fsdp_*")):
        return "it holds no weights"
    for w in weights:
        if not readable_safetensors(w):
            return f"{w.name} is truncated or corrupt"
    pickles = [ckpt / n for n in TORCH_STATE if (ckpt / n).exists()] + sorted(ckpt.glob("rng_state*.pth"))
    for f in pickles:
        if not readable_torch_archive(f):
            return f"{f.name} is truncated or corrupt"
    adapter_config = ckpt / "adapter_config.json"
    if adapter_config.exists():
        try:
            json.loads(adapter_config.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return "adapter_config.json is unreadable"
    return None


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose files all read back; corrupt ones are skipped with a warning."""
    for ckpt in _checkpoints(output_dir):
        why = problem(ckpt)
        if why is None:
            return ckpt
        say(f"warning: {ckpt}: {why}; trying an older checkpoint")
    return None


def check_matches_plan(ckpt: Path, method: dict) -> None:
    """CheckpointMismatch when the checkpoint's adapter differs from the plan's (rank, alpha, DoRA, targets)."""
    path = ckpt / "adapter_config.json"
    if method["name"] == "full":
        if path.exists():
            raise CheckpointMismatch(f"{ckpt} holds an adapter, but the plan now fine-tunes every weight (full)")
        return
    if not path.exists():
        raise CheckpointMismatch(f"{ckpt} holds full weights, but the plan now trains a {method['name']} adapter")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    want = {"rank": method["rank"], "alpha": float(method["alpha"]), "DoRA": method["name"] in ("dora", "qdora")}
    have = {"rank": cfg.get("r"), "alpha": float(cfg.get("lora_alpha") or 0), "DoRA": bool(cfg.get("use_dora"))}
    targets = method.get("target_modules")
    if isinstance(targets, list) and isinstance(cfg.get("target_modules"), list):
        want["target_modules"], have["target_modules"] = sorted(targets), sorted(cfg["target_modules"])
    diff = [f"{k} {have[k]} (plan: {want[k]})" for k in want if have[k] != want[k]]
    if diff:
        raise CheckpointMismatch(f"{ckpt} was trained with {', '.join(diff)}: it cannot be resumed with this plan. "
                                 "Start afresh (move outputs/ away) or regenerate with the checkpoint's settings")


def checkpoint_is_final(ckpt: Path) -> bool:
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def install_checkpoint_weights(ckpt: Path, final: Path, trainer) -> None:
    """The last checkpoint already holds the trained weights: copy them (and their configs) to `final`."""
    if not trainer.is_world_process_zero():
        return
    final.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith("config.json") or f.name == "README.md":
            shutil.copy2(f, final / f.name)
