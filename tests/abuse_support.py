"""Shared by tests/test_abuse_spec.py and tests/test_abuse_project.py: the in-process CLI runner, an empty
offline Hugging Face cache, and spec helpers.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import tomli_w

hypothesis = pytest.importorskip("hypothesis")

from peftplan.cli import main  # noqa: E402
from peftplan.schemas import Spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml")) + [ROOT / "examples" / "quickstart" / "spec.toml"]
TINY_CONFIG = {  # a tiny Llama; `generate` and the planner only read config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "vocab_size": 642, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
PY_EXCEPTION = re.compile(r"Traceback|internal error|\b(?:Key|Type|Attribute|Value|Index|ZeroDivision|Overflow|"
                          r"Recursion|Assertion|Name|UnboundLocal|Lookup|Runtime|OS|Unicode\w*)Error\b")
METHODS = ("full", "lora", "qlora", "dora", "qdora")
SUBPROCESS_ENV_EXTRA = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
                        "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def offline_empty_hf_cache(tmp_path_factory):
    """No real Hugging Face cache is consulted and nothing reaches the network."""
    home = tmp_path_factory.mktemp("hfhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(home / "hf"))
        mp.setenv("HF_HUB_CACHE", str(home / "hub"))
        mp.delenv("PEFTPLAN_DEBUG", raising=False)
        yield home


def cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse; never expected here
            rc = 1000 + (exc.code if isinstance(exc.code, int) else 0)
    return rc, out.getvalue(), err.getvalue()


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def check_cli(spec_path: Path, command: str) -> int:
    """Run one read-only command on a spec and check the contract, whatever the spec holds."""
    args = [command, spec_path] + ([] if command == "validate" else ["--json"])
    rc, out, err = cli(*args)
    shown = (f"{command} exit {rc}\n--- spec ---\n{_spec_text(spec_path)}\n--- stderr ---\n{err}\n"
             f"--- stdout ---\n{out[:2000]}")
    assert rc in (0, 2, 3), shown
    assert not PY_EXCEPTION.search(err) and not PY_EXCEPTION.search(out), shown
    if rc == 2:
        lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # what a terminal shows as lines
        assert lines, shown
        for line in lines:  # one line per problem, each naming the file (and key when there is one)
            assert line.startswith(str(spec_path)), f"line does not name the spec file: {line!r}\n{shown}"
        assert not out.strip(), shown
    if rc in (0, 3) and command != "validate":
        try:
            data = json.loads(out, parse_constant=_no_constant)  # strict JSON: no NaN / Infinity
        except ValueError as exc:
            raise AssertionError(f"{command} --json printed invalid JSON ({exc})\n{shown}") from None
        if command == "estimate":
            assert set(data["methods"]) == set(METHODS), shown
        else:  # plan: see test_plan_json_lists_all_five_methods for the contract's "everything estimate prints"
            assert data["methods"] and set(data["methods"]) <= set(METHODS), shown
        for name, m in data["methods"].items():
            if not m:
                continue
            for key in ("peak_allocated_bytes", "device_total_bytes"):
                assert isinstance(m[key], int) and not isinstance(m[key], bool) and m[key] >= 0, (name, key, shown)
    if rc == 3:  # nothing fits: plan at any geometry it searched, estimate at the one it estimated
        assert command in ("plan", "estimate"), shown
    return rc


def _spec_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")[:3000]
    except (OSError, UnicodeDecodeError):
        return repr(path.read_bytes()[:3000])


def spec_keys() -> list[tuple[str, str]]:
    keys = []
    for table, field in Spec.model_fields.items():
        for key in field.annotation.model_fields:
            keys.append((table, key))
    return keys

def write_spec(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
