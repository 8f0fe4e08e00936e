"""Abuse, part 2: hostile strings in every field that reaches a generated project, odd output
paths, and models that want to run code (custom `auto_map` code, pickled weights).

Injection tests compare a project generated from hostile strings with a benign twin; the tests that load
models start the generated project's `train.py` in subprocesses (marked slow).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")


from abuse_support import (  # helpers shared by the abuse tests
    SUBPROCESS_ENV_EXTRA,
    TINY_CONFIG,
    check_cli,
    cli,
    offline_empty_hf_cache,  # noqa: F401 - an autouse fixture: offline, empty HF cache
    write_spec,
)

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
    assert _command_words((hostile["out"] / "run.sh").read_text()) == \
        _command_words((benign["out"] / "run.sh").read_text())
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
    assert [line.startswith("```") for line in hr] == [line.startswith("```") for line in br]  # fences where they were
    assert [line.startswith("|") for line in hr] == [line.startswith("|") for line in br]
    assert [line.startswith("#") for line in hr] == [line.startswith("#") for line in br]  # no injected heading
    for h, b in zip(hr, br, strict=True):
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
        assert not any(re.search(r"(?<!\\)" + re.escape(tag), line) for line in prose), tag


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
        line = next(line for line in w["stdout"].splitlines() if line.startswith("next: "))
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
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith(str(path)) for line in lines), err
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
    return next(line for line in stdout.splitlines() if line.startswith("wrote "))


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

