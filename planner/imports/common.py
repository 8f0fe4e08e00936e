"""What axolotl and LLaMA-Factory share: Hugging Face Trainer settings (optimizer names, schedules, precision),
DeepSpeed and FSDP configurations, values YAML leaves as strings, and the memory a setting peftplan cannot
reproduce would change (from the model's shapes).
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import assumptions as A
from ..methods import METHODS
from .result import Collector, gib, shown
from .source import find_file, read_json

# transformers' OptimizerNames (and axolotl's own) -> the spec's optimizer. Fused and apex AdamW keep the same two
# states as torch's AdamW; torchao's 8-bit AdamW keeps 8-bit blockwise states (blocks of 256) as bitsandbytes' does.
OPTIMIZERS = {
    "adamw_torch": "adamw_torch", "adamw_torch_fused": "adamw_torch", "adamw_hf": "adamw_torch",
    "adamw_apex_fused": "adamw_torch", "adamw_torch_xla": "adamw_torch", "adamw_torch_npu_fused": "adamw_torch",
    "adamw": "adamw_torch",
    "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "adamw_torch_8bit": "adamw_8bit",
    "ao_adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
    "paged_adamw": "paged_adamw_32bit",
    "sgd": "sgd",
}
# What the optimizers peftplan does not run keep per trainable parameter, for the note that says so.
OTHER_OPTIMIZERS = {
    "adafactor": "factored second moments (a row and a column vector per matrix) and no first moment by default: "
                 "far less than AdamW's two full states",
    "lion": "one state (momentum) instead of AdamW's two", "lion_8bit": "one 8-bit state instead of AdamW's two",
    "paged_lion_8bit": "one 8-bit paged state instead of AdamW's two", "lion_32bit": "one state instead of two",
    "adamw_torch_4bit": "4-bit AdamW states (half of 8-bit's)", "ao_adamw_4bit": "4-bit AdamW states",
    "ademamix": "three states instead of AdamW's two", "adopt_adamw": "AdamW's two states",
    "muon": "one momentum state for matrices (AdamW's two for the rest)",
    "schedule_free_adamw": "two states, like AdamW", "rmsprop": "one state instead of two",
    "adagrad": "one state instead of two",
}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant_with_warmup"}


def as_int(c: Collector, key: str, value, minimum: int = 1) -> int | None:
    """An integer setting (YAML may give "8"); a problem naming the key when it is not one."""
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str) and re.fullmatch(r"\s*[+]?\d+\s*", value):
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < minimum:
        c.problem(key, f"must be an integer ≥ {minimum} (got {shown(c.data.get(key.split('.')[0]))})")
        return None
    return value


def as_float(c: Collector, key: str, value) -> float | None:
    """A number; YAML 1.1 reads `2e-5` (no dot) as a string, which the tools themselves convert."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        c.problem(key, f"must be a number (got {shown(c.data.get(key.split('.')[0]))})")
        return None
    return float(value)


def as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def adapter_method(quantized: bool, dora: bool) -> str:
    """The adapter method with this base storage and DoRA or not (asked of the methods, never by name)."""
    return next(m.name for m in METHODS.values() if m.adapter and m.quantized == quantized and m.dora == dora)


def full_method() -> str:
    return next(m.name for m in METHODS.values() if not m.adapter)


def optimizer(c: Collector, key: str, name: str, *, default: bool = False) -> None:
    low = str(name).strip().lower()
    source = f"({c.tool} default: {name})" if default else f"{key}: {name}"
    if low in OPTIMIZERS:
        mapped = OPTIMIZERS[low]
        note = "" if mapped == low else f"{name} keeps the same state bytes as {mapped}"
        c.set("training.optimizer", mapped, source, note)
        if low in ("adamw_torch_8bit", "ao_adamw_8bit"):
            c.differ("optimizer", f"{name} is torchao's 8-bit AdamW; the estimate counts bitsandbytes' (the same "
                                  "state bytes: 8-bit blocks of 256); the generated project runs bitsandbytes'", key)
        return
    what = OTHER_OPTIMIZERS.get(low)
    c.unsupported(key, f"{name} is not an optimizer peftplan runs" + (f" ({what})" if what else ""), "optimizer",
                  f"{name}: the estimate counts AdamW's two states (adamw_torch) instead"
                  + (f"; {name} keeps {what}" if what else ""))
    c.set("training.optimizer", "adamw_torch", f"{key}: {name}", "closest optimizer peftplan runs")


def scheduler(c: Collector, key: str, name, *, default: bool = False) -> None:
    low = str(name).strip().lower()
    if low in SCHEDULERS:
        c.set("training.lr_scheduler", SCHEDULERS[low], f"({c.tool} default)" if default else key)
    elif not default:
        c.skip(key, f"schedule {shown(name)} is not one peftplan runs (cosine, linear, constant, "
                    "constant_with_warmup): the learning rate differs, memory and time do not")


# --- DeepSpeed and FSDP ----------------------------------------------------------------------------------------

def deepspeed(c: Collector, key: str, value, config: Path) -> str | None:
    """Set training.parallelism from a DeepSpeed config (a path to its JSON, or the JSON inline), with what its
    offloading changes; None when its ZeRO stage cannot be told."""
    ds = None
    if isinstance(value, dict):
        ds = value
    elif isinstance(value, str):
        found = find_file(value, config, "DeepSpeed config")
        if found is not None:
            ds = read_json(found, "DeepSpeed config")
    stage = offload_opt = offload_param = None
    if ds is not None:
        zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
        raw = zero.get("stage")
        stage = int(raw) if not isinstance(raw, bool) and str(raw).strip() in ("0", "1", "2", "3") else None
        offload_opt = _device(zero.get("offload_optimizer"))
        offload_param = _device(zero.get("offload_param"))
    elif isinstance(value, str):  # not found here: the file name tells the stage in both tools' bundled configs
        name = Path(value).name.lower()
        m = re.search(r"(?:zero|_z|^z|ds_z)[_-]?([0-3])", name)
        stage = int(m.group(1)) if m else None
        offload_opt = "cpu" if "offload" in name and "params" not in name else None
        offload_param = "cpu" if "offload_params" in name or "offload_all" in name or "cpuoffload_all" in name else None
        if stage is not None:
            c.assume(f"{key}: {shown(value)} is not readable here: ZeRO stage {stage} read from its file name"
                     + (" (and CPU offloading)" if offload_opt or offload_param else ""))
    if stage is None:
        c.unsupported(key, f"DeepSpeed config {shown(value)}: its ZeRO stage could not be read (file not found here "
                           "and not in its name); set training.parallelism yourself")
        return None
    c.read.add(key)
    if offload_opt:
        c.differ("optimizer", f"ZeRO offloads the optimizer state and fp32 master weights to {offload_opt}: the "
                              "estimate counts them on the device (upper bound)", key)
    if offload_param:
        c.differ("weights", f"ZeRO-3 offloads the parameters to {offload_param}: the estimate counts the sharded "
                            "weights on the device (upper bound)", key)
    if stage == 1:
        c.differ("gradients", "ZeRO-1 shards only the optimizer state: each device keeps all gradients, which the "
                              "estimate (as ZeRO-2) shards — their run needs (N−1)/N of the gradient bytes more", key)
    parallelism = ("ddp", "deepspeed-zero2", "deepspeed-zero2", "deepspeed-zero3")[stage]
    origin = "its file name" if ds is None else "the inline config" if isinstance(value, dict) else shown(value)
    c.set("training.parallelism", parallelism, key, f"ZeRO stage {stage} (from {origin})")
    return parallelism


def _device(section) -> str | None:
    if isinstance(section, dict) and str(section.get("device", "none")).lower() not in ("none", ""):
        return str(section.get("device"))
    return None


def fsdp_settings(c: Collector, key: str, strategy, options: dict) -> str:
    """FSDP through accelerate: what its options change against peftplan's FSDP2 full shard."""
    text = " ".join(str(s) for s in strategy) if isinstance(strategy, list) else str(strategy or "")
    opts = {k.removeprefix("fsdp_"): v for k, v in options.items()} if isinstance(options, dict) else {}
    sharding = str(opts.get("sharding_strategy", "")).upper()
    if "shard_grad_op" in text.lower() or sharding in ("SHARD_GRAD_OP", "2"):
        c.differ("weights", "SHARD_GRAD_OP keeps whole weights on every device; the estimate (full shard) shards "
                            "them", key)
    if "offload" in text.lower() or as_bool(opts.get("offload_params")):
        c.differ("weights", "FSDP offloads parameters (and their gradients and optimizer state) to the CPU: the "
                            "estimate counts their shards on the device (upper bound)", key)
    if as_bool(opts.get("reshard_after_forward")) is False:
        c.differ("transient", "reshard_after_forward: false keeps each layer's gathered weights from forward to "
                              "backward: more than the two gathered layers the estimate counts", key)
    return "fsdp"


# --- what settings peftplan cannot reproduce change, from the model's shapes --------------------------------------

def trainable_copy_bytes(params: int, optimizer_name: str | None, dtype_bytes: int = 2) -> int:
    """A trainable 16-bit copy of `params` parameters: the copy, its gradient, and the optimizer's states."""
    kind, states = A.OPTIMIZER_STATES.get(optimizer_name or "adamw_torch", ("param", 2))
    state = {"param": dtype_bytes, "fp32": 4, "int8": 1}[kind] * states
    return params * (dtype_bytes + dtype_bytes + state)


def modules_to_save(c: Collector, key: str, names, shape, optimizer_name: str | None) -> None:
    names = [names] if isinstance(names, str) else [str(n) for n in names] if isinstance(names, list) else []
    embed = {"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"}
    head = {"lm_head", "embed_out", "output"}
    params = 0
    if shape is not None:
        params += shape.vocab_size * shape.hidden_size * sum(1 for n in names if n in embed)
        params += shape.lm_head_params * sum(1 for n in names if n in head) if not shape.tie_embeddings else 0
    extra = trainable_copy_bytes(params, optimizer_name)
    amount = f"{params / 1e9:.2f}B parameters, ≈ {gib(extra)}" if params else "their parameters"
    c.unsupported(key, f"fully trained copies of {', '.join(names) or 'modules'} next to the adapter: peftplan "
                       f"trains adapters only", "adapter",
                  f"{shown(names)} trained in full ({amount}: a 16-bit copy, its gradient and the optimizer's "
                  "states) are not in the estimate")


def eight_bit_base(c: Collector, key: str, shape) -> None:
    linear = 0 if shape is None else shape.linear_params_per_layer * shape.num_layers
    saving = f" ≈ {gib(linear)}" if linear else ""
    c.unsupported(key, "an 8-bit (LLM.int8) base is not one peftplan plans: estimated as LoRA on the 16-bit base",
                  "weights", f"the decoder's linear weights are 1 byte each in the 8-bit base, 2 in the estimate: the "
                             f"estimate's weights are higher by one byte per linear weight{saving}")


def unknown_stage(c: Collector, key: str, value, what: str) -> None:
    c.unsupported(key, f"{shown(value)} training ({what}) is not supervised fine-tuning, the only kind peftplan "
                       "plans", "activations",
                  f"{shown(value)}: preference and RL training run more forward passes per example (chosen and "
                  "rejected sequences, a reference model or its adapter-disabled pass): the estimate is of "
                  "supervised fine-tuning only")


# --- the model and the data files ------------------------------------------------------------------------------

def base_model(c: Collector, key: str, name, override: str | None):
    """Resolve the config's model (or --model) through the catalog, a local path or the HF cache; the resolved
    model for the notes that need its shapes, None (with a problem) when it cannot be resolved."""
    from ...schemas import SpecError
    from ..resolve import resolve_model

    if override is None and (not isinstance(name, str) or not name.strip()):
        c.problem(key, "is missing: the config names no model")
        return None
    target = override or name
    try:
        model = resolve_model(target)
    except SpecError as exc:
        for p in exc.problems:
            hint = "" if override else (" — if it is a copy of a model peftplan knows, pass --model with that model "
                                        "(a catalog id, a local model folder or its config.json)")
            c.problem("--model" if override else key, p.message + hint)
        return None
    local = Path(target).expanduser()
    written = str(local.resolve()) if model.source == "config.json" else target
    note = "" if override is None else f"{key} {shown(name)} replaced by --model"
    c.set("model.name", written, key if override is None else "--model", note)
    return model


def data_entries(c: Collector, entries: list[tuple[str, str | None, str, str]], config: Path, out_dir: Path,
                 eval_files: list[str] | None = None) -> None:
    """Training files (path, format, where the path came from, where the format came from) as data.path /
    data.format, or [[data.sources]] when their formats differ. A file found here is written relative to the spec's
    folder; a hub dataset name is kept (read when the run starts)."""
    if not entries:
        return
    paths = [(_located(p, config, out_dir, c), fmt, src, fsrc) for p, fmt, src, fsrc in entries]
    formats = {fmt for _, fmt, _, _ in paths}
    sources = ", ".join(dict.fromkeys(src for _, _, src, _ in paths))
    if len(formats) == 1:
        c.set("data.path", paths[0][0] if len(paths) == 1 else [p for p, _, _, _ in paths], sources)
        fmt = formats.pop()
        if fmt is not None:
            c.set("data.format", fmt, ", ".join(dict.fromkeys(f for _, _, _, f in paths)))
    else:
        c.set("data.sources", [{"path": p, **({"format": f} if f else {})} for p, f, _, _ in paths], sources,
              "each file with its own format")
    if eval_files:
        located = [_located(p, config, out_dir, c) for p in eval_files]
        c.set("data.eval_path", located[0] if len(located) == 1 else located, "test_datasets / eval_dataset")


def _located(path: str, config: Path, out_dir: Path, c: Collector) -> str:
    """A data file as the spec names it: relative to the spec's folder when it is a local file (found here or named
    by an absolute path), a hub dataset name as it is."""
    import os

    found = find_file(path, config, "data file")
    target = found.resolve() if found is not None else Path(path) if Path(path).is_absolute() else None
    if found is None and not hub_id(path):
        c.assume(f"data file {shown(path if target is None else os.path.relpath(target, out_dir.resolve()), 120)} is "
                 "not found here: `peftplan generate` needs it there")
    if target is None:
        return path
    try:
        return os.path.relpath(target, out_dir.resolve())
    except ValueError:  # another drive (Windows)
        return str(target)


def hub_id(name: str) -> bool:
    """`org/name` with no file suffix: the rule runtime/data_files.py's looks_like_hub_id applies (the planner does
    not import the runtime)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).suffix


def packed_flash(c: Collector) -> None:
    """Packed micro-batches of several rows under flash-attention: the other tool runs flash-attn's variable-length
    kernel over each packed row; peftplan's runtime runs packed rows under flash_attention_2 one row per micro-batch
    (transformers would let examples attend to each other otherwise: planner/choose.py _geometries), so such a run
    is sdpa with a block-diagonal mask here, which the estimate counts."""
    packing, attention = c.mapped.get("data.packing"), c.mapped.get("training.attention")
    micro = c.mapped.get("training.micro_batch_size")
    if packing and packing.value and attention and attention.value == "flash_attention_2" and micro \
            and isinstance(micro.value, int) and micro.value > 1:
        c.set("training.attention", "sdpa", attention.source,
              f"packed micro-batches of {micro.value} rows: peftplan's runtime runs them under sdpa with a "
              "block-diagonal mask (flash_attention_2 takes packed rows one per micro-batch)")
        c.differ("activations", f"{attention.source}: flash-attention's variable-length kernel needs no attention "
                                "mask; the estimate counts sdpa's block-diagonal mask for the packed rows (a small "
                                "upper bound)", attention.source.split(":")[0])
