"""End to end on the CPU: generate a project, train it for real with every method, reload, merge, resume.

A tiny Llama-style model and tokenizer are built here (runtime.testing), offline. These tests start
training processes (a few seconds each); they need the [train] extra.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import OFFLINE_ENV, cpu_spec

torch = pytest.importorskip("torch", reason="needs the [train] extra")
pytest.importorskip("peft", reason="needs the [train] extra")

ROOT = Path(__file__).resolve().parents[1]
ENV = OFFLINE_ENV



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("e2e")
    build_tiny_model(root / "model", family="llama", hidden_size=64, intermediate_size=128)
    write_dataset(root / "data.jsonl", "chat", 96)
    return root


def generate(workspace: Path, method: str, name: str, gc: bool = False, lr: float = 2e-3) -> Path:
    spec = workspace / f"{name}.toml"
    spec.write_text(cpu_spec(num_examples=96, method=method, learning_rate=lr, save_steps=4,
                             gradient_checkpointing=gc))
    out = workspace / name
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(out)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


def train(project: Path, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=project, capture_output=True, text=True, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(project: Path) -> list[float]:
    rows = [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "event" not in r]


def probe_logits(model, tokenizer):
    batch = tokenizer(["The red cat sees the dog in the park."], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def load_adapter_model(project: Path, method: str):
    """Base as in training (4-bit for QLoRA/QDoRA, de-quantized), plus the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = project.parent / "model"
    if method in ("qlora", "qdora"):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=q).dequantize()
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base.float(), project / "outputs" / "final").eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "qdora", "full"])
def test_generate_train_reload_merge(workspace, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project = generate(workspace, method, f"p-{method}", gc=method in ("qlora", "qdora"),
                       lr=2e-4 if method == "full" else 2e-3)
    train(project)
    seen = losses(project)
    assert len(seen) >= 5
    assert sum(seen[-3:]) / 3 < sum(seen[:3]) / 3, seen  # the loss goes down
    final = project / "outputs" / "final"
    assert (final / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template  # saved with its chat template
    assert (project / "outputs" / "loss.png").stat().st_size > 1000
    peak = [json.loads(line) for line in (project / "outputs" / "metrics.jsonl").read_text().splitlines()
            if '"peak_memory"' in line]
    assert len(peak) == 1 and peak[0]["measured_peak_allocated_bytes"] > 0 and peak[0]["predicted_peak_allocated_bytes"]
    if method == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        assert probe_logits(reloaded, tok).isfinite().all()
        return
    # the adapter reloads, twice, to identical outputs, and differs from the untrained base
    a = probe_logits(load_adapter_model(project, method), tok)
    b = probe_logits(load_adapter_model(project, method), tok)
    assert torch.equal(a, b)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32)
    assert (probe_logits(base, tok) - a).abs().max() > 1e-4
    # merge into a de-quantized base; plain transformers loads it. By default the weights are bfloat16 (what
    # the help promises, whatever dtype training used); --dtype float32 keeps the comparison exact.
    proc = subprocess.run([sys.executable, "-m", "peftplan", "merge", str(project)], capture_output=True, text=True,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(next((project / "outputs" / "merged").glob("*.safetensors"))), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    proc = subprocess.run([sys.executable, "-m", "peftplan", "merge", str(project), "-o",
                           str(project / "outputs" / "merged32"), "--dtype", "float32"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(project / "outputs" / "merged32", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diff = (probe_logits(merged, tok) - a).abs().max().item()
    assert diff < 1e-3 * max(1.0, a.abs().max().item()), diff  # fp32: merging is exact up to rounding


@pytest.mark.slow
def test_project_runs_without_peftplan_importable(workspace):
    project = generate(workspace, "lora", "p-standalone")
    code = ("import sys, runpy; sys.modules['peftplan'] = None; sys.argv = ['train.py', '--max-steps', '2']; "
            "runpy.run_path('train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "outputs" / "final" / "adapter_model.safetensors").exists()
    import re

    for py in (project / "peftplan_runtime").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+peftplan\b.*$", py.read_text(), flags=re.M)
        assert not imports, (py, imports)


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume_matches_uninterrupted(workspace):
    """SIGKILL after the first checkpoint, resume, and compare with an uninterrupted run of the same plan."""
    straight = generate(workspace, "lora", "p-straight")
    train(straight)
    killed = generate(workspace, "lora", "p-killed")
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=killed, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "outputs" / "checkpoint-8" / "trainer_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "outputs" / "checkpoint-4").exists()
    assert not (killed / "outputs" / "final").exists()  # it really was interrupted
    out = train(killed, "--resume")
    assert "resuming from" in out.stdout
    last = sorted((straight / "outputs").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state_s = json.loads(last.joinpath("trainer_state.json").read_text())
    state_k = json.loads(sorted((killed / "outputs").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
                         .joinpath("trainer_state.json").read_text())
    assert state_s["global_step"] == state_k["global_step"] == 24
    # same data order: the logged losses after the resume point match the uninterrupted run's
    ls = {r["step"]: r["loss"] for r in state_s["log_history"] if "loss" in r}
    lk = {r["step"]: r["loss"] for r in state_k["log_history"] if "loss" in r}
    common = sorted(set(ls) & set(lk))
    assert common and max(abs(ls[s] - lk[s]) for s in common) < 1e-3, (ls, lk)
    from safetensors.torch import load_file

    wa = load_file(straight / "outputs" / "final" / "adapter_model.safetensors")
    wb = load_file(killed / "outputs" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    # CPU fp32, same seed, same batches: differences come only from summation order after reloading
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.slow
def test_bad_data_fails_before_training_with_file_and_line(workspace):
    project = generate(workspace, "lora", "p-bad")
    bad = workspace / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    proc = train(project, "--data", str(bad), check=False)
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "line 2" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_generate_refuses_existing_dir_and_force_keeps_user_files(workspace):
    project = generate(workspace, "lora", "p-force")
    (project / "my_notes.txt").write_text("mine")
    spec = workspace / "p-force.toml"
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(project)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(project), "--force"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert (project / "my_notes.txt").read_text() == "mine"
    assert not list(workspace.glob(".p-force.peftplan-*"))  # no temporary folder left behind
