"""Loading a spec: defaults, and every problem reported at once, one line each, naming the key and its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peftplan.schemas import SpecError, load_spec, spec_from_dict

MINIMAL = '[model]\nname = "gpt2"\n\n[hardware]\ngpu = "A100-80GB"\n'


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problem_lines(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = info.value.lines()
    # str(SpecError) is the same lines joined: one problem per line, no line holds two.
    assert str(info.value).split("\n") == lines
    return lines


def lines_naming(lines: list[str], key: str) -> list[str]:
    """The lines whose key (after the optional `path:LINE: ` prefix) is exactly `key`."""
    pat = re.compile(rf"(^|: ){re.escape(key)}: ")
    return [line for line in lines if pat.search(line)]


def line_of(text: str, startswith: str) -> int:
    """1-based number of the first line of `text` that starts with `startswith` (computed here, not by the code)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith(startswith):
            return number
    raise AssertionError(f"{startswith!r} not in the test's own text")


# --- valid specs and defaults ------------------------------------------------------------------------

def test_minimal_spec_loads_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.model.name == "gpt2"
    assert spec.model.dtype == "auto"
    assert spec.model.trust_remote_code is False
    assert spec.hardware.gpu == "A100-80GB"
    assert spec.hardware.memory_gib is None
    assert spec.hardware.count == 1
    assert spec.hardware.nodes == 1
    assert spec.hardware.price_usd_per_hour is None
    d = spec.data
    assert (d.num_examples, d.seq_len, d.avg_tokens, d.path, d.packing, d.eval_fraction) == (None,) * 6
    assert d.format == "auto"
    m = spec.method
    assert m.name == "auto"
    assert (m.rank, m.alpha, m.dropout, m.target_modules) == (None, None, None, None)
    t = spec.training
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing, t.optimizer, t.attention,
            t.epochs, t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.max_steps, t.save_steps) == (None,) * 11
    assert spec.objective.priority == "balanced"


def test_contract_example_spec_loads_with_every_contract_key(tmp_path):
    text = """
[model]
name = "mistralai/Mistral-7B-v0.1"
dtype = "auto"

[data]
num_examples = 10000
seq_len = 2048
avg_tokens = 600
path = "data/train.jsonl"

[hardware]
gpu = "A100-80GB"
memory_gib = 80
count = 1
nodes = 1

[method]
name = "auto"
rank = 16
alpha = 32
dropout = 0.05
target_modules = "all-linear"

[training]
micro_batch_size = 4
gradient_accumulation_steps = 4
gradient_checkpointing = true
optimizer = "adamw_torch"
attention = "sdpa"
epochs = 3
learning_rate = 2e-4
"""
    spec = load_spec(write(tmp_path, text))
    assert spec.data.seq_len == 2048 and spec.data.path == "data/train.jsonl"
    assert spec.hardware.memory_gib == 80
    assert spec.method.rank == 16 and spec.method.alpha == 32 and spec.method.dropout == 0.05
    assert spec.method.target_modules == "all-linear"
    assert spec.training.micro_batch_size == 4 and spec.training.gradient_checkpointing is True
    assert spec.training.learning_rate == pytest.approx(2e-4)


def test_target_modules_list_is_kept(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL + '\n[method]\ntarget_modules = ["q_proj", "v_proj"]\n'))
    assert list(spec.method.target_modules) == ["q_proj", "v_proj"]


def test_spec_from_dict_minimal():
    spec = spec_from_dict({"model": {"name": "gpt2"}, "hardware": {"gpu": "cpu"}})
    assert spec.model.name == "gpt2" and spec.hardware.gpu == "cpu"
    assert spec.method.name == "auto" and spec.training.micro_batch_size is None


def test_spec_from_dict_problem_without_file_has_no_location():
    with pytest.raises(SpecError) as info:
        spec_from_dict({"model": {"name": "gpt2"}, "hardware": {"gpu": "cpu"}, "training": {"micro_batch_size": 0}})
    assert len(info.value.lines()) == 1
    assert info.value.lines()[0].startswith("training.micro_batch_size: must be ≥ 1")


# --- unknown keys and tables -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, marker",
    [
        pytest.param(MINIMAL + "\n[training]\nmicro_batch = 2\n", "micro_batch =", id="in-table"),
        pytest.param(MINIMAL + '\n[training]\n"micro_batch" = 2\n', '"micro_batch" =', id="quoted-key"),
        pytest.param("training.micro_batch = 2\n" + MINIMAL, "training.micro_batch =", id="top-level-dotted-key"),
        pytest.param(MINIMAL + "\n[training]\nseed = 1\n  micro_batch = 2  # typo\n", "  micro_batch =",
                     id="indented-with-comment"),
    ],
)
def test_unknown_key_named_with_suggestion_and_line(tmp_path, text, marker):
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, lines
    expected_line = line_of(text, marker)
    assert lines[0].startswith(f"{path}:{expected_line}: training.micro_batch: "), lines[0]
    assert "did you mean 'micro_batch_size'" in lines[0]


def test_unknown_key_in_dotted_subkey_points_at_its_own_line(tmp_path):
    text = MINIMAL + "\n[method]\nrank = 8\nlora.rank = 2\n"
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:{line_of(text, 'lora.rank')}: method.lora: "), lines[0]


def test_unknown_table_suggests_training(tmp_path):
    text = MINIMAL + "\n[trainer]\nmicro_batch_size = 2\n"
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:{line_of(text, '[trainer]')}: trainer: "), lines[0]
    assert "did you mean 'training'" in lines[0]


def test_unknown_key_without_close_match_lists_allowed_keys(tmp_path):
    text = MINIMAL.replace('gpu = "A100-80GB"\n', 'gpu = "A100-80GB"\nbananas = 3\n')
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:{line_of(text, 'bananas')}: hardware.bananas: ")
    for allowed in ("gpu", "memory_gib", "count", "nodes"):
        assert allowed in lines[0]
    assert "did you mean" not in lines[0]


# --- every problem at once ---------------------------------------------------------------------------

def test_all_problems_reported_at_once_one_per_line(tmp_path):
    text = """[model]
name = "gpt2"

[hardware]
gpu = "A100-80GB"

[method]
rank = -1

[training]
micro_batch_size = 0
optimizer = "adam"
micro_batch = 2
"""
    path = write(tmp_path, text)
    lines = problem_lines(path)
    expected = {
        "method.rank": ("must be ≥ 1", line_of(text, "rank =")),
        "training.micro_batch_size": ("must be ≥ 1", line_of(text, "micro_batch_size =")),
        "training.optimizer": ("adamw_torch", line_of(text, "optimizer =")),
        "training.micro_batch": ("did you mean 'micro_batch_size'", line_of(text, "micro_batch =")),
    }
    assert len(lines) == len(expected), lines
    for key, (fragment, number) in expected.items():
        named = lines_naming(lines, key)
        assert len(named) == 1, (key, lines)
        assert named[0].startswith(f"{path}:{number}: {key}: "), named[0]
        assert fragment in named[0], named[0]
    # the exact wording the contract quotes
    contract = f"{path}:{line_of(text, 'micro_batch_size =')}: training.micro_batch_size: must be ≥ 1"
    assert any(line.startswith(contract) for line in lines), lines
    # the rejected value is shown
    assert "'adam'" in lines_naming(lines, "training.optimizer")[0]


def test_problems_in_several_tables_and_missing_key(tmp_path):
    text = """[model]
dtype = "float8"

[hardware]
gpu = "A100-80GB"
count = 0

[data]
seq_len = -5
"""
    path = write(tmp_path, text)
    lines = problem_lines(path)
    keys = ["model.name", "model.dtype", "hardware.count", "data.seq_len"]
    assert len(lines) == len(keys), lines
    for key in keys:
        assert len(lines_naming(lines, key)) == 1, (key, lines)
    assert "missing" in lines_naming(lines, "model.name")[0]
    assert lines_naming(lines, "data.seq_len")[0].startswith(f"{path}:{line_of(text, 'seq_len')}: ")


# --- wrong types and values --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "extra, key, marker",
    [
        ('\n[data]\nseq_len = "long"\n', "data.seq_len", "seq_len"),
        ('\n[method]\nname = "lorax"\n', "method.name", 'name = "lorax"'),
        ("\n[method]\ntarget_modules = 5\n", "method.target_modules", "target_modules"),
        ('\n[method]\ntarget_modules = "all"\n', "method.target_modules", "target_modules"),
        ('\n[method]\ntarget_modules = ["q_proj", 5]\n', "method.target_modules", "target_modules"),
        ("\n[training]\ngradient_checkpointing = 3\n", "training.gradient_checkpointing", "gradient_checkpointing"),
        ("\n[method]\ndropout = 1.5\n", "method.dropout", "dropout"),
        ("\n[method]\nrank = 8.5\n", "method.rank", "rank"),
        ('\n[training]\nattention = "flash"\n', "training.attention", "attention"),
    ],
    ids=["seq_len-string", "method-name", "target_modules-int", "target_modules-other-string",
         "target_modules-list-with-int", "bool-as-int", "dropout-too-big", "rank-float", "attention"],
)
def test_wrong_value_gives_exactly_one_line_naming_the_key(tmp_path, extra, key, marker):
    text = MINIMAL + extra
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, f"one key, one line; got {lines}"
    assert lines[0].startswith(f"{path}:{line_of(text, marker)}: {key}: "), lines[0]


def test_method_name_lists_the_allowed_methods(tmp_path):
    path = write(tmp_path, MINIMAL + '\n[method]\nname = "lorax"\n')
    (line,) = problem_lines(path)
    for name in ("auto", "full", "lora", "qlora", "dora", "qdora"):
        assert f"'{name}'" in line
    assert "'lorax'" in line


def test_boolean_is_not_an_integer(tmp_path):
    # TOML is typed: `micro_batch_size = true` is a mistake, not a batch of 1.
    path = write(tmp_path, MINIMAL + "\n[training]\nmicro_batch_size = true\n")
    lines = problem_lines(path)
    assert len(lines_naming(lines, "training.micro_batch_size")) == 1, lines


def test_table_given_as_a_string_names_the_key_in_user_terms(tmp_path):
    text = 'model = "gpt2"\n\n[hardware]\ngpu = "A100-80GB"\n'
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:1: model: "), lines[0]
    assert "modelspec" not in lines[0].lower(), f"internal class name leaks into the message: {lines[0]}"


def test_empty_model_name(tmp_path):
    text = '[model]\nname = ""\n\n[hardware]\ngpu = "A100-80GB"\n'
    path = write(tmp_path, text)
    (line,) = problem_lines(path)
    assert line.startswith(f"{path}:2: model.name: ")
    assert "empty" in line


# --- TOML syntax -------------------------------------------------------------------------------------

def test_toml_syntax_error_has_line_and_column(tmp_path):
    text = '[model]\nname = "gpt2"\nfoo = = 3\n\n[hardware]\ngpu = "a100"\n'
    path = write(tmp_path, text)
    lines = problem_lines(path)
    assert len(lines) == 1
    bad_line = 3
    bad_col = text.splitlines()[bad_line - 1].index("= 3") + 1  # the second '=', 1-based
    assert f"{path}:{bad_line}:{bad_col}:" in lines[0], lines[0]
    assert "TOML syntax error" in lines[0]
    assert "Traceback" not in lines[0]


def test_toml_duplicate_key_is_a_syntax_error_with_its_line(tmp_path):
    text = '[model]\nname = "gpt2"\nname = "gpt2-xl"\n'
    path = write(tmp_path, text)
    (line,) = problem_lines(path)
    assert re.search(rf"^{re.escape(str(path))}:3:\d+: TOML syntax error", line), line


def test_toml_error_at_end_of_document_still_has_a_position(tmp_path):
    # An unclosed array runs to the end of the file; tomllib says "(at end of document)", not a line.
    text = '[model]\nname = "gpt2"\n\n[method]\ntarget_modules = ["q_proj",\n'
    path = write(tmp_path, text)
    (line,) = problem_lines(path)
    assert "TOML syntax error" in line
    assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: ", line), f"no line:column in {line!r}"


# --- the file itself ---------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    lines = problem_lines(path)
    assert len(lines) == 1
    assert str(path) in lines[0] and "not found" in lines[0]


def test_directory_as_spec(tmp_path):
    lines = problem_lines(tmp_path)
    assert len(lines) == 1
    assert str(tmp_path) in lines[0] and "directory" in lines[0]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nname = "café"\n'.encode("latin-1"))
    lines = problem_lines(path)
    assert len(lines) == 1
    assert str(path) in lines[0] and "UTF-8" in lines[0]


def test_empty_file_reports_model_and_hardware_missing(tmp_path):
    path = write(tmp_path, "")
    lines = problem_lines(path)
    assert len(lines) == 2, lines
    for key in ("model", "hardware"):
        (named,) = lines_naming(lines, key)
        assert named.startswith(f"{path}: ") and "missing" in named


def test_comment_only_file_reports_both_missing_tables(tmp_path):
    path = write(tmp_path, "# nothing here yet\n")
    lines = problem_lines(path)
    assert {k for k in ("model", "hardware") if lines_naming(lines, k)} == {"model", "hardware"}
    assert len(lines) == 2
