"""`peftplan generate` in the user's folders: only files peftplan wrote are ever replaced or removed.

Each test builds the situation in a temporary folder (stand-ins for `/` and `$HOME`; nothing outside tmp is ever
a target), runs the CLI in-process (so that file-system calls can be intercepted to stage races) or as a
subprocess (for the working directory), and compares the user's files byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import OFFLINE_ENV, RunLockHolder, cpu_spec

from peftplan.cli import main
from peftplan.planner import writer

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "vocab_size": 642, "tie_word_embeddings": False,
}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(d: Path) -> dict[str, bytes | str]:
    """Every entry under d: file contents, or the target of a link (links are not followed)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture
def ws(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "data.jsonl").write_text('{"text": "hello world"}\n' * 8)
    (tmp_path / "spec.toml").write_text(cpu_spec(model=tmp_path / "model", num_examples=32, learning_rate=1e-3))
    (tmp_path / "spec-b.toml").write_text(cpu_spec(model=tmp_path / "model", num_examples=32, learning_rate=5e-4))
    return tmp_path


def user_folder(d: Path) -> dict:
    """A folder of the user's that happens to hold files named like generated ones, a nested folder, and a link
    to a folder elsewhere."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("README.md", "requirements.txt", ".gitignore", "train.py"):
        (d / name).write_text(f"the user's own {name}\n")
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("a")
    elsewhere = d.parent / f"{d.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("precious")
    (d / "peftplan_runtime").symlink_to(elsewhere, target_is_directory=True)
    return snapshot(d) | {"../elsewhere": snapshot(elsewhere)}


def assert_untouched(d: Path, before: dict) -> None:
    elsewhere = d.parent / f"{d.name}-elsewhere"
    assert snapshot(d) | {"../elsewhere": snapshot(elsewhere)} == before


# ------------------------------------------------------------------ 1, 2: --force on a folder that is not ours
def test_force_on_a_users_folder_is_refused_and_nothing_changes(ws, capsys):
    target = ws / "mine"
    before = user_folder(target)
    rc, out, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", target, "--force")
    assert rc == 2, err
    assert "not a peftplan project" in err and str(target) in err
    assert_untouched(target, before)


def test_force_never_lists_a_large_folder(ws, capsys, monkeypatch):
    """`-o / --force` and `-o ~ --force`: stand-ins with many entries; the writer may look at one entry to see
    the folder is not empty, and must not walk, glob or list the rest."""
    for name in ("root-standin", "home-standin"):
        big = ws / name
        big.mkdir()
        for i in range(50):
            (big / f"f{i}").write_text(str(i))
    seen = []
    real_scandir = os.scandir

    class Counting:
        def __init__(self, path):
            self.it = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            for entry in self.it:
                seen.append(entry.name)
                yield entry

    monkeypatch.setattr(os, "scandir", Counting)
    monkeypatch.setattr(os, "walk", lambda *a, **k: (_ for _ in ()).throw(AssertionError("os.walk called")))
    monkeypatch.setattr(Path, "glob", lambda *a, **k: (_ for _ in ()).throw(AssertionError("glob called")))
    monkeypatch.setattr(Path, "rglob", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rglob called")))
    monkeypatch.setenv("HOME", str(ws / "home-standin"))
    for target in (ws / "root-standin", "~"):
        seen.clear()
        rc, _, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", target, "--force")
        assert rc == 2 and "not a peftplan project" in err, err
        assert len(seen) <= 2, seen
    assert sorted(p.name for p in (ws / "root-standin").iterdir()) == sorted(f"f{i}" for i in range(50))


def test_edited_generated_file_is_not_overwritten(ws, capsys):
    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    (out / "README.md").write_text("my edits\n")
    (out / "my_notes.txt").write_text("mine")
    before = snapshot(out)
    rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
    assert rc == 2 and "README.md was changed since peftplan wrote it" in err, err
    assert snapshot(out) == before


def test_a_malformed_line_in_a_hashed_manifest_protects_the_users_edits(ws, capsys):
    """One bad line once switched the whole manifest to the legacy (paths only, any content ours) reading, so an
    edited README.md was overwritten by generate --force."""
    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    (out / "README.md").write_text("my edits\n")
    with open(out / writer.MANIFEST, "a") as fh:
        fh.write("not a digest line\n")
    before = snapshot(out)
    rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
    assert rc == 2 and "not '<sha256>  <path>'" in err, err
    assert snapshot(out) == before


def test_force_regenerates_ours_and_keeps_the_users(ws, capsys):
    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "outputs").mkdir()
    (out / "outputs" / "metrics.jsonl").write_text('{"step": 1}\n')
    rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
    assert rc == 0, err
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "outputs" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert "learning_rate = 0.0005" in (out / "plan.toml").read_text()
    manifest = (out / writer.MANIFEST).read_text().splitlines()
    assert manifest[0] == writer.COMPLETE
    listed = {line.split("  ", 1)[1] for line in manifest[1:]}
    assert "my_notes.txt" not in listed and "plan.toml" in listed
    assert not [p for p in out.iterdir() if p.name.startswith(writer.STAGING_PREFIX)]


def test_a_link_in_place_of_a_generated_folder_is_refused(ws, capsys):
    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    runtime = out / "peftplan_runtime"
    (ws / "elsewhere").mkdir()
    (ws / "elsewhere" / "precious.txt").write_text("precious")
    for f in runtime.iterdir():
        f.unlink()
    runtime.rmdir()
    runtime.symlink_to(ws / "elsewhere", target_is_directory=True)
    rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
    assert rc == 2 and "peftplan_runtime" in err, err
    assert runtime.is_symlink() and snapshot(ws / "elsewhere") == {"precious.txt": b"precious"}


# ------------------------------------------------------------------------ 3: races, claimed atomically
def test_folder_created_between_check_and_write_is_not_taken(ws, capsys, monkeypatch):
    out = ws / "proj"
    real_mkdir = os.mkdir

    def racing_mkdir(path, *a, **k):
        if Path(path) == out:  # someone else creates the folder, with a file, just before we claim it
            real_mkdir(path)
            (out / "theirs.txt").write_text("theirs")
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    rc, _, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", out)
    assert rc == 2, err
    assert snapshot(out) == {"theirs.txt": b"theirs"}


def test_file_appearing_at_a_generated_name_midway_is_kept(ws, capsys, monkeypatch):
    out = ws / "proj"
    real_link = os.link

    def racing_link(src, dst, *a, **k):
        if Path(dst) == out / "train.py":
            Path(dst).write_text("theirs")
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", racing_link)
    rc, _, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", out)
    assert rc != 0, err
    assert (out / "train.py").read_text() == "theirs"
    assert snapshot(out) == {"train.py": b"theirs"}  # everything of ours was taken back


def test_edit_between_check_and_replace_is_detected(ws, capsys, monkeypatch):
    """The regenerated file is renamed aside and only then compared with what peftplan wrote: an edit made
    after the up-front check is found, and the edited file is put back."""
    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    real_rename = os.rename

    def editing_rename(src, dst, *a, **k):
        if Path(src) == out / "README.md":
            Path(src).write_text("edited at the last moment")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", editing_rename)
    rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
    assert rc == 2 and "README.md" in err, err
    assert (out / "README.md").read_text() == "edited at the last moment"
    assert "learning_rate = 0.001" in (out / "plan.toml").read_text()  # the old project, whole
    assert not [p for p in out.iterdir() if p.name.startswith(writer.STAGING_PREFIX)]


def test_concurrent_generate_is_refused(ws, capsys):
    out = ws / "proj"
    out.mkdir()
    fd = writer._lock(out, create=True)  # another generate holds the folder
    try:
        rc, _, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", out)
    finally:
        os.close(fd)
    assert rc == 2 and "another peftplan generate" in err, err
    assert sorted(p.name for p in out.iterdir()) == [writer.LOCK]


# ------------------------------------------------------- 4, 10, 12: odd names, the working directory, globs
def test_non_utf8_folder_name_is_a_clear_error(tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (folder / "data.jsonl").write_text('{"text": "hello"}\n')
    (folder / "spec.toml").write_text(cpu_spec(model="model", num_examples=8))
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", "spec.toml", "-o", str(tmp_path / "out")],
                          cwd=folder, capture_output=True, text=True, env=OFFLINE_ENV)
    assert proc.returncode == 2, proc.stderr
    assert "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == [os.fsdecode(b"caf\xe9")]


def test_output_is_the_empty_working_directory(ws):
    here = ws / "empty"
    here.mkdir()
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(ws / "spec.toml"), "-o", "."],
                          cwd=here, capture_output=True, text=True, env=OFFLINE_ENV)
    assert proc.returncode == 0, proc.stderr
    assert (here / "plan.toml").is_file() and (here / "train.py").is_file()
    assert "wrote" in proc.stdout and str(here) in proc.stdout


def test_glob_characters_in_the_output_name(ws, capsys):
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", ws / "pa")[0] == 0
    other = snapshot(ws / "pa")
    for name in ("p?", "p*", "p[a]"):
        rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", ws / name)
        assert rc == 0, err
        rc, _, err = run_cli(capsys, "generate", ws / "spec.toml", "-o", ws / name, "--force")
        assert rc == 0, err
        assert "learning_rate = 0.001" in (ws / name / "plan.toml").read_text()
    assert snapshot(ws / "pa") == other


def test_generate_refuses_while_a_run_holds_the_project(ws, capsys):
    from peftplan.runtime.lock import hold_run_lock

    out = ws / "proj"
    assert run_cli(capsys, "generate", ws / "spec.toml", "-o", out)[0] == 0
    with RunLockHolder(out):
        rc, _, err = run_cli(capsys, "generate", ws / "spec-b.toml", "-o", out, "--force")
        assert rc == 2 and "training run is in progress" in err, err
        with pytest.raises(Exception, match="another run"):
            hold_run_lock(out / "outputs")  # a second run is refused too
    hold_run_lock(out / "outputs")  # the lock died with its process: nothing stale is left
