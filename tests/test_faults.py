"""Fault injection: unwritable and full disks, generation killed midway, corrupt checkpoints on resume, a
loss that turns NaN.

`peftplan generate` runs in subprocesses (so that resource limits and SIGKILL hit it, not pytest); the
training tests build a tiny model offline and run the generated project's train.py (marked slow; the runs
that do not depend on each other are started together).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from support import OFFLINE_ENV, cpu_spec

ROOT = Path(__file__).resolve().parents[1]
ENV = {**OFFLINE_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("PEFTPLAN_DEBUG", None)
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "vocab_size": 642, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def generate(spec: Path, out: Path, *extra: str, preexec=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(out), *extra],
                          capture_output=True, text=True, env=ENV, preexec_fn=preexec, timeout=timeout)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def stray(*dirs: Path) -> list[str]:
    """Leftovers of an unfinished generate: staging folders (the lock and manifest are the project's own)."""
    return [str(p) for d in dirs if d.is_dir() for p in d.iterdir() if ".peftplan-staging-" in p.name]


def assert_clear_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    shown = f"exit {proc.returncode}\nstderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
    assert proc.returncode in (1, 2), shown
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown  # one clear line
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{shown}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A spec whose model is a bare config.json (generate reads nothing else) and a tiny data file."""
    d = tmp_path_factory.mktemp("faults")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (d / "data.jsonl").write_text('{"text": "hello world"}\n' * 8)
    (d / "spec.toml").write_text(cpu_spec(model=d / "model", num_examples=32, rank=4, alpha=8, learning_rate=1e-3,
                                           save_steps=2, gradient_checkpointing=False))
    (d / "spec-b.toml").write_text(cpu_spec(model=d / "model", num_examples=32, rank=4, alpha=8, learning_rate=5e-4,
                                             save_steps=2, gradient_checkpointing=False))
    ref = d / "reference"
    proc = generate(d / "spec.toml", ref)
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture(scope="module")
def reference(ws) -> dict[str, bytes]:
    return snapshot(ws / "reference")


def assert_complete(project: Path, reference: dict[str, bytes]) -> None:
    """Every file of a normal generation is there, whole: same names, each one parses (contents are not
    compared byte for byte: README/plan.toml carry the time, and the runtime may be edited meanwhile)."""
    import ast

    files = snapshot(project)
    assert set(files) == set(reference), f"missing {set(reference) - set(files)}, extra {set(files) - set(reference)}"
    for rel, data in files.items():
        assert data or not reference[rel], f"{rel} is empty"
        if rel.endswith(".py"):
            ast.parse(data.decode())
    tomllib.loads(files["plan.toml"].decode())
    assert os.access(project / "run.sh", os.X_OK)


# ------------------------------------------------------------------------- 1. output not writable
def test_output_parent_is_a_regular_file(ws, tmp_path):
    """Portable for root too (chmod does not stop root): the output's parent is a regular file, so no
    directory can be made there."""
    blocker = tmp_path / "blocker"
    blocker.write_text("the user's file\n")
    proc = generate(ws / "spec.toml", blocker / "proj")
    assert_clear_failure(proc, str(blocker))
    assert blocker.read_text() == "the user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})")


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no write can land in. As a normal user: chmod 0o555. As root (chmod does not stop root):
    a tmpfs remounted read-only (EROFS), skipped only where mounting is not permitted."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()

        def make_ro():
            d.chmod(0o555)
        yield d, make_ro
        d.chmod(0o755)
        return
    _mount_tmpfs(d, "size=2m")

    def make_ro():
        proc = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    try:
        yield d, make_ro
    finally:
        _umount(d)


def test_output_in_read_only_folder(ws, read_only_dir):
    d, make_ro = read_only_dir
    make_ro()
    proc = generate(ws / "spec.toml", d / "proj")
    assert_clear_failure(proc, str(d))
    assert list(d.iterdir()) == []


def test_force_into_read_only_project_leaves_it_untouched(ws, read_only_dir):
    d, make_ro = read_only_dir
    proj = d / "proj"
    assert generate(ws / "spec.toml", proj).returncode == 0
    (proj / "my_notes.txt").write_text("mine")
    before = snapshot(proj)
    make_ro()
    proc = generate(ws / "spec-b.toml", proj, "--force")
    assert_clear_failure(proc)
    assert snapshot(proj) == before
    assert sorted(p.name for p in d.iterdir()) == ["proj"]


# ------------------------------------------------------------------------------------ 2. disk full
def _fsize_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited across exec: the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


LIMIT = 4096


def test_file_size_limit_fails_cleanly(ws, tmp_path, reference):
    sizes = sorted(len(v) for v in reference.values())
    assert sizes[0] < LIMIT < sizes[-1]  # some files get written, then one fails midway
    out = tmp_path / "proj"
    proc = generate(ws / "spec.toml", out, preexec=_fsize_limit(LIMIT))
    assert_clear_failure(proc, str(out))
    assert not out.exists()
    assert not stray(tmp_path)


def test_file_size_limit_with_force_keeps_existing_project(ws, tmp_path):
    out = tmp_path / "proj"
    assert generate(ws / "spec.toml", out).returncode == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "outputs").mkdir()
    (out / "outputs" / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(out)
    proc = generate(ws / "spec-b.toml", out, "--force", preexec=_fsize_limit(LIMIT))
    assert_clear_failure(proc, str(out))
    assert snapshot(out) == before
    assert not stray(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    _mount_tmpfs(d, "size=1m")
    try:
        yield d
    finally:
        _umount(d)


def _fill(d: Path, leave: int) -> Path:
    filler = d / "filler.bin"
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_full_tmpfs(ws, small_tmpfs, reference):
    d = small_tmpfs
    proj = d / "proj"
    assert generate(ws / "spec.toml", proj).returncode == 0  # fits while the disk has room
    (proj / "my_notes.txt").write_text("mine")
    before = snapshot(proj)
    filler = _fill(d, leave=16 * 1024)
    # regenerate over the existing project with --force: fails, the project and the user's file stay as they were
    proc = generate(ws / "spec-b.toml", proj, "--force")
    assert_clear_failure(proc, str(proj))
    assert snapshot(proj) == before
    assert not stray(d)
    # a fresh project on the full disk: fails, nothing left behind
    proc = generate(ws / "spec.toml", d / "new")
    assert_clear_failure(proc, str(d / "new"))
    assert not (d / "new").exists() and not stray(d)
    # and once there is room again it works
    filler.unlink()
    shutil.rmtree(proj)
    assert generate(ws / "spec.toml", d / "new").returncode == 0
    assert_complete(d / "new", reference)


# ------------------------------------------------------------------------- 3. generation killed
WRAPPER = r'''
import os, pathlib, sys, time
N, PHASE = int(os.environ["KILL_AFTER"]), os.environ["KILL_PHASE"]
count = 0

def hit():
    global count
    count += 1
    if count == N:
        print("READY", flush=True)
        time.sleep(600)

if PHASE == "write":  # a file written into the staging folder
    orig_write = pathlib.Path.write_bytes
    def write_bytes(self, *a, **k):
        r = orig_write(self, *a, **k)
        if ".peftplan-staging-" in str(self):
            hit()
        return r
    pathlib.Path.write_bytes = write_bytes
else:  # "link": a file placed into the project
    orig = os.link
    def link(src, dst, *a, **k):
        r = orig(src, dst, *a, **k)
        if ".peftplan-staging-" in str(src):
            hit()
        return r
    os.link = link
from peftplan.cli import main
sys.exit(main(sys.argv[1:]))
'''


def kill_generate_at(spec: Path, out: Path, phase: str, n: int, *extra: str) -> None:
    wrapper = out.parent / "_kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**ENV, "KILL_AFTER": str(n), "KILL_PHASE": phase}
    proc = subprocess.Popen([sys.executable, str(wrapper), "generate", str(spec), "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line or line.strip() == "READY":
                break
        assert line.strip() == "READY", f"never reached {phase} #{n}: exit {proc.wait()}, {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        wrapper.unlink()


def manifest_state(project: Path) -> str:
    first = (project / ".peftplan_files").read_text().splitlines()[0]
    return first.rsplit(" ", 1)[-1]  # pending | complete


def assert_refused_by_runtime(project: Path) -> None:
    proc = subprocess.run([sys.executable, "train.py"], cwd=project, capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("phase,n", [("write", 1), ("write", -1), ("link", 1), ("link", 10)])
def test_generate_killed_midway_is_detected_and_completed(ws, tmp_path, reference, phase, n):
    # -1: after the last staged file, before anything is placed
    n = len(reference) - 2 if n == -1 else n  # staged: every file but the lock and the manifest
    out = tmp_path / "proj"
    kill_generate_at(ws / "spec.toml", out, phase, n)
    assert out.is_dir()  # claimed first, then filled
    if (out / "train.py").exists():
        assert manifest_state(out) == "pending"
        assert_refused_by_runtime(out)
    # the next generate completes it: no --force needed for an interrupted generation of peftplan's own
    proc = generate(ws / "spec.toml", out)
    assert proc.returncode == 0, proc.stderr
    assert_complete(out, reference)
    assert manifest_state(out) == "complete"
    assert not stray(tmp_path) and not stray(out)


def _generation(project: Path) -> tuple[str, str]:
    """Which spec each of the two spec-dependent files came from: (README's, plan.toml's) learning rate."""
    plan = tomllib.loads((project / "plan.toml").read_text())
    readme = re.search(r"learning rate ([0-9.e+-]+)", (project / "README.md").read_text()).group(1)
    return f"{float(readme):g}", f"{plan['training']['learning_rate']:g}"


@pytest.mark.parametrize("n", [1, 3])
def test_generate_force_killed_midway_never_runs_half_old_half_new(ws, tmp_path, reference, n):
    """--force places new files one by one (each only after checking the old one is ours). Killed midway, the
    project is marked pending: the runtime refuses to train a mix of the old plan and the new one, the user's
    own file is untouched, and the next --force completes the new project."""
    out = tmp_path / "proj"
    assert generate(ws / "spec.toml", out).returncode == 0  # learning_rate 1e-3
    (out / "my_notes.txt").write_text("mine")
    kill_generate_at(ws / "spec-b.toml", out, "link", n, "--force")  # learning_rate 5e-4
    assert (out / "my_notes.txt").read_text() == "mine"
    assert manifest_state(out) == "pending"
    assert_refused_by_runtime(out)
    proc = generate(ws / "spec-b.toml", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "my_notes.txt").read_text() == "mine"
    assert _generation(out) == ("0.0005", "0.0005")
    assert_complete(out, {**reference, "my_notes.txt": b"mine"})
    assert not stray(tmp_path) and not stray(out)


# ------------------------------------------------------------------- 4, 5. training: resume and NaN
def _start_train(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=project, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _checkpoints(project: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in (project / "outputs").glob("checkpoint-*")}


CORRUPTIONS = {
    "trainer_state_garbage": lambda c: (c / "trainer_state.json").write_text('{"global_step": 8, "log_hist'),
    "adapter_truncated": lambda c: (c / "adapter_model.safetensors").write_bytes(
        (c / "adapter_model.safetensors").read_bytes()[:10]),
}


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A tiny model; a normal run (32 examples, batch 4: 8 steps, a checkpoint every 2, the last 3 kept) and a
    run with learning rate 1e6 (a checkpoint every step) started together; then the normal run copied once
    per corruption, its newest checkpoint corrupted, and the resumes started together."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("train")
    # the quickstart's geometry: at learning rate 1e6 its gradients overflow one step before the loss does
    build_tiny_model(root / "model", family="llama", hidden_size=128, intermediate_size=256)
    write_dataset(root / "data.jsonl", "chat", 32)
    (root / "good.toml").write_text(cpu_spec(num_examples=32, rank=4, alpha=8, learning_rate=2e-3, save_steps=2,
                                              gradient_checkpointing=False))
    (root / "nan.toml").write_text(cpu_spec(num_examples=32, rank=4, alpha=8, learning_rate=1e6, save_steps=1,
                                             gradient_checkpointing=False))
    for name in ("good", "nan"):
        proc = generate(root / f"{name}.toml", root / name)
        assert proc.returncode == 0, proc.stderr
    nan_proc = _start_train(root / "nan")
    good = _finish(_start_train(root / "good"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert sorted(_checkpoints(root / "good")) == [4, 6, 8]
    resumes = {}
    for name, corrupt in CORRUPTIONS.items():
        project = root / f"resume-{name}"
        shutil.copytree(root / "good", project)
        shutil.rmtree(project / "outputs" / "final")
        corrupt(project / "outputs" / "checkpoint-8")
        resumes[name] = (project, _start_train(project, "--resume"))
    results = {name: (project, _finish(proc)) for name, (project, proc) in resumes.items()}
    return {"root": root, "resumes": results, "nan": (root / "nan", _finish(nan_proc))}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_skips_corrupt_newest_checkpoint(training, corruption):
    project, r = training["resumes"][corruption]
    shown = f"exit {r.returncode}\nstdout:\n{r.stdout[-1500:]}\nstderr:\n{r.stderr[-3000:]}"
    corrupt = project / "outputs" / "checkpoint-8"
    assert r.returncode == 0, shown
    assert "Traceback" not in r.stderr, shown
    warning = [line for line in r.stderr.splitlines() if str(corrupt) in line]
    assert warning, f"no message names {corrupt}\n{shown}"
    assert f"resuming from {project / 'outputs' / 'checkpoint-6'}" in r.stdout, shown
    state = json.loads((project / "outputs" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8  # the full run: steps 7 and 8 trained again and saved
    assert (project / "outputs" / "final" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line).get("step") for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(7) == 2 and steps.count(8) >= 2, steps  # once in the first run, again after the resume


@pytest.mark.slow
def test_nan_loss_stops_with_exit_4_and_keeps_a_good_checkpoint(training):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    project, r = training["nan"]
    shown = f"exit {r.returncode}\nstdout:\n{r.stdout[-1500:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.returncode == 4, shown
    assert "Traceback" not in r.stderr, shown
    m = re.search(r"NaN/inf at step (\d+).*last good checkpoint is (\S+?);", r.stderr)
    assert m, shown
    nan_step, good = int(m.group(1)), m.group(2)
    ckpts = _checkpoints(project)
    assert ckpts and max(ckpts) < nan_step, (sorted(ckpts), nan_step)  # nothing saved at or after the NaN step
    logged = [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]
    first_bad = min((row["step"] for row in logged if "event" not in row and any(
        isinstance(row.get(k), float) and not math.isfinite(row[k]) for k in ("loss", "grad_norm"))), default=None)
    # the guard stops at the first non-finite loss or gradient, before it is logged (metrics.jsonl
    # writes null for a non-finite number): the step the run reports is then the first bad one
    first_bad = nan_step if first_bad is None else min(first_bad, nan_step)
    assert max(ckpts) < first_bad, (f"checkpoint-{max(ckpts)} was saved after the first non-finite step "
                                    f"{first_bad} (metrics.jsonl); the run reported step {nan_step}")
    assert not (project / "outputs" / "final").exists()
    assert good == str(ckpts[max(ckpts)]), (good, sorted(ckpts))
    weights = load_file(Path(good) / "adapter_model.safetensors")
    bad = sorted(k for k, v in weights.items() if not torch.isfinite(v).all())
    assert not bad, f"the 'last good' checkpoint {good} holds non-finite weights: {bad[:3]} ..."
    base = AutoModelForCausalLM.from_pretrained(training["root"] / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, good).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    for _step, ckpt in ckpts.items():  # every checkpoint left behind is usable for --resume
        w = load_file(ckpt / "adapter_model.safetensors")
        assert all(torch.isfinite(v).all() for v in w.values()), f"{ckpt} holds non-finite weights"


@pytest.mark.slow
@pytest.mark.parametrize("edit,words", [("rank = 4", "rank = 8"), ("name = \"lora\"", "name = \"dora\"")])
def test_resume_after_regenerating_with_another_adapter_is_refused(training, tmp_path, edit, words):
    """The project regenerated with another rank (or method) and --resume: one line saying why, exit 2, before
    the model loads (not a state_dict traceback after it)."""
    project = tmp_path / "regenerated"
    shutil.copytree(training["root"] / "good", project)
    plan = project / "plan.toml"
    text = plan.read_text()
    assert edit in text
    plan.write_text(text.replace(edit, words, 1))
    r = _finish(_start_train(project, "--resume"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cannot be resumed with this plan" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
