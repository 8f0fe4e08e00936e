"""Abuse, part 3: what reaches the terminal and the shell, and the small input cases of the adversarial review.

Rich markup and ANSI escapes in a spec string are shown as text, never interpreted; paths with invisible or
reordering characters come back from the printed shell commands byte for byte; a spec that is a pipe, a device,
nested a thousand deep, starts with a BOM or holds a multi-line string gets the documented answer. The CLI runs
in-process (`peftplan.cli.main`) except where a hang is the failure (then a subprocess with a timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from abuse_support import (
    TINY_CONFIG,
    cli,
    offline_empty_hf_cache,  # noqa: F401 - an autouse fixture: offline, empty HF cache
    write_spec,
)

from peftplan.planner.project import f_sh

ESC = "\x1b"
TERMINAL_GPU = f"gpu [/] [link=http://evil.example]click[/link] [bold]b[/bold] {ESC}[31mRED{ESC}[0m \x07"


def workspace(root: Path, name: str = "ws", **over) -> Path:
    ws = root / name
    (ws / "model").mkdir(parents=True)
    (ws / "model" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (ws / "data.jsonl").write_text('{"text": "hello world"}\n' * 8)
    spec = {"model": {"name": str(ws / "model")}, "data": {"path": str(ws / "data.jsonl"), "seq_len": 64},
            "hardware": {"gpu": "cpu", "memory_gib": 8},
            "method": {"name": "lora", "rank": 4, "target_modules": ["q_proj", "v_proj"]},
            "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 1}}
    for k, v in over.items():
        spec.setdefault(k, {}).update(v)
    write_spec(ws / "spec.toml", spec)
    return ws / "spec.toml"


# ------------------------------------------------------------------------------------ 9. terminal output
@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_markup_and_escapes_in_a_gpu_name_are_shown_as_text(tmp_path, command):
    spec = workspace(tmp_path, hardware={"gpu": TERMINAL_GPU})
    rc, out, err = cli(command, spec)
    assert rc == 0, err
    shown = out + err
    assert ESC not in shown and "\x07" not in shown  # no raw control character reaches the terminal
    assert "\\x1b[31mRED\\x1b[0m" in shown  # shown escaped, so the reader sees what the spec holds
    # markup is text: rich would have consumed the tags (and made a hyperlink of [link=…])
    assert "[link=http://evil.example]click[/link]" in shown and "[bold]b[/bold]" in shown and "[/]" in shown


def test_markup_in_a_path_in_an_error_is_shown_as_text(tmp_path):
    folder = tmp_path / "[bold]x[red] [link=e]"  # a file name cannot hold "/": no closing tags here
    folder.mkdir()
    spec = workspace(folder, data={"path": str(folder / "missing [link=e]d[u].jsonl")})
    rc, out, err = cli("validate", spec)
    assert rc == 2
    assert "missing [link=e]d[u].jsonl" in err and "[bold]x[red] [link=e]" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ 11. shell quoting
HOSTILE_CHARS = ["zero\u200bwidth", "no\u00a0break", "right\u202eto-left", "line\u2028sep", "para\u2029sep",
                 "tab\there", "new\nline", "quote'and\\back", "caf\u00e9 \u6f22", "e\u0301 combining",
                 "x\u0085nel", "bom\ufeff"]


def _bash_word(word: str) -> bytes:
    proc = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True)
    assert proc.returncode == 0, (word, proc.stderr)
    return proc.stdout


@pytest.mark.parametrize("value", HOSTILE_CHARS + [os.fsdecode(b"undecodable-\xff\xfe-bytes")])
def test_f_sh_is_one_printable_line_that_bash_reads_back_byte_for_byte(value):
    word = f_sh(value)
    assert word.isprintable() and "\n" not in word, word  # what the user sees is what they paste
    # the bytes the file system holds for that name (a lone surrogate is an undecodable byte)
    assert _bash_word(word) == value.encode("utf-8", "surrogateescape"), word


def test_regenerate_line_in_plan_toml_names_the_real_paths(tmp_path):
    name = "p\u200bq\u00a0r\u202es\u2028t"
    spec = workspace(tmp_path / name)
    out = tmp_path / name / f"out{name}"
    rc, stdout, err = cli("generate", spec, "-o", out)
    assert rc == 0, err
    line = (out / "plan.toml").read_text(encoding="utf-8").splitlines()[1]
    assert line.startswith("# Regenerate rather than edit:  peftplan generate "), line
    assert line.isprintable(), line
    cmd = line.split(":  ", 1)[1]
    script = 'peftplan() { printf "%s\\0" "$@"; }\n' + cmd
    proc = subprocess.run(["bash", "-c", script], capture_output=True, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.decode("utf-8").split("\0")[:-1]
    assert words == ["generate", str(spec.resolve()), "-o", str(out), "--force"], words


# ------------------------------------------------------------------------------------ 14. smaller cases
def one_line_naming(err: str, path: Path) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(str(path)), err
    assert "Traceback" not in err
    return lines[0]


def test_spec_nested_a_thousand_deep(tmp_path):
    spec = tmp_path / "deep.toml"
    spec.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")
    rc, _, err = cli("validate", spec)
    assert rc == 2
    assert "nested too deeply" in one_line_naming(err, spec)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_a_device_as_the_spec_is_refused_without_reading(tmp_path, kind):
    if kind == "fifo":
        spec = tmp_path / "spec.toml"
        os.mkfifo(spec)  # nobody ever writes to it: opening it for reading would block forever
    else:
        spec = Path("/dev/zero")  # endless zeros, read-only
    proc = subprocess.run([sys.executable, "-m", "peftplan", "validate", str(spec)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "not a regular file" in one_line_naming(proc.stderr, spec)


def test_a_spec_with_a_utf8_bom_reads_like_one_without(tmp_path):
    spec = workspace(tmp_path)
    plain_rc, plain_out, _ = cli("estimate", spec, "--json")
    spec.write_bytes(b"\xef\xbb\xbf" + spec.read_bytes())
    rc, out, err = cli("estimate", spec, "--json")
    assert plain_rc == rc == 0, err
    assert json.loads(out)["methods"] == json.loads(plain_out)["methods"]


def test_line_numbers_after_a_multi_line_string(tmp_path):
    spec = workspace(tmp_path)
    text = spec.read_text().replace("[hardware]\n", '[hardware]\nnote_for_me = """\nline one\nline two\n"""\n', 1)
    text = text.replace("memory_gib = 8", "memory_gib = -3")
    spec.write_text(text)
    expected = text.splitlines().index("memory_gib = -3") + 1  # 1-based, counted here from the file itself
    rc, _, err = cli("validate", spec)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    bad = [line for line in lines if "hardware.memory_gib" in line]
    assert bad and bad[0].startswith(f"{spec}:{expected}:"), (expected, lines)


def test_a_huge_string_value_makes_a_short_error_line(tmp_path):
    spec = workspace(tmp_path)
    huge = "x" * 900_000  # under the 1 MiB spec limit
    spec.write_text(spec.read_text().replace('gpu = "cpu"', f'gpu = "cpu"\nmystery = "{huge}"'))
    rc, _, err = cli("validate", spec)
    assert rc == 2
    assert all(len(line) < 400 for line in err.splitlines()), max(map(len, err.splitlines()))
    spec.write_text('x = "' + "y" * (2 * 2**20) + '"\n')  # over the limit: refused before parsing
    rc, _, err = cli("validate", spec)
    assert rc == 2 and len(err) < 400 and "larger than" in err


# ------------------------------------------------------------------------------------ ports
def test_a_multi_device_project_says_how_to_change_the_port(tmp_path):
    spec = workspace(tmp_path, hardware={"gpu": "cpu", "memory_gib": 8, "count": 2})
    out = tmp_path / "two"
    rc, _, err = cli("generate", spec, "-o", out)
    assert rc == 0, err
    readme = (out / "README.md").read_text()
    assert "MAIN_PROCESS_PORT=" in readme and "29500" in readme
    assert '"${MAIN_PROCESS_PORT:-29500}"' in (out / "run.sh").read_text()
