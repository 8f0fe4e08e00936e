"""Abuse, part 1: fuzzed and mutated specs through validate, estimate and plan; keys rendered safely.

The CLI runs in-process (`peftplan.cli.main`), offline, with an empty Hugging Face cache; hypothesis
generates the specs.
"""

from __future__ import annotations

import copy
import json
import math
import tomllib

import pytest

hypothesis = pytest.importorskip("hypothesis")
from abuse_support import (  # helpers shared by the abuse tests
    EXAMPLES,
    METHODS,
    ROOT,
    TINY_CONFIG,
    check_cli,
    cli,
    offline_empty_hf_cache,  # noqa: F401 - an autouse fixture: offline, empty HF cache
    spec_keys,
    write_spec,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftplan.schemas import Spec  # noqa: E402


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
        spec["model"] = {**spec.get("model", {}),
                         "name": draw(st.sampled_from(["model", "model/config.json", "./model"]))}
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
    """docs/json.md: `plan --json` prints everything `estimate --json` prints, whose `methods` holds all five
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


