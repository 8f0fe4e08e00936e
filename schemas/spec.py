"""The user's spec: pydantic models of every key (docs/spec.md is generated from them).

One source of truth per key: its type, its allowed values and one description, which feeds the
JSON Schema (`peftplan schema`, `schemas/spec.schema.json`) and the messages of `peftplan validate`.
Every table forbids unknown keys. A key left out is `None` and the planner chooses it, saying so.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

MethodName = Literal["full", "lora", "qlora", "dora", "qdora"]
METHOD_NAMES: tuple[str, ...] = ("full", "lora", "qlora", "dora", "qdora")
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Parallelism = Literal["auto", "single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]


class _Table(BaseModel):
    # strict: `true` is not a batch size and "8" is not a rank; no inf/nan in any number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Table):
    name: str = Field(min_length=1, description="Catalog id (`peftplan models`), hub id present in the local Hugging Face cache, a local model directory, or a path to a config.json.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Dtype of the non-quantized weights and of compute. `auto`: bfloat16 where the device supports it, float16 otherwise, float32 on CPU.")
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code from the hub to run when it is loaded. Off unless you trust the repository.")


DataFormat = Literal["auto", "chat", "sharegpt", "instruction", "completion", "text"]


def _paths(value: object) -> object:
    """A file path, or a non-empty list of them (one error line either way, not one per union member)."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value
    raise PydanticCustomError("data_paths", "must be a file path or a non-empty list of file paths")


Paths = Annotated[object, PlainValidator(_paths), WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})]


class DataSource(_Table):
    """One `[[data.sources]]` table: a data file with its own format and sampling weight."""

    path: str = Field(min_length=1, description="A data file: .jsonl, .json, .csv, .parquet or .txt. Relative paths are relative to the spec file.")
    format: DataFormat | None = Field(None, description="This file's record layout. Default: data.format (`auto`: detected from the file's first record).")
    weight: float = Field(1.0, gt=0, le=1000, description="Copies of each of this file's records per epoch: 2.0 = every record twice, 0.5 = a seeded random half (rounded half up), 1.5 = all once and a seeded half twice. Held-out records are never repeated.")


class DataSpec(_Table):
    num_examples: int | None = Field(default=None, ge=1, le=10**12, description="How many training examples. Needed for time, cost and steps per epoch.")
    seq_len: int | None = Field(default=None, ge=1, le=2**22, description="Maximum tokens per training sequence: what a batch row is padded or packed to. Default: 2048, capped at the model's maximum.")
    avg_tokens: int | None = Field(default=None, ge=1, le=2**22, description="Mean tokens per example, for time estimates. Default: seq_len (every row full).")
    path: Paths | None = Field(default=None, description="Training data: a file or a list of files (.jsonl, .json, .csv, .parquet, or .txt: plain text, documents separated by blank lines), or a hub dataset name when online. Each file's format is detected on its own, so formats may be mixed. Optional for plan/estimate; required for generate/run unless [[data.sources]] is given.")
    sources: Annotated[list[DataSource], Field(min_length=1)] | None = Field(None, description="Data files as tables with a path, an optional format and an optional sampling weight: [[data.sources]] path = \"chat.jsonl\" weight = 2.0. Used together with data.path when both are set.")
    eval_path: Paths | None = Field(default=None, description="Held-out evaluation data: a file or a list of files, in any format above. When set, eval_fraction is not used.")
    format: DataFormat = Field("auto", description="Record layout: chat (messages), sharegpt (conversations with from/value), instruction (instruction/input/output), completion (prompt/completion) or text. `auto` detects it from each file's first record; .txt files are text.")
    roles: dict[str, Literal["system", "user", "assistant", "tool", "tool_call"]] | None = Field(None, description="Role names in chat/sharegpt data mapped to chat roles, added to the defaults (human/user → user, gpt/assistant/model → assistant, system, tool/observation/function → tool, function_call → tool_call: an assistant turn that calls a tool), e.g. {bot = \"assistant\"}.")
    txt_split: Literal["blank_line", "line"] = Field("blank_line", description="How .txt files split into examples: `blank_line` (documents separated by one or more blank lines) or `line` (every non-blank line).")
    packing: bool | None = Field(None, description="Pack several examples into each seq_len row instead of padding. Default: chosen by the planner.")
    eval_fraction: float | None = Field(default=None, ge=0, lt=1, description="Fraction of examples held out for evaluation (not used when eval_path is set). Default: chosen by the planner.")


class HardwareSpec(_Table):
    gpu: str = Field(min_length=1, description="Device name, matched loosely against the catalog (`peftplan gpus`): `A100-80GB`, `a100 80gb`, `NVIDIA A100-SXM4-80GB`. `cpu` trains on the CPU.")
    memory_gib: float | None = Field(default=None, gt=0, le=2**20, description="Memory per device in GiB. Required when `gpu` is not in the catalog; for `cpu` it defaults to this machine's RAM.")
    count: int = Field(default=1, ge=1, le=2**16, description="Devices per node.")
    nodes: int = Field(default=1, ge=1, le=2**16, description="Number of nodes (machines).")
    network_gbps: float | None = Field(default=None, gt=0, le=10**6, description="Bandwidth between nodes in GB/s per node (multi-node runs). Default: 12.5 (100 Gb/s Ethernet).")
    tflops: float | None = Field(default=None, ge=0.001, le=10**6, description="Dense 16-bit peak TFLOPS of one device (fp32 for `cpu`), for the time estimate of a device that is not in the catalog, of the CPU, or to override the catalog's figure.")
    price_per_hour: float | None = Field(default=None, ge=0, le=10**6, description="Your price in US dollars for one device-hour, overriding the catalog's typical price (needed for a cost estimate of a device not in the catalog).")
    price_usd_per_hour: float | None = Field(default=None, ge=0, le=10**6, description="The earlier name of price_per_hour (still accepted; set only one of them).")


class MethodSpec(_Table):
    name: Literal["auto", "full", "lora", "qlora", "dora", "qdora"] = Field("auto", description="Fine-tuning method. `auto` lets the planner choose.")
    rank: int | None = Field(default=None, ge=1, le=2**16, description="LoRA rank r of the adapter matrices A (r x in) and B (out x r).")
    alpha: float | None = Field(default=None, ge=1e-6, le=10**6, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Dropout applied to the adapter's input (LoRA family only).")
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] | None = Field(None, description="Modules that get adapters: `all-linear` (every linear layer but the output head) or a list of module names such as [\"q_proj\", \"v_proj\"].")


class TrainingSpec(_Table):
    micro_batch_size: int | None = Field(default=None, ge=1, le=2**16, description="Sequences per device per forward/backward pass.")
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=2**16, description="Micro-batches accumulated before each optimizer step.")
    gradient_checkpointing: bool | None = Field(None, description="Recompute each decoder layer in the backward pass instead of storing its activations.")
    optimizer: Optimizer | None = Field(None, description="Optimizer: 32-bit AdamW (adamw_torch), 8-bit AdamW from bitsandbytes (adamw_8bit), their paged variants, or plain SGD.")
    attention: Attention | None = Field(None, description="Attention implementation: sdpa (PyTorch fused), eager (materializes the seq x seq matrix) or flash_attention_2.")
    epochs: float | None = Field(default=None, ge=1e-6, le=10**4, description="Passes over the training data.")
    learning_rate: float | None = Field(default=None, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] | None = Field(None, description="Learning-rate schedule after warmup.")
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1, description="Fraction of steps spent warming the learning rate up from zero.")
    max_steps: int | None = Field(default=None, ge=1, le=10**12, description="Stop after this many optimizer steps (overrides epochs).")
    parallelism: Parallelism = Field("auto", description="How several devices share the run: single (one device), ddp (each holds everything), fsdp (full shard), deepspeed-zero2 / deepspeed-zero3. `auto` lets the planner choose.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed, set before the adapter is created.")
    save_steps: int | None = Field(default=None, ge=1, le=10**12, description="Checkpoint every N optimizer steps.")
    loss: Literal["chunked", "full"] | None = Field(None, description="How the loss is computed. `chunked` (the default): the output head and cross-entropy run a chunk of tokens at a time and never hold tokens × vocabulary logits (Liger's fused kernel on CUDA when installed, a PyTorch implementation elsewhere). `full`: transformers' own loss over the full fp32 logits.")
    activation_offloading: bool | None = Field(None, description="Move the checkpointed layer inputs to host memory during the forward pass and back for the backward (CUDA, with gradient checkpointing). Default: the planner turns it on only when it makes a plan fit or allows a much larger micro-batch, and states its time cost.")


class ObjectiveSpec(_Table):
    priority: Literal["balanced", "quality", "memory", "speed", "cost"] = Field("balanced", description="What the planner optimizes when several candidates fit.")
    max_hours: float | None = Field(default=None, gt=0, le=10**6, description="Reject plans whose estimated time exceeds this many hours.")
    budget_usd: float | None = Field(default=None, gt=0, le=10**12, description="Reject plans whose estimated cost exceeds this many US dollars.")


Tracker = Literal["tensorboard", "wandb", "mlflow"]


class LoggingSpec(_Table):
    report_to: list[Tracker] = Field(default_factory=list, max_length=3, description="Experiment trackers the run reports to through the transformers Trainer's integrations: tensorboard (event files in outputs/tensorboard; works offline), wandb (Weights & Biases; offline mode when HF_HUB_OFFLINE is set) and mlflow (a local store, outputs/mlflow.db, unless MLFLOW_TRACKING_URI is set). Empty (the default): outputs/metrics.jsonl only. wandb and mlflow are opt-in: pip install wandb / mlflow.")
    run_name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$", description="The run's name in the trackers. Default: the project folder's name.")

    @field_validator("report_to")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("lists a tracker twice")
        return v


class Spec(_Table):
    """A peftplan spec: what to fine-tune, on how much data, on which hardware."""

    model: ModelSpec = Field(description="The base model.")
    data: DataSpec = Field(DataSpec(), description="How much data, and where it is.")
    hardware: HardwareSpec = Field(description="The devices you have or will rent.")
    method: MethodSpec = Field(MethodSpec(), description="The fine-tuning method and its adapter settings.")
    training: TrainingSpec = Field(TrainingSpec(), description="Batch geometry, optimizer and schedule.")
    objective: ObjectiveSpec = Field(ObjectiveSpec(), description="What to optimize when several plans fit.")
    logging: LoggingSpec = Field(LoggingSpec(), description="Experiment tracking: TensorBoard, Weights & Biases, MLflow.")


def json_schema() -> dict:
    """The spec's JSON Schema, as editors (taplo / Even Better TOML) and `peftplan schema` use it."""
    schema = Spec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
