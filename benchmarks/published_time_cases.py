"""Published throughput rows (docs/published_throughput.toml) as cases the time model can predict.

    cases = build_cases()                       # every row, with its status and the settings it was read with
    c.predicted_tps(coefficients()), c.error(coefficients())

A case holds what one published run computed per optimizer step on one device: the micro-batch's token positions
and attention pairs (as *that* run's data pipeline made them: packed or fixed-length rows are causal over the whole
row; the PEFT benchmark's length-bucketed batches are padded to about the longest), how many micro-steps, the
optimizer implementation and its state bytes, the sharding and the communication the planner would add
(planner.parallel.comm_seconds_per_step, COMM_OVERLAP hidden). Every setting a row leaves out is assumed here and
listed in `assumptions`. Rows of the Hugging Face stack (stack hf-peft or trl, trust high or medium) with no kernel
the runtime does not use are "hf" cases: half of them fit the model (split below), half measure it. Other stacks are
"other" cases, reported as a comparison only. Rows that cannot be compared say why.

Used by benchmarks/published_time.py and tests/planner/test_throughput.py.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from peftplan.planner import AdapterSettings, Geometry, Setup, estimate, shape_from_config
from peftplan.planner.catalog import Device, find_device, find_model
from peftplan.planner.methods import METHODS
from peftplan.planner.parallel import COMM_OVERLAP, comm_seconds_per_step, topology
from peftplan.planner.throughput import Coefficients, device_bandwidth, device_flops, step_time
from peftplan.planner.tokens import Lengths
from peftplan.planner.work import step_work

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "published_throughput.toml"

RUNTIME_KERNELS = {"flash-attn-2", "flash-attn", "packing"}  # what the runtime also does (or its data pipeline)
HF_STACKS = {"hf-peft", "trl"}

# Same architecture (identical shapes for FLOPs) under another hub id.
SAME_ARCHITECTURE = {
    "NousResearch/Llama-2-70b-hf": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "mistralai/Mistral-7B-v0.2": "mistralai/Mistral-7B-v0.1",  # no sliding window in v0.2: same at ≤ 4096 tokens
    "ibm-granite/granite-7b-base": "meta-llama/Llama-2-7b-hf",  # the blog: "Llama-2 architecture"
}


def _llama(hidden: int, layers: int, heads: int, kv: int, ff: int, vocab: int, tied: bool = False) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ff, "vocab_size": vocab, "tie_word_embeddings": tied,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu"}


# Models outside the catalog, as the Llama shape with the same matmuls. Qwen-1 (QWenLMHeadModel, remote code): fused
# c_attn (q, k, v), c_proj, w1/w2 of intermediate_size / 2 each and an MLP c_proj, i.e. Llama's seven matrices;
# values from the models' config.json on the Hub (Qwen-7B: 32 × 4096, 32 heads, intermediate_size 22016, vocabulary
# 151936; Qwen-14B: 40 × 5120, 40 heads, 27392, 152064; Qwen-1.8B: 24 × 2048, 16 heads, 11008, 151936; the 14B and
# 1.8B values from memory of those files, the 7B one confirmed in a public copy of its config).
# Yi-34B (LlamaForCausalLM): 60 × 7168, 56 heads / 8 KV, intermediate 20480, vocabulary 64000 (from memory).
EXTRA_CONFIGS = {
    "Qwen/Qwen-7B": _llama(4096, 32, 32, 32, 11008, 151936),
    "Qwen/Qwen-14B": _llama(5120, 40, 40, 40, 13696, 152064),
    "Qwen/Qwen-1_8B": _llama(2048, 24, 16, 16, 5504, 151936),
    "01-ai/Yi-34B": _llama(7168, 60, 56, 8, 20480, 64000),
}

# Row-specific facts (from the row's note or its source's config) the table keys do not carry: id prefix -> dict
PIPELINES = {
    # fms-hf-tuning: TRL packing (ConstantLengthDataset) concatenates without restarting positions: causal per row
    "fms-": {"optimizer": "adamw_torch_foreach", "rows": "causal",
             "why": "TRL packing: causal attention over each 4096-token row; torch's foreach AdamW (HF adamw_torch)"},
    "qwen1-": {"optimizer": "adamw_torch_foreach", "rows": "causal",
               "why": "fixed-length rows padded to model_max_length: causal over each row; foreach AdamW"},
    "peft-mc-": {"optimizer": "adamw_torch_foreach", "rows": "bucketed",
                 "why": "length-bucketed batches padded to the longest (~5% padding assumed), sdpa with a padding "
                        "mask (full square per row); torch.optim.AdamW (foreach); real tokens counted"},
    "hfblog-": {"optimizer": "adamw_torch_foreach", "rows": "causal", "gradient_checkpointing": True,
                "why": "4096-token rows (inferred by the row), causal; gradient checkpointing assumed (8 × 4096 "
                       "tokens of 7B activations do not fit 80 GB without it); fp32 master weights (the blog)"},
    "answerai-": {"optimizer": "adamw_torch_foreach", "rows": "causal", "gradient_checkpointing": True,
                  "why": "dummy rows of exactly context_length: causal; gradient checkpointing (the template)"},
    "torchtune-": {"optimizer": "adamw_torch", "rows": "causal", "gradient_checkpointing": False,
                   "why": "packed rows (torchtune masks per example; counted causal per row); fused AdamW"},
    "nemo-": {"optimizer": "adamw_torch", "rows": "causal", "gradient_checkpointing": True, "why": "assumed"},
    "vectorlm-": {"optimizer": "adamw_torch_foreach", "rows": "causal", "why": "partially packed rows"},
    "llmfoundry-": {"optimizer": "adamw_torch", "rows": "causal", "why": "fixed-length rows"},
}
BUCKETED_PADDING = 1.05  # PEFT's BucketIterator sorts pools of 20 batches by length: little padding is left


@dataclass
class Case:
    id: str
    row: dict
    group: str  # hf | other | excluded
    reason: str = ""  # why excluded
    method: str = ""
    setup: Setup | None = None
    device: Device | None = None
    precision: str = "bf16"
    devices: int = 1
    parallelism: str = "single"
    accumulation: int = 1
    positions: float = 0.0  # per micro-step per device, padding included
    pairs: float = 0.0  # attention pairs per micro-step per device (per layer and head)
    counted: float = 0.0  # tokens per micro-step per device as the source counts them
    optimizer: str = "adamw_torch_foreach"
    trainable_bytes: int | None = None
    shards: int = 1
    comm: float = 0.0  # seconds per optimizer step of communication not hidden (planner.parallel)
    measured_tps: float = 0.0  # per device
    split: str = ""  # fit | held-out (hf cases)
    assumptions: list = field(default_factory=list)

    @property
    def gpu(self) -> str:
        return self.row.get("gpu", "")

    def step(self, c: Coefficients):
        peak = device_flops(self.device, self.precision)
        bw, _ = device_bandwidth(self.device, peak)
        work = step_work(self.method, self.setup, self.positions, self.pairs, optimizer=self.optimizer,
                         shards=self.shards, trainable_bytes=self.trainable_bytes)
        return step_time(work, self.accumulation, peak, bw, self.method, c.generation(self.device),
                         self.setup.shape.num_experts > 0, c)

    def predicted_tps(self, c: Coefficients) -> float:
        return self.counted * self.accumulation / (self.step(c).seconds + self.comm)

    def error(self, c: Coefficients) -> float:
        """Predicted ÷ published time − 1 (positive: the plan says longer than the run took)."""
        return self.measured_tps / self.predicted_tps(c) - 1


def _pipeline(rid: str) -> dict:
    return next((v for k, v in PIPELINES.items() if rid.startswith(k)), {"rows": "causal", "why": ""})


def _shape(model: str):
    cat = find_model(model) or (find_model(SAME_ARCHITECTURE[model]) if model in SAME_ARCHITECTURE else None)
    if cat is not None:
        return shape_from_config(cat.config), (f"shape of catalog {cat.id}" if cat.id != model else "")
    if model in EXTRA_CONFIGS:
        return shape_from_config(EXTRA_CONFIGS[model]), "Llama-equivalent shape (benchmarks/published_time_cases.py)"
    return None, f"model {model} not in the catalog"


def _exclusion(row: dict) -> str:
    """Why an HF-stack row stays out of the fit ('' when it is in)."""
    extra = [k for k in row.get("kernels", []) if k not in RUNTIME_KERNELS]
    if extra:
        return f"kernels the runtime does not use: {', '.join(extra)}"
    if row["model"].endswith("-Int4"):
        return "GPTQ 4-bit (auto-gptq kernels), not bitsandbytes NF4"
    if "-emb-" in row["id"]:
        return "embeddings and output layer trained too (modules_to_save): not a runtime option"
    return row.get("exclude_from_fit", "")


def _case(row: dict) -> Case:
    rid = row["id"]
    hf = row["stack"] in HF_STACKS and row["trust"] in ("high", "medium")
    case = Case(rid, row, "hf" if hf else "other")
    # rows kept out of the fit (and out of the comparison) are still predicted when they can be
    why = "trust = low in the source table" if row["trust"] == "low" else (_exclusion(row) if hf else "")
    if why:
        case.group, case.reason = "excluded", why
    if row["method"] not in METHODS:
        case.group, case.reason = "excluded", f"method {row['method']} not modelled"
        return case
    if row.get("parallelism") not in ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        case.group, case.reason = "excluded", f"parallelism {row.get('parallelism')} (tensor/pipeline) not modelled"
        return case
    if "activation-offload" in row.get("kernels", []) or "offload" in rid:
        case.group, case.reason = "excluded", "CPU offloading: transfer time not modelled"
        return case
    device = find_device(row["gpu"])
    shape, how = _shape(row["model"])
    if shape is None or device is None:
        case.group, case.reason = "excluded", how if shape is None else f"device {row['gpu']} not in the catalog"
        return case
    seq = row.get("seq_len")
    if not seq:
        case.group, case.reason = "excluded", "sequence length not stated (data-dependent)"
        return case
    p = _pipeline(rid)
    notes = [x for x in (how, p.get("why")) if x]
    gc = row.get("gradient_checkpointing")
    if gc is None:
        gc = p.get("gradient_checkpointing", True)
        notes.append(f"gradient checkpointing {'on' if gc else 'off'} (assumed)")
    mb = int(row["micro_batch_size"])
    attention = "flash_attention_2" if row.get("attention") == "flash_attention_2" else "sdpa"
    precision = row["precision"] if row["precision"] in ("bf16", "fp16") else "bf16"
    rank = int(row.get("rank", 16))
    targets = row.get("target_modules")
    known = tuple(t for t in (targets or ()) if t in shape.module_names)
    if targets and len(known) < len(targets):  # Qwen-1's own names: c_attn, c_proj, w1, w2 = every linear
        notes.append(f"target_modules {' '.join(targets)} as all-linear")
        known = ()
    setup = Setup(shape, Geometry(mb, int(seq), bool(gc), 1, attention, False),
                  AdapterSettings(rank, float(row.get("alpha", 2 * rank)), 0.0, known or "all-linear"),
                  "adamw_torch", "float16" if precision == "fp16" else "bfloat16", "cuda")
    if row.get("rows_assumed") or p["rows"] == "bucketed":
        avg = float(row.get("avg_tokens") or seq)
        lengths = Lengths.from_mean(avg, int(seq))
        counted = mb * avg
        positions = counted * BUCKETED_PADDING
        pairs = mb * lengths.mean_square * BUCKETED_PADDING ** 2
    else:
        counted = positions = float(mb * seq)
        pairs = mb * seq * (seq + 1) / 2
    devices = int(row.get("num_gpus", 1))
    per_device = row["tokens_per_second"] / (1 if row.get("per_device", True) else devices)
    accumulation = int(row.get("gradient_accumulation_steps", 1))
    par = row.get("parallelism", "single")
    sharded = par in ("fsdp", "deepspeed-zero2", "deepspeed-zero3")
    trainable_bytes = None
    if row["method"] == "full":
        pure = "pure" in row.get("note", "").lower()
        trainable_bytes = 2 if pure else 4
        notes.append(f"full fine-tuning with {'16-bit' if pure else 'fp32 master'} weights and AdamW state")
    setup = replace(setup, geometry=replace(setup.geometry, gradient_accumulation_steps=accumulation))
    comm = 0.0
    if devices > 1 and par != "single":
        topo = topology(device, devices, 1, None)
        single = estimate(row["method"], setup)
        comm = comm_seconds_per_step(single, setup, par, topo) * (1 - COMM_OVERLAP)
        notes.append(f"{par} over {devices}: {comm:.2f} s of communication per step not hidden (planner.parallel)")
    return replace(case, method=row["method"], setup=setup, device=device, precision=precision, devices=devices,
                   parallelism=par, accumulation=accumulation, positions=positions, pairs=pairs, counted=counted,
                   optimizer=p.get("optimizer", "adamw_torch_foreach"), trainable_bytes=trainable_bytes,
                   shards=devices if sharded else 1, comm=comm, measured_tps=per_device, assumptions=notes)


def load_rows(path: Path = DATA) -> list[dict]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)["runs"]


def build_cases(path: Path = DATA) -> list[Case]:
    cases = [_case(r) for r in load_rows(path)]
    assign_split(cases)
    return cases


def stratum(c: Case) -> tuple:
    family = c.id.split("-")[0] + ("-" + c.id.split("-")[1] if c.id.startswith("fms-") else "")
    return family, c.gpu, c.method


def assign_split(cases: list[Case]) -> None:
    """Deterministic half split of the hf cases, stratified by source family × GPU × method: within a stratum (rows
    sorted by id) alternately fit, held-out, fit, ...; strata of one row alternate among themselves (by id)."""
    hf = [c for c in cases if c.group == "hf"]
    strata: dict[tuple, list[Case]] = {}
    for c in sorted(hf, key=lambda c: c.id):
        strata.setdefault(stratum(c), []).append(c)
    singles = []
    for key in sorted(strata):
        members = strata[key]
        if len(members) == 1:
            singles.append(members[0])
            continue
        for i, c in enumerate(members):
            c.split = "fit" if i % 2 == 0 else "held-out"
    for i, c in enumerate(sorted(singles, key=lambda c: c.id)):
        c.split = "fit" if i % 2 == 0 else "held-out"


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
