"""Abuse tests: fuzzed specs, hostile strings in every field that reaches a generated project, odd output
paths, and models that want to run code (custom `auto_map` code, pickled weights).

The fuzzing and injection tests run the CLI in-process (`peftplan.cli.main`), offline, with an empty
Hugging Face cache. The tests that load models start the generated project's `train.py` in subprocesses
(marked slow).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

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
    shown = f"{command} exit {rc}\n--- spec ---\n{_spec_text(spec_path)}\n--- stderr ---\n{err}\n--- stdout ---\n{out[:2000]}"
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
    if rc == 3:
        assert command == "plan", shown
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


# -------------------------------------------------------------------------------- 1. spec fuzzing
@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A folder with a local model (`model/config.json`) and data, so relative names resolve."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (d / "data.jsonl").write_text('{"text": "hello"}\n')
    (d / "not-json.json").write_text("{ this is not json")
    (d / "list.json").write_text("[1, 2, 3]")
    return d


BASES = [tomllib.loads(p.read_text(encoding="utf-8")) for p in EXAMPLES]
SPECIAL_STRINGS = [
    "", " ", "\t", "\n", "auto", "cpu", "CPU", "A100-80GB", "a100 80gb", "NVIDIA A100-SXM4-80GB", "H100", "T4",
    "model", "model/config.json", "./model", "../", "/", ".", "~", "~root", "/etc/passwd", "not-json.json",
    "list.json", "data.jsonl", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8b", "gpt2", "no/such-model",
    "a/b/c", "x" * 5000, "ünïcödé 漢字 🚀", "\u202e\u200b", "'; DROP TABLE specs; --", "$(touch PWNED)",
    "{{ 7*7 }}", "{% raw %}", "lora", "qlora", "full", "all-linear", "q_proj", "NaN", "inf", "-1", "1e999",
    "\x7f\x01", "C:\\Windows\\System32", "\\\\server\\share",
]
SPECIAL_NUMBERS = [0, -1, 1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 + 1, 10**30, 10**400,
                   -(10**30), 0.0, -0.0, 0.5, 0.999999, 1.0, 1.5, 1e-320, 5e-324, 1e-300, 1e300, 1e308, -1e308,
                   math.inf, -math.inf, math.nan]

scalars = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    st.sampled_from(SPECIAL_STRINGS),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
    st.text(max_size=300, alphabet=st.characters(codec="utf-8")),
    st.datetimes(),
    st.dates(),
    st.times(),
)
# keys: anything but line breaks (a key with a line break is test_unknown_key_with_line_break_stays_on_one_line)
keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=15)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=12)


def _leaf_types(annotation) -> set:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {("literal", a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(a) for a in args))


def plausible_for(table: str, key: str):
    """Values of the right type for the key, extremes included: these pass validation and reach the planner."""
    kinds = _leaf_types(Spec.model_fields[table].annotation.model_fields[key].annotation)
    options = [st.sampled_from(SPECIAL_STRINGS[:12])]
    literals = sorted(k[1] for k in kinds if isinstance(k, tuple))
    if literals:
        options.append(st.sampled_from(literals))
    if int in kinds or float in kinds:
        options += [st.sampled_from([n for n in SPECIAL_NUMBERS if isinstance(n, int)]),
                    st.integers(min_value=-3, max_value=2**70), st.integers(min_value=1, max_value=4096)]
    if float in kinds:
        options += [st.sampled_from(SPECIAL_NUMBERS), st.floats(min_value=0, allow_infinity=True),
                    st.floats(min_value=1e-6, max_value=1e6)]
    if bool in kinds:
        options.append(st.booleans())
    if str in kinds:
        options += [st.sampled_from(SPECIAL_STRINGS), st.text(max_size=30)]
    if any(getattr(k, "__origin__", None) is list or k is list for k in kinds) or key == "target_modules":
        options.append(st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj", "c_attn", "", "x"]), max_size=4))
    return st.one_of(options)


def _paths(d, prefix=()):
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    return out


def _get_parent(d, path):
    for k in path[:-1]:
        d = d[k]
    return d


@st.composite
def mutated_specs(draw):
    spec = copy.deepcopy(draw(st.sampled_from(BASES)))
    if draw(st.booleans()):
        spec["model"] = {**spec.get("model", {}), "name": draw(st.sampled_from(["model", "model/config.json", "./model"]))}
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["drop", "set", "unknown", "table", "rename"] + ["set_plausible"] * 8))
        paths = _paths(spec)
        if op == "drop" and paths:
            path = draw(st.sampled_from(paths))
            parent = _get_parent(spec, path)
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        elif op in ("set", "set_plausible"):
            table, key = draw(st.sampled_from(spec_keys()))
            if not isinstance(spec.get(table), dict):
                spec[table] = {}
            spec[table][key] = draw(values if op == "set" else plausible_for(table, key))
        elif op == "unknown":
            tables = [()] + [(t,) for t, v in spec.items() if isinstance(v, dict)]
            where = draw(st.sampled_from(tables))
            target = spec if not where else spec[where[0]]
            target[draw(st.one_of(keys.filter(bool), st.sampled_from(
                ["modle", "nmae", "lr", "learning-rate", "Rank", "gpus", "extra", "data", "model"])))] = draw(values)
        elif op == "table":
            table = draw(st.sampled_from(["model", "data", "hardware", "method", "training", "objective"]))
            spec[table] = draw(values)
        elif op == "rename" and paths:
            path = draw(st.sampled_from(paths))
            parent = _get_parent(spec, path)
            if isinstance(parent, dict) and path[-1] in parent:
                parent[path[-1] + draw(st.sampled_from(["s", "_", " ", "X", "é"]))] = parent.pop(path[-1])
    return spec


def write_spec(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


@settings(max_examples=600, **FUZZ_SETTINGS)
@given(spec=mutated_specs())
def test_fuzz_mutated_specs_validate_estimate_plan(fuzz_dir, spec):
    path = write_spec(fuzz_dir / "spec.toml", spec)
    for command in ("validate", "estimate", "plan"):
        check_cli(path, command)


@settings(max_examples=250, **FUZZ_SETTINGS)
@given(doc=st.dictionaries(keys, values, max_size=6))
def test_fuzz_random_documents(fuzz_dir, doc):
    path = write_spec(fuzz_dir / "random.toml", doc)
    for command in ("validate", "estimate", "plan"):
        assert check_cli(path, command) == 2


TOML_SHARDS = ["[model]", "[model", "name =", 'name = "', '"""', "'''", "[[model]]", "=", "[", "]", "\n", "# c",
               "a.b.c = 1", "x = [1,", "nan", "1979-05-27T07:32:00Z", "{a=1", "\\u0000", "\r\n", "\x00", "\ufeff"]


@settings(max_examples=250, **FUZZ_SETTINGS)
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.lists(st.sampled_from(TOML_SHARDS), max_size=12).map(lambda xs: "".join(xs).encode())))
def test_fuzz_raw_garbage_is_refused_with_exit_2(fuzz_dir, raw):
    path = fuzz_dir / "garbage.toml"
    path.write_bytes(raw)
    for command in ("validate", "estimate", "plan"):
        rc = check_cli(path, command)
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            doc = None
        if doc is None or "model" not in doc or "hardware" not in doc:
            assert rc == 2, (command, raw)


@pytest.mark.parametrize("key", ["a\nb", "x\r", "\n"])
@pytest.mark.parametrize("where", ["top", "training"])
def test_unknown_key_with_line_break_stays_on_one_line(fuzz_dir, key, where):
    """A quoted TOML key may hold a line break; the problem must still be one line naming the file."""
    spec = tomllib.loads((ROOT / "examples" / "llama3-8b-lora-a100.toml").read_text())
    (spec if where == "top" else spec["training"])[key] = 1
    path = write_spec(fuzz_dir / "linebreak.toml", spec)
    for command in ("validate", "estimate", "plan"):
        assert check_cli(path, command) == 2


@pytest.mark.parametrize("key", ["function-", "function-after", "list[str]", "literal['all-linear']"])
@pytest.mark.parametrize("where", ["top", "method"])
def test_unknown_key_that_looks_like_a_pydantic_union_tag(fuzz_dir, key, where):
    """Found by test_fuzz_random_documents ({"function-": []}): the loader drops location parts that look like
    pydantic's union-member tags, even when they are the user's own key."""
    spec = tomllib.loads((ROOT / "examples" / "llama3-8b-lora-a100.toml").read_text())
    (spec if where == "top" else spec["method"])[key] = []
    path = write_spec(fuzz_dir / "uniontag.toml", spec)
    for command in ("validate", "estimate", "plan"):
        assert check_cli(path, command) == 2
    rc, _, err = cli("validate", path)
    assert key in err, err  # the problem names the unknown key


def test_plan_json_lists_all_five_methods(fuzz_dir):
    """CONTRACT.md: `plan --json` prints everything `estimate --json` prints, whose `methods` holds all five
    methods; also when the spec fixes method.name."""
    for example in ("llama3-8b-lora-a100.toml", "llama-1b-on-cpu.toml"):
        path = ROOT / "examples" / example
        rc, out, err = cli("plan", path, "--json")
        assert rc == 0, err
        assert set(json.loads(out)["methods"]) == set(METHODS), (example, list(json.loads(out)["methods"]))


EXTREMES = [0, -1, 2**63, 10**400, -(10**30), 1e308, 5e-324, math.inf, -math.inf, math.nan, True, "", "x" * 3000,
            "漢字🚀\n\t", [], [1, "a"], {"deep": {"er": [{"x": 1}]}}]


def test_every_key_with_every_extreme_value(fuzz_dir):
    """Deterministic sweep: each spec key of a complete, valid spec set to each extreme value, for all three
    commands. Collects every violation before failing, so one run lists them all."""
    base = tomllib.loads((ROOT / "examples" / "llama3-8b-lora-a100.toml").read_text())
    base["training"].update(epochs=1, learning_rate=2e-4, max_steps=100, save_steps=10, seed=1, warmup_ratio=0.1,
                            lr_scheduler="cosine", optimizer="adamw_torch", attention="sdpa")
    base["objective"] = {"priority": "balanced", "max_hours": 10, "budget_usd": 100}
    base["hardware"].update(count=1, nodes=1, price_usd_per_hour=2.0, memory_gib=80)
    failures = []
    for table, key in spec_keys():
        for value in EXTREMES:
            spec = copy.deepcopy(base)
            spec.setdefault(table, {})[key] = value
            path = write_spec(fuzz_dir / "sweep.toml", spec)
            for command in ("validate", "estimate", "plan"):
                try:
                    check_cli(path, command)
                except AssertionError as exc:
                    first = str(exc).split("--- spec ---")[0].strip()
                    err = str(exc).split("--- stderr ---")[-1].split("--- stdout ---")[0].strip()[:200]
                    failures.append(f"{table}.{key} = {value!r:.40}: {first} | {err}")
    assert not failures, f"{len(failures)} violations:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- 2. template injection
HOSTILE = "h\"'`touch PWNED1`$(touch PWNED2);&&|{{7*7}}{%print 1%}#[x]]\\  \n\t*_<i>!~ é漢```<!--"
BENIGN = "benign-name-plain"
HOSTILE_GPU = "evil\"gpu`touch PWNED3`|{{7*7}}\n# [x]] \\ $(id)"
BENIGN_GPU = "benign-accelerator"
MARKERS = ("PWNED", "7*7", "{%print", HOSTILE, HOSTILE_GPU)


def make_workspace(root: Path, name: str, gpu: str, **spec_extra) -> dict:
    """Every user-controlled string carries `name`: the spec's folder and file, the model folder, the data
    file, the output folder; and the GPU name (an uncatalogued device, so memory_gib is given)."""
    ws = root / name
    (ws / f"model {name}").mkdir(parents=True)
    (ws / f"model {name}" / "config.json").write_text(json.dumps(TINY_CONFIG))
    data = ws / f"data {name}.jsonl"
    data.write_text('{"text": "hello world"}\n' * 8)
    spec = {
        "model": {"name": str(ws / f"model {name}")},
        "data": {"path": str(data), "num_examples": 32, "seq_len": 64},
        "hardware": {"gpu": gpu, "memory_gib": 8},
        "method": {"name": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 1, "learning_rate": 1e-3},
    }
    for k, v in spec_extra.items():
        spec.setdefault(k, {}).update(v)
    spec_path = write_spec(ws / f"spec {name}.toml", spec)
    out = ws / f"out {name}"
    return {"ws": ws, "spec": spec_path, "model": ws / f"model {name}", "data": data, "out": out, "gpu": gpu}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("inject")
    hostile = make_workspace(root, HOSTILE, HOSTILE_GPU)
    benign = make_workspace(root, BENIGN, BENIGN_GPU)
    for w in (hostile, benign):
        rc, out, err = cli("generate", w["spec"], "-o", w["out"])
        assert rc == 0, err
        w["stdout"] = out
    assert not list(Path.cwd().glob("PWNED*")) and not list(root.rglob("PWNED*"))
    return hostile, benign


def _files(d: Path) -> dict[str, Path]:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob("*")) if p.is_file()}


def test_injection_python_files_identical_and_free_of_user_strings(twins):
    hostile, benign = twins
    h, b = _files(hostile["out"]), _files(benign["out"])
    assert set(h) == set(b)
    py = [k for k in h if k.endswith(".py")]
    assert {"train.py", "merge.py", "evaluate.py"} <= set(py)
    for rel in py:
        ht, bt = h[rel].read_text(), b[rel].read_text()
        assert ast.dump(ast.parse(ht)) == ast.dump(ast.parse(bt)), rel
        for marker in MARKERS + (str(hostile["ws"]), str(benign["ws"]), BENIGN, BENIGN_GPU):
            assert marker not in ht and marker not in bt, (rel, marker)


def _walk(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, key + ".")
        else:
            yield key, v


def test_injection_plan_toml_round_trips_hostile_values(twins):
    hostile, benign = twins
    hp = tomllib.loads((hostile["out"] / "plan.toml").read_text(encoding="utf-8"))
    bp = tomllib.loads((benign["out"] / "plan.toml").read_text(encoding="utf-8"))
    assert hp["data"]["path"] == str(hostile["data"].resolve())
    assert hp["model"]["name"] == str(hostile["model"].resolve())
    assert hp["provenance"]["spec"] == str(hostile["spec"].resolve())
    assert hp["prediction"]["device"] == HOSTILE_GPU
    user = {"data.path", "model.name", "provenance.spec", "provenance.spec_sha256", "provenance.generated",
            "prediction.device"}
    hk, bk = dict(_walk(hp)), dict(_walk(bp))
    assert set(hk) == set(bk)  # no key injected, none lost
    for key in hk:
        if key not in user:
            assert hk[key] == bk[key], key
    # every comment stays on its line: the same number of lines as the benign twin's
    assert len((hostile["out"] / "plan.toml").read_text().splitlines()) == \
        len((benign["out"] / "plan.toml").read_text().splitlines())


def _command_words(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_injection_run_sh_and_accelerate_config_unchanged(twins):
    import yaml

    hostile, benign = twins
    assert _command_words((hostile["out"] / "run.sh").read_text()) == _command_words((benign["out"] / "run.sh").read_text())
    hy = yaml.safe_load((hostile["out"] / "accelerate_config.yaml").read_text())
    by = yaml.safe_load((benign["out"] / "accelerate_config.yaml").read_text())
    assert hy == by
    assert os.access(hostile["out"] / "run.sh", os.X_OK)


def _unescaped_pipes(line: str) -> int:
    n, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        n += line[i] == "|"
        i += 1
    return n


def test_injection_readme_structure_unchanged(twins):
    hostile, benign = twins
    hr = (hostile["out"] / "README.md").read_text().splitlines()
    br = (benign["out"] / "README.md").read_text().splitlines()
    assert len(hr) == len(br)
    assert [l.startswith("```") for l in hr] == [l.startswith("```") for l in br]  # fences where they were
    assert [l.startswith("|") for l in hr] == [l.startswith("|") for l in br]
    assert [l.startswith("#") for l in hr] == [l.startswith("#") for l in br]  # no injected heading
    for h, b in zip(hr, br):
        if b.startswith("|"):
            assert _unescaped_pipes(h) == _unescaped_pipes(b), (h, b)
    text = "\n".join(hr)
    assert "7\\*7" in text or "7*7" in text  # {{7*7}} is shown as written, never evaluated
    prose, fenced = [], False
    for line in hr[1:]:  # line 1 is the banner comment
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            prose.append(re.sub(r"`[^`]*`", "", line))
    for tag in ("<i>", "<!--"):  # no raw HTML from user strings outside code
        assert not any(re.search(r"(?<!\\)" + re.escape(tag), l) for l in prose), tag


def test_injection_readme_regenerate_command_round_trips_paths(twins):
    """The README's `peftplan generate SPEC -o OUT --force` line, pasted into a shell, must name the real
    spec and output paths (here they contain quotes, `$( )`, backticks, two spaces and a newline)."""
    for w in twins:
        text = (w["out"] / "README.md").read_text()
        start = text.index("peftplan generate ")
        end = text.index("\n```", start)
        words = _bash_words(text[start:end], w["out"].parent)
        assert words == ["peftplan", "generate", str(w["spec"].resolve()), "-o", str(w["out"]), "--force"], words


def test_injection_generate_next_step_hint_is_shell_safe(twins):
    """`peftplan generate` prints `next: peftplan run DIR`; pasted into a shell it must not run `$( )` or
    backticks from the folder name and must name the folder."""
    for w in twins:
        line = next(l for l in w["stdout"].splitlines() if l.startswith("next: "))
        cmd = line.removeprefix("next: ").split("   (or:")[0]
        words = _bash_words(cmd, w["out"].parent)
        assert words == ["peftplan", "run", str(w["out"])], (line, words)


def _bash_words(cmd: str, cwd: Path) -> list[str]:
    """The words bash makes of `cmd` (a `peftplan …` line), run with `peftplan` replaced by a function that
    prints its arguments; fails if the line runs anything (PWNED marker files) or does not parse."""
    script = 'peftplan() { printf "%s\\0" peftplan "$@"; }\n' + cmd
    proc = subprocess.run(["bash", "-c", script], capture_output=True, cwd=cwd)
    assert proc.returncode == 0, f"not a valid shell command: {cmd!r}: {proc.stderr.decode()}"
    assert not list(cwd.rglob("PWNED*")), f"{cmd!r} ran a command substitution"
    return proc.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("targets", [
    ["q_proj", "x'; import os; os.system('touch PWNED') #"],
    ["{{ 7*7 }}"],
    ["v_proj", "a\nb\"c = 1\n[training]\nlearning_rate = 1e9"],
    ["$(touch PWNED)", "`id`"],
    ["q_proj\\"],
    [""],
])
def test_hostile_target_modules_are_rejected_not_rendered(twins, targets):
    _, benign = twins
    ws = benign["ws"]
    spec = tomllib.loads(benign["spec"].read_text())
    spec["method"]["target_modules"] = targets
    path = write_spec(ws / "targets.toml", spec)
    out = ws / "targets-out"
    for command in ("validate", "estimate", "plan"):
        assert check_cli(path, command) == 2
    rc, stdout, err = cli("generate", path, "-o", out)
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines and all(l.startswith(str(path)) for l in lines), err
    assert "method.target_modules" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(ws.glob(".targets-out.peftplan-*"))


# ------------------------------------------------------------------------------------------ 3. paths
@pytest.fixture
def simple(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    spec = {"model": {"name": "model"}, "data": {"path": "data.jsonl", "num_examples": 32, "seq_len": 64},
            "hardware": {"gpu": "cpu", "memory_gib": 8}, "method": {"name": "lora", "rank": 4}}
    write_spec(tmp_path / "spec.toml", spec)
    return tmp_path


def _stray(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if ".peftplan-" in p.name]


def _wrote_line(stdout: str) -> str:
    return next(l for l in stdout.splitlines() if l.startswith("wrote "))


def test_output_through_dotdot_writes_resolved_target_and_says_so(simple):
    w = simple / "w"
    (w / "a").mkdir(parents=True)
    out = f"{w}/a/../../escape"
    rc, stdout, err = cli("generate", simple / "spec.toml", "-o", out)
    assert rc == 0, err
    real = simple / "escape"
    assert (real / "plan.toml").is_file() and (real / "train.py").is_file()
    assert str(real) in _wrote_line(stdout), stdout  # the message names where the files really are
    assert list((w / "a").iterdir()) == [] and sorted(p.name for p in w.iterdir()) == ["a"]
    assert not _stray(simple, w, w / "a")


def test_output_through_dotdot_of_missing_folder_creates_nothing_else(simple):
    """`w/a/../../escape2` with no `w/a`: either refused (exit 2) or written to the resolved target, but the
    non-existent `a` must not be created as a side effect."""
    w = simple / "w"
    w.mkdir()
    rc, stdout, err = cli("generate", simple / "spec.toml", "-o", f"{w}/a/../../escape2")
    assert list(w.iterdir()) == [], f"side effect: created {[p.name for p in w.iterdir()]} in {w}"
    assert not _stray(simple, w)
    if rc == 0:
        assert (simple / "escape2" / "plan.toml").is_file()
        assert str(simple / "escape2") in _wrote_line(stdout), stdout
    else:
        assert rc == 2 and err.strip(), err
        assert not (simple / "escape2").exists()


def test_output_symlink_to_existing_dir_same_filesystem(simple):
    real = simple / "real"
    real.mkdir()
    link = simple / "link"
    link.symlink_to(real)
    rc, stdout, err = cli("generate", simple / "spec.toml", "-o", link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "plan.toml").is_file()
    assert not _stray(simple, real)
    assert str(real) in _wrote_line(stdout), stdout


def test_output_symlink_to_other_filesystem(simple):
    """A common set-up: `outputs -> /big/disk/run1`. The project must land on the other filesystem."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == simple.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) distinct from the test folder on this machine")
    real = Path(shm / f"peftplan-test-{os.getpid()}-{simple.name}")
    real.mkdir()
    try:
        link = simple / "link"
        link.symlink_to(real)
        rc, stdout, err = cli("generate", simple / "spec.toml", "-o", link)
        assert not _stray(simple, real, shm)
        assert rc == 0, err
        assert (real / "plan.toml").is_file() and link.is_symlink()
    finally:
        shutil.rmtree(real, ignore_errors=True)


def test_output_dangling_symlink_is_not_replaced(simple):
    link = simple / "link"
    link.symlink_to(simple / "not-yet")
    rc, stdout, err = cli("generate", simple / "spec.toml", "-o", link)
    assert link.is_symlink() and os.readlink(link) == str(simple / "not-yet"), "the user's symlink was replaced"
    if rc == 0:
        assert (simple / "not-yet" / "plan.toml").is_file()
    else:
        assert rc in (1, 2) and str(link) in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert not _stray(simple)


def test_generated_project_has_normal_permissions(simple):
    """The project folder is built with mkdtemp (mode 0700) and renamed: it must end up with the mode a
    plain mkdir gives under the current umask, or a second user / container user cannot read it."""
    rc, _, err = cli("generate", simple / "spec.toml", "-o", simple / "proj")
    assert rc == 0, err
    umask = os.umask(0)
    os.umask(umask)
    probe = simple / "probe"
    probe.mkdir()
    assert oct((simple / "proj").stat().st_mode & 0o777) == oct(probe.stat().st_mode & 0o777)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_data_path_with_dotdot_is_stored_resolved(simple, form):
    (simple / "sub" / "deeper").mkdir(parents=True)
    raw = "sub/deeper/../../data.jsonl" if form == "relative" else f"{simple}/sub/deeper/../../data.jsonl"
    spec = tomllib.loads((simple / "spec.toml").read_text())
    spec["data"]["path"] = raw
    path = write_spec(simple / "dd.toml", spec)
    rc, _, err = cli("generate", path, "-o", simple / f"dd-{form}")
    assert rc == 0, err
    plan = tomllib.loads((simple / f"dd-{form}" / "plan.toml").read_text())
    assert plan["data"]["path"] == str((simple / "data.jsonl").resolve())


# ---------------------------------------------------------------------------- 4. remote code, pickles
def test_trust_remote_code_reaches_plan_toml(simple):
    for value, expect in ((None, False), (False, False), (True, True)):
        spec = tomllib.loads((simple / "spec.toml").read_text())
        if value is not None:
            spec["model"]["trust_remote_code"] = value
        path = write_spec(simple / f"trc-{value}.toml", spec)
        rc, _, err = cli("generate", path, "-o", simple / f"trc-{value}")
        assert rc == 0, err
        model = tomllib.loads((simple / f"trc-{value}" / "plan.toml").read_text())["model"]
        assert model["trust_remote_code"] is expect
        if not expect:
            assert "trust_remote_code = false" in (simple / f"trc-{value}" / "plan.toml").read_text()


def test_load_model_passes_safe_loading_flags(monkeypatch):
    pytest.importorskip("transformers")
    import transformers

    from peftplan.runtime.model import MethodSetup, load_model

    seen = {}

    class Stop(Exception):
        pass

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    for trc in (False, True):
        seen.clear()
        with pytest.raises(Stop):
            load_model("/nowhere", MethodSetup(method="lora", dtype="float32", trust_remote_code=trc))
        assert seen["trust_remote_code"] is trc and seen["use_safetensors"] is True
    seen.clear()
    with pytest.raises(Stop):
        load_model("/nowhere", MethodSetup(method="lora", dtype="float32"))
    assert seen["trust_remote_code"] is False  # the default is off


CUSTOM_CONFIG_PY = '''
import pathlib
pathlib.Path({marker!r}).write_text("configuration code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evilnet"
'''
CUSTOM_MODELING_PY = '''
import pathlib
pathlib.Path({marker!r}).write_text("modeling code ran")
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


class _Evil:
    """Pickled into pytorch_model.bin: unpickling it creates a folder (proof that the pickle ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    """One tiny real model, three variants, three train.py runs started together (they are mostly start-up):
    custom code untrusted, custom code trusted, pickled weights only."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("models")
    base = build_tiny_model(root / "tiny", family="llama", hidden_size=64, intermediate_size=128)
    write_dataset(root / "data.jsonl", "chat", 16)
    markers = {"pickle": root / "MARKER-pickle"}
    custom = {}
    for variant in ("untrusted", "trusted"):  # two copies: each run has its own proof-of-execution files
        evil = custom[variant] = root / f"custom-{variant}"
        shutil.copytree(base, evil)
        cfg = json.loads((evil / "config.json").read_text())
        cfg.update(model_type="evilnet", architectures=["EvilForCausalLM"],
                   auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (evil / "config.json").write_text(json.dumps(cfg))
        markers[f"{variant}-config"] = root / f"MARKER-{variant}-config"
        markers[f"{variant}-modeling"] = root / f"MARKER-{variant}-modeling"
        (evil / "configuration_evil.py").write_text(CUSTOM_CONFIG_PY.format(marker=str(markers[f"{variant}-config"])))
        (evil / "modeling_evil.py").write_text(CUSTOM_MODELING_PY.format(marker=str(markers[f"{variant}-modeling"])))

    pickled = root / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    state["_evil"] = _Evil(str(markers["pickle"]))
    torch.save(state, pickled / "pytorch_model.bin")

    # the planner refuses an architecture it cannot size: custom code never gets as far as a project
    spec = {"model": {"name": str(custom["trusted"]), "trust_remote_code": True},
            "data": {"path": str(root / "data.jsonl"), "num_examples": 16, "seq_len": 32},
            "hardware": {"gpu": "cpu", "memory_gib": 8},
            "method": {"name": "lora", "rank": 4},
            "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "epochs": 1, "save_steps": 100}}
    refused = cli("generate", write_spec(root / "custom.toml", spec), "-o", root / "custom-proj")

    projects = {}
    for name, model, trc in (("untrusted", custom["untrusted"], False), ("trusted", custom["trusted"], True),
                             ("pickle", pickled, False)):
        spec["model"] = {"name": str(base), "trust_remote_code": trc}
        rc, _, err = cli("generate", write_spec(root / f"{name}.toml", spec), "-o", root / name)
        assert rc == 0, err
        plan = root / name / "plan.toml"  # point the frozen plan at the variant, as a user editing it would
        text = plan.read_text()
        assert text.count(json.dumps(str(base))) == 1
        plan.write_text(text.replace(json.dumps(str(base)), json.dumps(str(model))))
        projects[name] = root / name

    env = {**os.environ, **SUBPROCESS_ENV_EXTRA, "HF_HOME": str(root / "hf"),
           "HF_MODULES_CACHE": str(root / "hf" / "modules")}
    procs = {name: subprocess.Popen([sys.executable, "train.py", "--max-steps", "1"], cwd=p, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, p in projects.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return {"refused": refused, "results": results, "markers": markers, "projects": projects}


@pytest.mark.slow
def test_custom_code_model_is_refused_by_planner(model_runs):
    rc, _, err = model_runs["refused"]
    assert rc == 2 and "model.name" in err and "evilnet" in err, err


@pytest.mark.slow
def test_custom_code_refused_at_run_time_without_trust(model_runs):
    r = model_runs["results"]["untrusted"]
    m = model_runs["markers"]
    assert not m["untrusted-config"].exists() and not m["untrusted-modeling"].exists(), \
        "custom code ran without trust_remote_code"
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-2500:]}"
    assert "trust_remote_code" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    assert not (model_runs["projects"]["untrusted"] / "outputs" / "final").exists()


@pytest.mark.slow
def test_custom_code_runs_only_when_trusted(model_runs):
    r = model_runs["results"]["trusted"]
    assert r.returncode == 0, r.stderr[-2500:]
    assert model_runs["markers"]["trusted-modeling"].exists()  # trust_remote_code = true reached the loader


@pytest.mark.slow
def test_pickled_weights_are_refused(model_runs):
    r = model_runs["results"]["pickle"]
    assert not model_runs["markers"]["pickle"].exists(), "the pickle was unpickled"
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-2500:]}"
    assert "Traceback" not in r.stderr, r.stderr[-2500:]
    assert "safetensors" in r.stderr and str(model_runs["projects"]["pickle"].parent / "pickled") in r.stderr
    assert not (model_runs["projects"]["pickle"] / "outputs" / "final").exists()
