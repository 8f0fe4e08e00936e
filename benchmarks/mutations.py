"""Mutation audit: does a test fail when one decision of the planner or the runtime is wrong?

    python benchmarks/mutations.py                 # every mutation; writes benchmarks/results/mutations.md
    python benchmarks/mutations.py --list          # which snippets are found, without running tests
    python benchmarks/mutations.py --only cost-devices,lora-r-alpha-swapped
    python benchmarks/mutations.py --skip-existing # only the decision tests (not also the rest of the suite)

Each mutation is one realistic bug: (file, an exact snippet of today's source, its replacement, the decision it
breaks). For each, HEAD's files (`git archive HEAD`; with --tree work, the working tree's tracked and untracked files
that are not ignored) are copied to a fresh temporary folder, the snippet is replaced — it must occur exactly once;
where it is no longer in the named file, it is looked for in every .py file of the same package (the code may have
moved); found nowhere, or more than once, the mutation is reported "not applicable" and skipped — and two pytest
runs (`pytest -x -q -p no:cacheprovider`, one at a time) go over the copy: the decision tests (NEW_TESTS, plus
tests/runtime/test_plan_to_runtime.py for a mutation of the runtime or of what the generated project holds), then
the rest of the torch-free suite on its own (tests/planner, tests/schemas, tests/test_docs.py, the published
comparison), which says whether the suite caught it before the decision tests existed. The copy is imported instead of
the editable install: links in the copy's `peftplan/` folder give it the installed layout, and the copy's root is
first on PYTHONPATH (checked before the run), with bytecode writing off so no stale .pyc can hide a mutation. An
unmutated baseline runs first (without -x): the tests that fail there are left out of every mutation's runs and
listed in the report (they would "catch" anything).

The result per mutation and run: caught (with the first failing test), missed, timeout, or not applicable.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutations.md"
NEW_TESTS = ["tests/planner/test_decisions.py", "tests/planner/test_decisions_run.py",
             "tests/test_published_own_stack.py"]
RUNTIME_TESTS = ["tests/runtime/test_plan_to_runtime.py"]
OLD_TESTS = ["tests/planner", "tests/schemas", "tests/test_docs.py", "tests/test_published_comparison.py"]
PACKAGES = {"peftplan": "peftplan", "planner": "planner", "runtime": "runtime", "schemas": "schemas",
            "templates": "templates"}  # folder in the repository -> name under the `peftplan` package


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    decision: str
    runtime: bool = False  # also run RUNTIME_TESTS (the runtime, or what plan.toml holds)


M = Mutation
MUTATIONS = [
    # --- hyperparameters (planner/hyper.py) ----------------------------------------------------------------------
    M("dora-alpha-r-over-2", "planner/hyper.py", "32, 64.0, (1e-4, 5e-5)", "32, 16.0, (1e-4, 5e-5)",
      "DoRA default α = 2r (mutant: r/2)"),
    M("qlora-alpha", "planner/hyper.py", "64, 16.0, (2e-4, 1e-4)", "64, 32.0, (2e-4, 1e-4)",
      "LoRA/QLoRA default α = 16 at r = 64 (mutant: 32)"),
    M("qlora-rank", "planner/hyper.py", "64, 16.0, (2e-4, 1e-4)", "16, 16.0, (2e-4, 1e-4)",
      "LoRA/QLoRA default rank 64 (mutant: 16)"),
    M("lora-dropout-swapped", "planner/hyper.py", "(0.1, 0.05))", "(0.05, 0.1))",
      "LoRA dropout 0.1 below 30B, 0.05 above (mutant: swapped)"),
    M("lora-lr-swapped", "planner/hyper.py", "16.0, (2e-4, 1e-4)", "16.0, (1e-4, 2e-4)",
      "LoRA learning rate 2e-4 below 30B, 1e-4 above (mutant: swapped)"),
    M("size-split", "planner/hyper.py", "LARGE_MODEL_B = 30", "LARGE_MODEL_B = 70",
      "the recipes' 7B/13B vs 33B/65B split at 30B (mutant: 70B)"),
    M("dora-lr", "planner/hyper.py", "64.0, (1e-4, 5e-5)", "64.0, (3e-4, 5e-5)",
      "DoRA learning rate 1e-4 (mutant: LoRA's 3e-4)"),
    M("dora-dropout-always", "planner/hyper.py", "dropout = recipe.dropout[0] if scarce else 0.0",
      "dropout = recipe.dropout[0]", "DoRA dropout 0 with plentiful data (mutant: always 0.05)"),
    M("full-lr-swapped", "planner/hyper.py", "FULL_LR = (2e-5, 1e-5)", "FULL_LR = (1e-5, 2e-5)",
      "full fine-tuning 2e-5 below 30B, 1e-5 above (mutant: swapped)"),
    M("scheduler", "planner/hyper.py", 'spec_training.lr_scheduler, "cosine"', 'spec_training.lr_scheduler, "linear"',
      "cosine schedule (mutant: linear)"),
    M("warmup", "planner/hyper.py", "spec_training.warmup_ratio, 0.03", "spec_training.warmup_ratio, 0.1",
      "warmup 3% (mutant: 10%)"),
    M("epochs", "planner/hyper.py", "2 if n < 100_000 else 1", "2 if n < 50_000 else 1",
      "epochs by data size: 2 below 100k (mutant: below 50k)"),
    M("batch-steps", "planner/hyper.py", "8, 128, 400", "8, 128, 200",
      "effective batch: ≥ 400 steps per epoch (mutant: 200)"),
    M("batch-boundary", "planner/hyper.py", "num_examples / (b * 2) >= BATCH_STEPS_PER_EPOCH",
      "num_examples / (b * 2) > BATCH_STEPS_PER_EPOCH", "effective batch: 400 steps exactly still doubles (mutant: >)"),
    M("batch-unknown", "planner/hyper.py", "BATCH_UNKNOWN_DATA = 16", "BATCH_UNKNOWN_DATA = 32",
      "effective batch 16 without num_examples (mutant: 32)"),
    M("batch-whole-per-device", "planner/hyper.py", "    return ceil(per / quantum) * quantum",
      "    return per", "effective batch: a per-device share micro-batches divide (mutant: 43 of 128 over 3 kept)"),
    M("batch-exact-share", "planner/choose.py", "(effective // used) % mb != 0", "False",
      "micro-batch × accumulation × devices is the effective batch exactly (mutant: any micro-batch)"),
    M("eval-cap", "planner/hyper.py", "0.10, 1000, 30", "0.10, 2000, 30", "held out at most 1,000 (mutant: 2,000)"),
    M("eval-min", "planner/hyper.py", "if held < EVAL_MIN:", "if held <= EVAL_MIN:",
      "no split below 30 held out; 30 is enough (mutant: ≤ 30)"),
    M("user-rank-alpha", "planner/hyper.py", "return recipe.rank, recipe.ratio * r, dropout",
      "return recipe.rank, recipe.alpha, dropout", "a rank set in the spec keeps the recipe's α/r (mutant: its α)"),
    M("accumulation-devices", "planner/hyper.py", "ceil(effective / (micro_batch * devices))",
      "ceil(effective / micro_batch)", "accumulation = effective / (micro-batch × devices) (mutant: devices dropped)"),
    # --- the method (planner/rules.py) ---------------------------------------------------------------------------
    M("scarce", "planner/rules.py", "SCARCE_EXAMPLES = 5_000", "SCARCE_EXAMPLES = 1_000",
      "DoRA below 5,000 examples (mutant: 1,000)"),
    M("full-examples", "planner/rules.py", '{"balanced": 100_000', '{"balanced": 10_000',
      "full fine-tuning from 100,000 examples (mutant: 10,000)"),
    M("full-headroom", "planner/rules.py", "FULL_FT_MIN_HEADROOM = 0.20", "FULL_FT_MIN_HEADROOM = 0.0",
      "full fine-tuning only with 20% of the memory free (mutant: any fit)"),
    M("dora-slowdown", "planner/rules.py", "DORA_MAX_SLOWDOWN = 1.6", "DORA_MAX_SLOWDOWN = 16",
      "DoRA's dropout off when it costs > 1.6× LoRA's time (mutant: 16×)"),
    M("dora-slowdown-quality", "planner/rules.py", "DORA_MAX_SLOWDOWN_QUALITY = 3.0",
      "DORA_MAX_SLOWDOWN_QUALITY = 1.6", "DoRA under priority quality up to 3× (mutant: 1.6×)"),
    M("attention", "planner/rules.py", "if shape.supports_sdpa:", "if True:",
      "eager attention where transformers has no sdpa (mutant: sdpa for Gemma 2)"),
    M("margin", "planner/rules.py", "TIGHT_FRACTION = 0.95", "TIGHT_FRACTION = 1.0",
      "a roomier geometry when the fastest fills > 95% (mutant: never)"),
    # --- fit, candidates, cost (planner/assumptions.py, planner/choose.py) -------------------------------------
    M("headroom", "planner/assumptions.py", "FIT_HEADROOM_FRACTION = 0.05", "FIT_HEADROOM_FRACTION = 0.0",
      "5% of the device kept free (mutant: 0%)"),
    M("allocator-reserve", "planner/assumptions.py", "ALLOCATOR_RESERVE_FRACTION = 0.10",
      "ALLOCATOR_RESERVE_FRACTION = 0.25", "what nvidia-smi shows: the peak + a 10% allocator reserve (mutant: 25%)"),
    M("full-loss-copies", "planner/assumptions.py", "LOGIT_FP32_COPIES_AT_PEAK = 3", "LOGIT_FP32_COPIES_AT_PEAK = 2",
      "transformers' own loss holds three fp32 tokens × vocabulary buffers (mutant: two)"),
    M("fit-whole-device", "planner/choose.py", "fits = need <= report.usable_bytes",
      "fits = need <= report.memory_bytes",
      "a candidate fits within the usable 95% (mutant: within the whole device)"),
    M("cost-devices", "planner/choose.py", "price * used", "price",
      "cost = hours × price × devices (mutant: devices dropped)"),
    M("cost-nodes", "planner/choose.py", "price * used", "price * min(used, report.hardware.count)",
      "cost counts every node's devices (mutant: one node's)"),
    M("held-out-trained", "planner/choose.py", "return max(1, num_examples - held)", "return max(1, num_examples)",
      "time counts only the examples that train (mutant: the held-out ones too)"),
    M("optimizer-preference", "planner/choose.py", 'OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")',
      'OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch")',
      "32-bit AdamW unless memory needs 8-bit (mutant: paged 8-bit preferred)"),
    M("checkpointing-always", "planner/choose.py", "checkpointed layer inputs\n    return [False, True]",
      "checkpointed layer inputs\n    return [True]",
      "gradient checkpointing only when it is needed or faster (mutant: always)"),
    M("loss-default", "planner/setup.py", 'loss=t.loss or "chunked"', 'loss=t.loss or "full"',
      "the chunked loss by default (mutant: transformers' full logits)", runtime=True),
    # --- time (planner/tokens.py, planner/work.py, planner/parallel.py) ---------------------------------------
    M("padding-ignored", "planner/tokens.py",
      "computed = full * b * lengths.expected_max(b) + (rest * lengths.expected_max(rest) if rest else 0.0)",
      "computed = real", "time counts the padding to the longest row (mutant: real tokens only)"),
    M("packed-rows", "planner/tokens.py", "rows = max(1, math.ceil(real / seq_len))", "rows = num_examples",
      "packing: ceil(tokens / seq_len) rows (mutant: one row per example)"),
    M("steps-devices", "planner/tokens.py", "math.ceil(math.ceil(rows / b) / devices)", "math.ceil(rows / b)",
      "batches per device = batches / devices (mutant: devices dropped)"),
    M("full-backward-1x", "planner/work.py", "(2 + 2 + (0 if m.adapter else 2))", "(2 + 2 + (0 if m.adapter else 0))",
      "full fine-tuning backward = 2× forward (mutant: 1×)"),
    M("recompute-free", "planner/work.py", "(2 * n_layers * tokens if gc else 0)", "0",
      "checkpointing recomputes the layers' forward (mutant: free)"),
    M("adapter-flops", "planner/work.py", "thin * tokens * (3 + (1 if gc else 0))",
      "thin * tokens * (1 + (1 if gc else 0))",
      "LoRA adapters: forward + 2× backward (mutant: forward only)"),
    M("dora-dropout-flops", "planner/work.py", "matmul += (6 if gc else 4) * w * tokens", "matmul += 0 * w * tokens",
      "DoRA with dropout runs the base matmul again (mutant: not counted)"),
    M("flash-backward", "planner/work.py", "FLASH_BACKWARD = 2.5", "FLASH_BACKWARD = 2.0",
      "fused attention backward = 2.5× forward (mutant: 2×)"),
    M("dequant-passes", "planner/work.py", "passes = 3 if s.geometry.gradient_checkpointing else 2",
      "passes = 1",
      "4-bit weights de-quantized on every pass (mutant: once)"),
    M("optimizer-traffic", "planner/work.py", '"adamw_torch": (7 + 3 + 1, 0)', '"adamw_torch": (7, 0)',
      "optimizer step bytes include clipping and the NaN guard (mutant: AdamW only)"),
    M("ring-nodes", "planner/parallel.py",
      "return min(self.intra_gbps, self.inter_gbps) if self.intra_gbps else self.inter_gbps",
      "return self.intra_gbps or self.inter_gbps",
      "across nodes the ring runs at the network's speed (mutant: NVLink's)"),
    M("comm-overlap", "planner/parallel.py", "COMM_OVERLAP = 0.5", "COMM_OVERLAP = 1.0",
      "half the communication hidden by compute (mutant: all)"),
    # --- the generated project and the runtime -------------------------------------------------------------------
    M("plan-toml-accumulation", "planner/project.py", '"gradient_accumulation_steps": c.accumulation,',
      '"gradient_accumulation_steps": 1,', "plan.toml carries the planned accumulation (mutant: 1)", runtime=True),
    M("lora-r-alpha-swapped", "runtime/model.py", "r=setup.rank,\n        lora_alpha=setup.alpha,",
      "r=int(setup.alpha),\n        lora_alpha=setup.rank,", "the runtime's LoraConfig r and α (mutant: swapped)",
      runtime=True),
    M("lora-dropout-runtime", "runtime/model.py", "lora_dropout=setup.dropout,", "lora_dropout=0.0,",
      "the runtime's LoRA dropout from plan.toml (mutant: 0)", runtime=True),
    M("use-dora", "runtime/model.py", 'use_dora=setup.method in ("dora", "qdora"),', 'use_dora=setup.method == "dora",',
      "QDoRA uses DoRA (mutant: plain LoRA on the 4-bit base)", runtime=True),
    M("nf4", "runtime/model.py", 'bnb_4bit_quant_type="nf4",', 'bnb_4bit_quant_type="fp4",',
      "4-bit NF4 (mutant: FP4)", runtime=True),
    M("double-quant", "runtime/model.py", "bnb_4bit_use_double_quant=True,", "bnb_4bit_use_double_quant=False,",
      "double quantization (mutant: off)", runtime=True),
    M("compute-dtype", "runtime/model.py", "bnb_4bit_compute_dtype=torch_dtype(setup.dtype),",
      'bnb_4bit_compute_dtype=torch_dtype("float16"),', "4-bit compute in the plan's dtype (mutant: float16)",
      runtime=True),
    M("checkpointing-runtime", "runtime/model.py", "if setup.gradient_checkpointing:", "if True:",
      "the runtime checkpoints only when the plan says so (mutant: always)", runtime=True),
    M("optimizer-8bit", "runtime/optim.py", '"adamw_8bit": "adamw_bnb_8bit",', '"adamw_8bit": "adamw_torch_fused",',
      "adamw_8bit is bitsandbytes' 8-bit AdamW (mutant: 32-bit)", runtime=True),
    M("accumulation-runtime", "runtime/train.py", 'gradient_accumulation_steps=t["gradient_accumulation_steps"],',
      "gradient_accumulation_steps=1,", "TrainingArguments' accumulation from plan.toml (mutant: 1)", runtime=True),
    M("warmup-runtime", "runtime/train.py", 'warmup_steps=t["warmup_ratio"],', "warmup_steps=0,",
      "TrainingArguments' warmup from plan.toml (mutant: none)", runtime=True),
    M("scheduler-runtime", "runtime/train.py", 'lr_scheduler_type=t["lr_scheduler"],', 'lr_scheduler_type="linear",',
      "TrainingArguments' schedule from plan.toml (mutant: linear)", runtime=True),
]


def stage_tree(dest: Path, tree: str, commit: str) -> list[str]:
    """Put the code under audit in `dest`: HEAD's files (`git archive HEAD`), or the working tree's (tracked and
    untracked, not ignored). From HEAD, the audit's own test files are taken from the working tree where HEAD does
    not have them yet. Returns what was taken from the working tree that way."""
    dest.mkdir(parents=True)
    if tree == "work":
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        for f in (f for f in out.split("\0") if f and (ROOT / f).is_file()):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
        return []
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    added = []
    for f in NEW_TESTS + RUNTIME_TESTS:
        if not (dest / f).exists() and (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
            added.append(f)
    return added


def package_links(repo: Path) -> None:
    """Make the copy's `peftplan/` folder the installed layout (peftplan.planner = planner/, …) with links, so that
    `import peftplan` from the copy's root (pytest's cwd) or through PYTHONPATH finds the copy, never the editable
    install's /work tree (its finder comes after the path entries)."""
    pkg = repo / "peftplan"
    for folder, name in PACKAGES.items():
        if name != "peftplan" and (repo / folder).is_dir() and not (pkg / name).exists():
            (pkg / name).symlink_to(Path("..") / folder, target_is_directory=True)


def locate(repo: Path, m: Mutation) -> tuple[Path | None, str]:
    """(the file holding the snippet exactly once, a note); (None, why) when it is not applicable."""
    named = repo / m.file
    if named.is_file() and named.read_text(encoding="utf-8").count(m.old) == 1:
        return named, ""
    package = repo / m.file.split("/")[0]
    hits = [(p, p.read_text(encoding="utf-8").count(m.old)) for p in sorted(package.rglob("*.py"))]
    hits = [(p, n) for p, n in hits if n]
    if len(hits) == 1 and hits[0][1] == 1:
        return hits[0][0], f"moved to {hits[0][0].relative_to(repo)}"
    total = sum(n for _, n in hits)
    return None, "text not found" if total == 0 else f"text found {total} times"


def environment(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    return env


def run_tests(repo: Path, env: dict, paths: list[str], timeout: float,
              first: bool = True) -> tuple[str, list[str], float]:
    """(passed | failed | timeout, the failing tests — the first only with `first` (-x) — or the error, seconds)."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", *(["-x"] if first else []), "-q", "-p", "no:cacheprovider", *paths]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.monotonic() - start
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return "passed", [], seconds
    lines = (proc.stdout + proc.stderr).splitlines()
    failed = [ln.split(" - ")[0].split(" ", 1)[1] for ln in lines if re.match(r"^(FAILED|ERROR) ", ln)]
    return "failed", failed or [lines[-1] if lines else f"exit {proc.returncode}"], seconds


def suites(m: Mutation | None, existing: bool) -> dict[str, list[str]]:
    """The test runs per mutation: the decision tests (with the runtime's for a mutation of the runtime or of what
    plan.toml holds; the baseline runs everything), then — unless left out — the rest of the torch-free suite on its
    own, which says whether the suite without the decision tests catches it too."""
    out = {"new": NEW_TESTS + (RUNTIME_TESTS if m is None or m.runtime else [])}
    if existing:
        out["existing"] = OLD_TESTS + [f"--ignore={t}" for t in NEW_TESTS]
    return out


def one(m: Mutation | None, stage: Path, runs: dict[str, list[str]], timeout: float,
        deselect: tuple[str, ...] = ()) -> dict:
    """{"note", "seconds", and per run: (caught | missed | timeout | not applicable, first failing test)}; the
    baseline (m None) runs without -x and keeps every failing test under "failing"."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(stage, repo, symlinks=True)
        package_links(repo)
        env = environment(repo)
        where = subprocess.run([sys.executable, "-c", "import peftplan.planner as p; print(p.__file__)"], cwd=tmp,
                               env=env, capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(repo)):
            raise SystemExit(f"the copy is not what gets imported (peftplan.planner from {where!r})")
        out: dict = {"note": "", "seconds": 0.0}
        if m is not None:
            path, note = locate(repo, m)
            if path is None:
                return {**out, "note": note, **{name: ("not applicable", note) for name in runs}}
            out["note"] = note
            path.write_text(path.read_text(encoding="utf-8").replace(m.old, m.new, 1), encoding="utf-8")
        out["failing"] = []
        for name, tests in runs.items():
            paths = [p for p in tests if p.startswith("--") or (repo / p).exists()]
            paths += [f"--deselect={t}" for t in deselect]
            status, failed, seconds = run_tests(repo, env, paths, timeout, first=m is not None)
            out[name] = ({"passed": "missed", "failed": "caught", "timeout": "timeout"}[status],
                         failed[0] if failed else "")
            out["failing"] += failed
            out["seconds"] += seconds
        return out


def _cell(result: tuple[str, str]) -> str:
    status, test = result
    return f"caught: `{test}`" if status == "caught" else (f"{status} ({test})" if test else status)


def markdown(rows: list[tuple[Mutation, dict]], head: str, existing: bool, known: list[str]) -> str:
    applicable = [r for _, r in rows if r["new"][0] != "not applicable"]
    new = sum(r["new"][0] == "caught" for r in applicable)
    lines = [
        "# Mutation audit", "",
        f"`python benchmarks/mutations.py` on {head}: one bug at a time in a fresh copy, then `pytest -x` over the "
        f"decision tests ({', '.join(f'`{t}`' for t in NEW_TESTS)}, and `{RUNTIME_TESTS[0]}` for a mutation of the "
        "runtime or of what plan.toml holds)"
        + (f" and, separately, over the rest of the torch-free suite ({', '.join(f'`{t}`' for t in OLD_TESTS)})"
           if existing else "")
        + ". Each cell names the first failing test of that run.", "",
        f"- caught by the decision tests: **{new} of {len(applicable)}** applicable mutations "
        f"({len(rows) - len(applicable)} not applicable)"]
    if existing:
        old = sum(r["existing"][0] == "caught" for r in applicable)
        either = sum("caught" in (r["new"][0], r["existing"][0]) for r in applicable)
        lines += [f"- caught by the rest of the suite on its own (the suite before the decision tests): **{old} of "
                  f"{len(applicable)}**", f"- caught by either: **{either} of {len(applicable)}**"]
    if known:
        lines += ["", "Failing on the unmutated tree, so left out of every run (a real bug the tests report, or work "
                  f"in progress): {', '.join(f'`{t}`' for t in known)}."]
    header = "| # | id | decision (mutant) | file | decision tests |" + (" rest of the suite |" if existing else "")
    lines += ["", header + " s |", "|---" * (header.count("|") - 1 + 1) + "|"]
    for i, (m, r) in enumerate(rows, 1):
        where = m.file + (f" ({r['note']})" if r["note"] and r["new"][0] != "not applicable" else "")
        cells = [_cell(r["new"])] + ([_cell(r["existing"])] if existing else [])
        lines.append(f"| {i} | `{m.id}` | {m.decision} | `{where}` | {' | '.join(cells)} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def audit(chosen: list[Mutation], stage: Path, args) -> tuple[list[tuple[Mutation, dict]], list[str]] | None:
    """Every mutation's result, and the tests that already fail on the unmutated copy (left out of every run: a test
    that fails anyway says nothing about a mutation; they are listed in the report). None when the baseline cannot
    run (a collection error, a timeout)."""
    existing = not args.skip_existing
    base = one(None, stage, suites(None, existing), args.timeout)
    known = sorted(set(base["failing"]))
    broken = [t for t in known if "::" not in t] + \
        [name for name in suites(None, existing) if base[name][0] == "timeout"]
    if broken:
        print(f"baseline: the unmutated copy cannot run ({'; '.join(broken)}): nothing to audit", file=sys.stderr)
        return None
    print(f"baseline: {len(known)} tests fail on the unmutated copy and are left out: {', '.join(known) or 'none'} "
          f"({base['seconds']:.0f} s)", flush=True)
    rows = []
    for m in chosen:
        r = one(m, stage, suites(m, existing), args.timeout, tuple(known))
        print(f"{m.id:28} " + "  ".join(f"{name}: {_cell(r[name])}" for name in suites(m, existing))
              + f" ({r['seconds']:.0f} s)", flush=True)
        rows.append((m, r))
    return rows, known


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated mutation ids")
    ap.add_argument("--list", action="store_true", help="check where each snippet is found; run nothing")
    ap.add_argument("--skip-existing", action="store_true",
                    help="run only the decision tests, not also the rest of the suite on its own (about half the time)")
    ap.add_argument("--tree", choices=("head", "work"), default="head",
                    help="audit HEAD's files (default; the audit's own tests from the working tree if HEAD lacks them) "
                         "or the working tree's")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation ids: {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.id in wanted]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # HEAD may move during a long run: this one is audited
    with tempfile.TemporaryDirectory(prefix="mutation-stage-") as tmp:
        stage = Path(tmp) / "tree"
        added = stage_tree(stage, args.tree, commit)
        if args.list:
            for m in chosen:
                path, note = locate(stage, m)
                print(f"{m.id:28} {'ok' if path else 'NOT APPLICABLE'}  {note or m.file}")
            return 0
        done = audit(chosen, stage, args)
        if done is None:
            return 2
        rows, known = done
    head = commit[:7]
    head = (f"commit {head}" + (f" (with {', '.join(f'`{f}`' for f in added)} from the working tree)" if added else "")
            if args.tree == "head" else f"the working tree at commit {head}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, head, not args.skip_existing, known), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
