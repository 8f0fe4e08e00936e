"""The command line on wrong input: exit 2, one line per problem naming the key or file, never a traceback.

Every command runs in a subprocess with HF_HUB_OFFLINE=1 and a temporary HOME / HF_HUB_CACHE, so no real
Hugging Face cache is read and nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llama3-8b-lora-a100.toml"
METHODS = ("full", "lora", "qlora", "dora", "qdora")
CONTRACT_COMPONENTS = ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "transient", "overhead")


@pytest.fixture
def cli(tmp_path):
    home = tmp_path / "home"
    (home / "hub").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PEFTPLAN_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HOME=str(home), HF_HOME=str(home / "hf"),
               HF_HUB_CACHE=str(home / "hub"))

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peftplan", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=cwd or tmp_path, timeout=60)

    return run


@pytest.fixture
def spec(tmp_path):
    def write(model: str = "gpt2", gpu: str = "A100-80GB", extra: str = "", hardware: str = "") -> Path:
        path = tmp_path / "spec.toml"
        path.write_text(f'[model]\nname = "{model}"\n\n[hardware]\ngpu = "{gpu}"\n{hardware}\n{extra}',
                        encoding="utf-8")
        return path

    return write


def assert_input_error(proc: subprocess.CompletedProcess, *needles: str) -> list[str]:
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"
    return lines


# --- model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "estimate"])
@pytest.mark.parametrize("typo", ["llama-3.1-8c", "meta-llama/Llama-3.1-8c"])
def test_unknown_model_suggests_catalog_names(cli, spec, command, typo):
    proc = cli(command, spec(model=typo))
    lines = assert_input_error(proc, "model.name", typo, "meta-llama/Llama-3.1-8B", "config.json")
    assert len(lines) == 1, lines


def test_catalog_name_is_case_insensitive_not_a_typo(cli, spec):
    proc = cli("validate", spec(model="meta-llama/Llama-3.1-8b"))
    assert proc.returncode == 0, proc.stderr
    assert "meta-llama/Llama-3.1-8B" in proc.stdout


def test_unknown_model_and_unknown_gpu_reported_together(cli, spec):
    proc = cli("validate", spec(model="no-such-model-xyz", gpu="Quantum GPU 9000"))
    lines = assert_input_error(proc, "model.name", "hardware.gpu")
    assert len(lines) == 2, lines


def test_local_model_dir_relative_to_the_spec(cli, tmp_path):
    model_dir = tmp_path / "specs" / "tiny"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "tie_word_embeddings": False}), encoding="utf-8")
    path = tmp_path / "specs" / "spec.toml"
    path.write_text('[model]\nname = "tiny"\n[hardware]\ngpu = "cpu"\nmemory_gib = 8\n[data]\nseq_len = 128\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("estimate", path, "--json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["source"] == "config.json"


# --- hardware -----------------------------------------------------------------------------------------

def test_unknown_gpu_without_memory_lists_closest(cli, spec):
    proc = cli("validate", spec(gpu="a1000"))
    lines = assert_input_error(proc, "hardware.gpu", "a1000", "A100-80GB", "memory_gib")
    assert len(lines) == 1, lines


def test_unknown_gpu_with_memory_is_accepted(cli, spec):
    proc = cli("estimate", spec(gpu="Fancy GPU 9000", hardware="memory_gib = 40"), "--json")
    assert proc.returncode == 0, proc.stderr
    hw = json.loads(proc.stdout)["hardware"]
    assert hw["name"] == "Fancy GPU 9000"
    assert hw["memory_bytes"] == 40 * 2**30


@pytest.mark.parametrize(
    "hardware, extra, key",
    [
        ("memory_gib = 0", "", "hardware.memory_gib"),
        ("memory_gib = -8", "", "hardware.memory_gib"),
        ("count = 0", "", "hardware.count"),
        ("nodes = -1", "", "hardware.nodes"),
        ("", "[training]\nmicro_batch_size = 0\n", "training.micro_batch_size"),
        ("", "[training]\ngradient_accumulation_steps = -2\n", "training.gradient_accumulation_steps"),
        ("", "[data]\nseq_len = 0\n", "data.seq_len"),
        ("", "[data]\nnum_examples = -10\n", "data.num_examples"),
        ("", "[method]\nrank = 0\n", "method.rank"),
        ("", "[method]\nalpha = -1\n", "method.alpha"),
        ("", "[training]\nlearning_rate = 0\n", "training.learning_rate"),
    ],
)
def test_zero_or_negative_sizes(cli, spec, hardware, extra, key):
    path = spec(hardware=hardware, extra=extra)
    proc = cli("estimate", path)
    lines = assert_input_error(proc, key, str(path))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:"), lines[0]


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_memory_is_bad_input(cli, spec, value):
    proc = cli("estimate", spec(hardware=f"memory_gib = {value}"))
    assert_input_error(proc, "hardware.memory_gib")


# --- checks against the model ------------------------------------------------------------------------

def test_rank_larger_than_smallest_target_dimension(cli, spec):
    # Qwen2.5-0.5B: k_proj/v_proj are 896 -> 2 kv heads x 64 = 128 wide, the narrowest targeted module.
    proc = cli("validate", spec(model="Qwen/Qwen2.5-0.5B", extra="[method]\nrank = 5000\n"))
    lines = assert_input_error(proc, "method.rank", "5000", "128")
    assert len(lines) == 1, lines


def test_rank_at_the_smallest_dimension_is_fine(cli, spec):
    proc = cli("validate", spec(model="Qwen/Qwen2.5-0.5B", extra="[method]\nrank = 128\n"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("validate", spec(model="Qwen/Qwen2.5-0.5B", extra="[method]\nrank = 129\n"))
    assert_input_error(proc, "method.rank")


def test_rank_checked_against_targeted_modules_only(cli, spec):
    # Targeting only q_proj (896 x 896), a rank of 200 fits although k_proj is 128 wide.
    proc = cli("validate", spec(model="Qwen/Qwen2.5-0.5B",
                                extra='[method]\nrank = 200\ntarget_modules = ["q_proj"]\n'))
    assert proc.returncode == 0, proc.stderr


def test_unknown_target_module_lists_real_modules(cli, spec):
    proc = cli("validate", spec(model="Qwen/Qwen2.5-0.5B",
                                extra='[method]\ntarget_modules = ["q_proj", "nonexistent"]\n'))
    lines = assert_input_error(proc, "method.target_modules", "nonexistent")
    assert len(lines) == 1, lines
    for module in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert module in lines[0]


def test_empty_target_module_list_is_bad_input(cli, spec):
    # An empty list trains nothing: LoRA with zero trainable parameters is not a plan.
    proc = cli("estimate", spec(model="Qwen/Qwen2.5-0.5B", extra="[method]\ntarget_modules = []\n"))
    assert_input_error(proc, "method.target_modules")


def test_model_dependent_errors_name_the_spec_file(cli, spec):
    # Loading errors are `spec.toml:LINE: key: ...`, and so is the seq_len warning; errors found against the
    # model should say which file they come from too.
    path = spec(model="Qwen/Qwen2.5-0.5B", extra="[method]\nrank = 100000\n")
    lines = assert_input_error(cli("validate", path), "method.rank")
    assert lines[0].startswith(f"{path}:"), lines[0]


def test_seq_len_beyond_model_maximum_is_a_warning(cli, spec):
    path = spec(model="gpt2", extra="[data]\nseq_len = 4096\n")
    proc = cli("validate", path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "data.seq_len" in line]
    assert len(warnings) == 1, proc.stderr
    assert "warning" in warnings[0] and "1024" in warnings[0] and "4096" in warnings[0]
    assert "ok" in proc.stdout


def test_seq_len_at_model_maximum_gives_no_warning(cli, spec):
    proc = cli("validate", spec(model="gpt2", extra="[data]\nseq_len = 1024\n"))
    assert proc.returncode == 0, proc.stderr
    assert "data.seq_len" not in proc.stderr


# --- the file -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "estimate"])
def test_missing_spec_file(cli, tmp_path, command):
    path = tmp_path / "does-not-exist.toml"
    lines = assert_input_error(cli(command, path), str(path))
    assert len(lines) == 1 and "not found" in lines[0]


def test_directory_as_spec(cli, tmp_path):
    lines = assert_input_error(cli("validate", tmp_path), str(tmp_path), "directory")
    assert len(lines) == 1


def test_malformed_toml(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "gpt2"\n[hardware\ngpu = "a100"\n', encoding="utf-8")
    lines = assert_input_error(cli("estimate", path), "TOML syntax error", f"{path}:3:")
    assert len(lines) == 1


def test_non_utf8_spec(cli, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nname = "Ünïcode"\n'.encode("latin-1"))
    lines = assert_input_error(cli("validate", path), str(path), "UTF-8")
    assert len(lines) == 1


def test_several_problems_all_reported_one_per_line(cli, spec):
    path = spec(extra='[method]\nrank = -1\n\n[training]\nmicro_batch_size = 0\noptimizer = "adam"\nmicro_batch = 2\n')
    lines = assert_input_error(cli("validate", path), "method.rank", "training.micro_batch_size",
                               "training.optimizer", "training.micro_batch:", "did you mean 'micro_batch_size'")
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}:") for line in lines), lines


# --- estimate --json on a valid spec ------------------------------------------------------------------

def test_estimate_json_matches_contract(cli):
    proc = cli("estimate", EXAMPLE, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("model", "hardware", "geometry", "methods"):
        assert key in out, key
    assert {"name", "parameters", "source"} <= set(out["model"])
    assert out["model"]["name"] == "meta-llama/Llama-3.1-8B"
    assert out["model"]["source"] == "catalog"
    assert type(out["model"]["parameters"]) is int
    assert {"name", "memory_bytes", "count", "nodes"} <= set(out["hardware"])
    assert out["hardware"]["name"] == "A100-80GB"
    assert out["hardware"]["memory_bytes"] == 80 * 2**30
    assert (out["hardware"]["count"], out["hardware"]["nodes"]) == (1, 1)
    # the example asks for batch 4 x 2048 with gradient checkpointing
    assert {k: out["geometry"][k] for k in ("micro_batch_size", "seq_len", "gradient_checkpointing")} == {
        "micro_batch_size": 4, "seq_len": 2048, "gradient_checkpointing": True}

    assert set(out["methods"]) == set(METHODS)
    for name, m in out["methods"].items():
        for key in ("peak_allocated_bytes", "device_total_bytes", "fits", "trainable_parameters", "components"):
            assert key in m, (name, key)
        assert type(m["fits"]) is bool, name
        comps = m["components"]
        assert set(CONTRACT_COMPONENTS) <= set(comps), (name, sorted(comps))
        for key, value in [("peak_allocated_bytes", m["peak_allocated_bytes"]),
                           ("device_total_bytes", m["device_total_bytes"]),
                           ("trainable_parameters", m["trainable_parameters"]), *comps.items()]:
            assert type(value) is int and value >= 0, (name, key, value)
        assert m["peak_allocated_bytes"] == sum(v for k, v in comps.items() if k != "overhead"), name
        assert m["device_total_bytes"] == sum(comps.values()), name
        assert m["peak_allocated_bytes"] > 0 and comps["weights"] > 0
        if m["fits"]:
            assert m["device_total_bytes"] <= out["hardware"]["memory_bytes"], name

    # independent numbers: full trains every parameter; LoRA r=16 on all linear layers of Llama 3.1 8B trains
    # 32 layers x 16 x (q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up/down 3 x (4096+14336)).
    assert out["methods"]["full"]["trainable_parameters"] == out["model"]["parameters"]
    lora = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    assert lora == 41_943_040
    assert out["methods"]["lora"]["trainable_parameters"] == lora
    assert out["methods"]["qlora"]["trainable_parameters"] == lora
    assert out["methods"]["dora"]["trainable_parameters"] > lora  # plus a magnitude vector per module
    # quantized base weights are smaller than 16-bit ones
    assert out["methods"]["qlora"]["components"]["weights"] < out["methods"]["lora"]["components"]["weights"]
    assert out["methods"]["lora"]["components"]["weights"] == 2 * out["model"]["parameters"]


# --- planning never imports the training stack --------------------------------------------------------

NO_TORCH_ESTIMATE = """
import sys, io, contextlib, json
sys.argv = ['peftplan', 'estimate', EX, '--json']
from peftplan.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(sys.argv[1:])
assert rc == 0, rc
assert set(json.loads(buf.getvalue())['methods']) == {'full', 'lora', 'qlora', 'dora', 'qdora'}
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate'))
assert not heavy, heavy
print('clean')
"""

NO_TORCH_IMPORT = """
import sys
import peftplan.planner
import peftplan.schemas
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate'))
assert not heavy, heavy
print('clean')
"""


def _run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PEFTPLAN_"))}
    env.update(HF_HUB_OFFLINE="1", HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)


def test_estimate_never_imports_torch(tmp_path):
    proc = _run_python(f"EX = {str(EXAMPLE)!r}\n" + NO_TORCH_ESTIMATE, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_importing_planner_never_imports_torch(tmp_path):
    proc = _run_python(NO_TORCH_IMPORT, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_the_no_torch_check_can_fail(tmp_path):
    # The same check must notice a heavy import: a stand-in `torch` package imported next to the planner.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    proc = _run_python(NO_TORCH_IMPORT.replace("import peftplan.schemas", "import peftplan.schemas\nimport torch"),
                       tmp_path)
    assert proc.returncode != 0
    assert "torch" in proc.stderr


def test_packed_micro_batches_under_flash_attention_are_a_spec_error(tmp_path, capsys):
    """No geometry exists for them (planner/choose.py's _geometries): once an internal error (min of nothing)."""
    from peftplan.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('[model]\nname = "meta-llama/Meta-Llama-3-8B"\n[data]\nnum_examples = 1000\npacking = true\n'
                    '[hardware]\ngpu = "A100-80GB"\n'
                    '[training]\nmicro_batch_size = 2\nattention = "flash_attention_2"\n')
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "training.micro_batch_size" in err and "s.toml:9" in err and "internal error" not in err
