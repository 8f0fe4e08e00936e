"""Two processes through accelerate launch against a single process with the same global batch
(2 × micro-batch 4 vs micro-batch 4 × accumulation 2): data parallelism and FSDP (FSDP2, full shard), on the
CPU over gloo. accelerate 1.15 switches to FSDP only on accelerator backends; the runtime's
`cpu_fsdp.allow_fsdp_on_cpu` finishes that switch on CPUs, so these runs go through accelerate's own FSDP2
wrapping, sharding and full-state-dict gathering — the test checks the run really is FSDP (parameters are
DTensors sharded over both ranks), not DDP under another name.

Why the trajectories must agree: accelerate hands rank r the micro-batches r, r+2, … of the same seeded
sampler that the single process walks through in order, so optimizer step k sees the same 8 examples
in both runs; the loss is token-weighted across ranks (average_tokens_across_devices) exactly as across
accumulation steps; initialization is seeded. Only the order of floating-point reductions differs:
1e-4 relative on fp32 CPU losses covers that, and is far below the step-to-step change (~1e-2).
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import OFFLINE_ENV, cpu_spec, free_port

torch = pytest.importorskip("torch", reason="needs the [train] extra")

ENV = OFFLINE_ENV


CUDA = torch.cuda.is_available()
PARS = ["ddp", "fsdp", "fsdp-qlora"]  # each against the single-process run of its method
SINGLE = {"ddp": "single", "fsdp": "single", "fsdp-qlora": "single-qlora"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("mp")
    build_tiny_model(root / "model", family="llama", hidden_size=64, intermediate_size=128)
    write_dataset(root / "data.jsonl", "chat", 200)
    out = {}
    cases = [("single", 1, 2, "single", "lora"), ("ddp", 2, 1, "ddp", "lora"), ("fsdp", 2, 1, "fsdp", "lora"),
             ("single-qlora", 1, 2, "single", "qlora"), ("fsdp-qlora", 2, 1, "fsdp", "qlora")]
    for name, count, ga, par, method in cases:
        spec = root / f"{name}.toml"
        spec.write_text(cpu_spec(num_examples=200, gpu="A10G" if CUDA else "cpu", count=count, learning_rate=1e-3,
                                 method=method, gradient_accumulation_steps=ga, gradient_checkpointing=False,
                                 max_steps=8, save_steps=4, parallelism=par))
        proj = root / name
        gen = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(proj)],
                             capture_output=True, text=True, env=ENV)
        assert gen.returncode == 0, gen.stderr
        run = subprocess.run([sys.executable, "-m", "peftplan", "run", str(proj)], capture_output=True, text=True,
                             env={**ENV, "MAIN_PROCESS_PORT": free_port()}, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        out[name] = proj
    return out


def metrics(proj: Path) -> list[dict]:
    return [json.loads(line) for line in (proj / "outputs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("par", PARS)
def test_two_processes_match_one_with_the_same_global_batch(runs, par):
    start = next(r for r in metrics(runs[par]) if r.get("event") == "start")
    assert start["world_size"] == 2
    assert start["fsdp"] == par.startswith("fsdp")
    # FSDP really shards: each rank stores about half of every parameter (DTensor local shards)
    peak = next(r for r in metrics(runs[par]) if r.get("event") == "peak_memory")
    assert peak["parameters_held_locally"] == (pytest.approx(0.5, abs=0.02) if par.startswith("fsdp") else 1.0)
    one = {r["step"]: r["loss"] for r in metrics(runs[SINGLE[par]]) if "loss" in r and "event" not in r}
    two = {r["step"]: r["loss"] for r in metrics(runs[par]) if "loss" in r and "event" not in r}
    assert sorted(one) == sorted(two) and len(one) >= 8
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    assert one[max(one)] < one[min(one)]  # and it trains


@pytest.mark.slow
@pytest.mark.parametrize("par", PARS)
def test_adapter_saved_once_and_loads_in_one_process(runs, par):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = runs[par] / "outputs" / "final"
    files = list(final.glob("*.safetensors"))
    assert [f.name for f in files] == ["adapter_model.safetensors"]  # one file, not one per rank
    a = load_file(files[0])
    b = load_file(runs[SINGLE[par]] / "outputs" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    base = AutoModelForCausalLM.from_pretrained(runs[par].parent / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert model(input_ids=ids).logits.isfinite().all()


def _process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (from /proc: torchrun starts each rank in a new session, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie has released its files and locks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("par", ["ddp", "fsdp"])
def test_killed_after_a_checkpoint_resumes_to_the_same_run(runs, par):
    """SIGKILL the whole two-process job once a checkpoint exists, then `peftplan run --resume`: the logged
    losses after the resume point and the final adapter match the uninterrupted run (under FSDP the checkpoint holds
    the gathered adapter and accelerate's sharded optimizer state) (fp32, same seed and batches; 1e-4 covers
    reduction order only)."""
    import signal
    import time

    from safetensors.torch import load_file

    root = runs[par].parent
    proj = root / f"{par}-killed"
    gen = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(root / f"{par}.toml"), "-o", str(proj)],
                         capture_output=True, text=True, env=ENV)
    assert gen.returncode == 0, gen.stderr
    job = subprocess.Popen([sys.executable, "-m", "peftplan", "run", str(proj)],
                           env={**ENV, "MAIN_PROCESS_PORT": free_port()}, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (proj / "outputs" / "checkpoint-4" / "trainer_state.json").exists():
        time.sleep(0.05)
    tree = _process_tree(job.pid)  # the launcher, torchrun's agent and both ranks (each rank in its own session)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    while any(_alive(pid) for pid in tree):  # a rank holds the run lock until its process is gone
        time.sleep(0.05)
    assert not (proj / "outputs" / "final").exists()
    run = subprocess.run([sys.executable, "-m", "peftplan", "run", str(proj), "--resume"], capture_output=True,
                         text=True, env={**ENV, "MAIN_PROCESS_PORT": free_port()}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("resuming from") == 1  # printed by the main process only
    one = {r["step"]: r["loss"] for r in metrics(runs[par]) if "loss" in r and "event" not in r}
    two = {r["step"]: r["loss"] for r in metrics(proj) if "loss" in r and "event" not in r}
    assert max(two) == max(one) == 8
    for step in range(5, 9):
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    a = load_file(runs[par] / "outputs" / "final" / "adapter_model.safetensors")
    b = load_file(proj / "outputs" / "final" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_two_nodes_through_run_sh(runs, tmp_path):
    """A two-node spec (1 process per node), run the way its README says: run.sh on every node with
    MACHINE_RANK and MAIN_PROCESS_IP. Two copies of the project stand in for two machines (localhost as
    the main node's address). The job is one world of 2 ranks: same losses as one process with the same
    global batch, the adapter written once, by node 0."""
    import shutil

    root = runs["single"].parent
    spec = root / "nodes.toml"
    spec.write_text(cpu_spec(num_examples=200, count=1, nodes=2, learning_rate=1e-3, gradient_checkpointing=False,
                             max_steps=8, save_steps=4, parallelism="ddp"))
    gen = subprocess.run([sys.executable, "-m", "peftplan", "generate", str(spec), "-o", str(tmp_path / "node0")],
                         capture_output=True, text=True, env=ENV)
    assert gen.returncode == 0, gen.stderr
    shutil.copytree(tmp_path / "node0", tmp_path / "node1")
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}",
           "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": free_port()}
    procs = [subprocess.Popen(["./run.sh"], cwd=tmp_path / f"node{rank}", env={**env, "MACHINE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    node0 = tmp_path / "node0"
    start = next(r for r in metrics(node0) if r.get("event") == "start")
    assert start["world_size"] == 2
    one = {r["step"]: r["loss"] for r in metrics(runs["single"]) if "loss" in r and "event" not in r}
    two = {r["step"]: r["loss"] for r in metrics(node0) if "loss" in r and "event" not in r}
    assert sorted(one) == sorted(two)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    assert (node0 / "outputs" / "final" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "node1" / "outputs" / "final").exists()


def test_generated_launch_files(runs):
    import tomllib

    cfg = (runs["ddp"] / "accelerate_config.yaml").read_text()
    assert 'distributed_type: "MULTI_GPU"' in cfg and "num_processes: 2" in cfg  # torchrun + gloo with use_cpu
    assert f"use_cpu: {'false' if CUDA else 'true'}" in cfg
    assert tomllib.loads((runs["ddp"] / "plan.toml").read_text())["launch"]["parallelism"] == "ddp"


def test_launch_mismatches_are_named():
    from peftplan.runtime.train import launch_problem

    fsdp = {"parallelism": "fsdp", "devices_per_node": 2, "nodes": 1}
    assert launch_problem(fsdp, {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}) is None
    assert launch_problem(fsdp, {"WORLD_SIZE": "2"}).startswith("error: this plan shards with FSDP")
    assert launch_problem({"parallelism": "deepspeed-zero3", "devices_per_node": 8, "nodes": 2},
                          {"WORLD_SIZE": "16"}).startswith("error: this plan shards with DeepSpeed")
    one = launch_problem({"parallelism": "ddp", "devices_per_node": 4, "nodes": 2}, {})
    assert one.startswith("warning: planned for 8 processes (ddp) but running as one")
    assert launch_problem({"parallelism": "ddp", "devices_per_node": 2, "nodes": 1}, {"WORLD_SIZE": "2"}) is None
    assert launch_problem({}, {}) is None  # single-device plans


@pytest.mark.slow
def test_fsdp_plan_under_plain_torchrun_refuses_to_run_unsharded(runs):
    """torchrun alone sets no FSDP settings: the Trainer would train with DDP and every rank would hold the
    whole model. The runtime says so and exits 2 before loading anything."""
    proj = runs["fsdp"]
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), "train.py",
                          "--max-steps", "1"], cwd=proj,
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode != 0
    assert "this plan shards with FSDP, but the launcher did not turn FSDP on" in run.stderr
    assert "./run.sh" in run.stderr
