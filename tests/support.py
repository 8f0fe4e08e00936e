"""Shared by the tests that generate and train projects: the offline environment for subprocesses and a
spec builder for tiny CPU runs (a local `model/` and `data.jsonl` next to the spec)."""

from __future__ import annotations

import os

import tomli_w


def free_port() -> str:
    """A TCP port nothing listens on now (the OS picks it), for a launcher's rendezvous: tests never assume a
    fixed port such as 29500 is free."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def cpu_spec(*, model: str = "model", num_examples: int, method: str = "lora", rank: int = 8, alpha: float = 16,
             gpu: str = "cpu", count: int = 1, nodes: int = 1, seq_len: int = 64, packing: bool = False,
             **training) -> str:
    """A spec for a tiny run: LoRA-family rank/alpha, dropout 0, micro-batch 4, one epoch, plus `training` keys.
    Packing is off unless asked for, so that steps per epoch are examples / micro-batch (tests count them)."""
    return tomli_w.dumps({
        "model": {"name": str(model)},
        "data": {"path": "data.jsonl", "num_examples": num_examples, "seq_len": seq_len, "packing": packing},
        "hardware": {"gpu": gpu, "memory_gib": 8, "count": count, "nodes": nodes},
        "method": {"name": method, "rank": rank, "alpha": alpha, "dropout": 0.0},
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "epochs": 1, **training},
    })


class RunLockHolder:
    """Another process holding a project's run lock (runtime/lock.py), for as long as the `with` block lasts."""

    def __init__(self, project):
        self.project = project

    def __enter__(self):
        import subprocess
        import sys

        out = self.project / "outputs"
        script = (f"import sys, time; sys.path.insert(0, {str(self.project)!r}); from pathlib import Path; "
                  "from peftplan_runtime.lock import hold_run_lock; "
                  f"hold_run_lock(Path({str(out)!r})); print('held', flush=True); time.sleep(60)")
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        return self.proc

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def meta_model(cfg: dict):
    """The transformers model for a config dict, built on the meta device (parameters without memory)."""
    import pytest

    torch = pytest.importorskip("torch", reason="counting a real model's parameters needs the [train] extra")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)
