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
             gpu: str = "cpu", count: int = 1, nodes: int = 1, seq_len: int = 64, **training) -> str:
    """A spec for a tiny run: LoRA-family rank/alpha, dropout 0, micro-batch 4, one epoch, plus `training` keys."""
    return tomli_w.dumps({
        "model": {"name": str(model)},
        "data": {"path": "data.jsonl", "num_examples": num_examples, "seq_len": seq_len},
        "hardware": {"gpu": gpu, "memory_gib": 8, "count": count, "nodes": nodes},
        "method": {"name": method, "rank": rank, "alpha": alpha, "dropout": 0.0},
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "epochs": 1, **training},
    })
