"""An axolotl config (https://github.com/axolotl-ai-cloud/axolotl) as peftplan spec settings.

Every key that changes memory, time or the method is pinned to the value axolotl runs with, its own defaults
included (src/axolotl/utils/schemas/config.py, training.py, peft.py): gradient checkpointing off, micro-batch 1,
sequence_len 512, no packing, AdamW (fused), val_set_size 0. Facts about what axolotl does, checked in its source:

- precision: `bf16: auto` is bf16 where the GPU supports it, else fp16; neither bf16 nor fp16 (nor 8-bit) is fp32
  (src/axolotl/utils/config/__init__.py resolve_dtype).
- QLoRA: NF4 with double quantization, compute and storage dtype the training dtype
  (src/axolotl/loaders/model.py _set_quantization_config). Norms and embeddings are upcast to fp32 for
  prepare_model_for_kbit_training and converted back to the training dtype right after whenever an adapter is set
  (ModelLoader._configure_embedding_dtypes): the steady state is the 16-bit non-quantized weights peftplan's runtime
  keeps, so nothing differs there.
- `lora_target_linear: true` adds every linear module but the output head to lora_target_modules
  (src/axolotl/loaders/adapter.py find_all_linear_names): peftplan's "all-linear".
- the loss is transformers' own over full logits unless a plugin fuses it: Liger with
  liger_fused_linear_cross_entropy, or Cut Cross Entropy (on by default once its plugin is listed,
  src/axolotl/integrations/cut_cross_entropy/args.py).
"""

from __future__ import annotations

from pathlib import Path

from .axolotl_data import read_data
from .common import (
    adapter_method,
    as_bool,
    as_float,
    as_int,
    base_model,
    deepspeed,
    eight_bit_base,
    fsdp_settings,
    full_method,
    modules_to_save,
    optimizer,
    packed_flash,
    scheduler,
    unknown_stage,
)
from .result import Collector, shown

TOOL = "axolotl"

IGNORED = {
    "model_type": "the loader class: no effect on memory", "tokenizer_type": "tokenizer only",
    "tokenizer_config": "tokenizer only", "base_model_config": "read from base_model here",
    "is_llama_derived_model": "model family hint", "is_mistral_derived_model": "model family hint",
    "is_qwen_derived_model": "model family hint", "is_falcon_derived_model": "model family hint",
    "strict": "config merging only", "output_dir": "where axolotl writes; the generated project has its own",
    "dataset_prepared_path": "axolotl's tokenized-data cache", "special_tokens": "tokenizer only",
    "chat_template": "the prompt format: peftplan renders chat data with the tokenizer's chat template",
    "eot_tokens": "tokenizer only", "train_on_inputs": "which tokens count in the loss, not memory (peftplan "
    "trains on the outputs only, as train_on_inputs: false)", "group_by_length": "batch order: time, not peak memory",
    "tf32": "matmul precision on Ampere+: speed only", "logging_steps": "logging", "evals_per_epoch": "evaluation "
    "schedule", "eval_steps": "evaluation schedule", "saves_per_epoch": "checkpoint schedule",
    "eval_table_size": "evaluation", "eval_max_new_tokens": "evaluation", "eval_table_max_new_tokens": "evaluation",
    "eval_sample_packing": "evaluation batches, which are smaller than training's", "eval_batch_size": "evaluation "
    "batches (training's peak is larger)", "debug": "logging", "weight_decay": "the update rule, not memory",
    "max_grad_norm": "clipping: no memory", "warmup_steps": "the schedule (peftplan takes training.warmup_ratio)",
    "early_stopping_patience": "when to stop", "resume_from_checkpoint": "where to resume", "local_rank": "set by "
    "the launcher", "lora_fan_in_fan_out": "weight layout (GPT-2's Conv1D): no memory", "lora_model_dir": "an "
    "adapter to start from: the same memory as a new one", "gradient_checkpointing_kwargs": "reentrant or not: the "
    "same tensors are kept", "pad_to_sequence_len": "rows padded to sequence_len: the peak estimate already counts "
    "full rows", "loss_watchdog_threshold": "a stop condition", "loss_watchdog_patience": "a stop condition",
    "hub_model_id": "where to upload", "hub_strategy": "where to upload", "save_safetensors": "file format",
    "save_total_limit": "checkpoints kept on disk", "save_strategy": "checkpoint schedule", "eval_strategy":
    "evaluation schedule", "save_first_step": "checkpoint schedule", "dataset_processes": "tokenizing workers",
    "dataloader_num_workers": "data loading workers", "dataloader_pin_memory": "host memory",
    "dataloader_prefetch_factor": "host memory", "shuffle_merged_datasets": "data order", "use_tensorboard": "logging",
    "peft_use_rslora": "the adapter's scaling: no memory", "loraplus_lr_ratio": "learning rates: no memory",
    "loraplus_lr_embedding": "learning rates: no memory", "experimental_skip_move_to_device": "load-time placement",
    "low_cpu_mem_usage": "load-time host memory", "torch_compile": "speed; memory close", "torch_compile_backend":
    "speed", "neftune_noise_alpha": "embedding noise: no memory", "lr_scheduler_kwargs": "the schedule's shape",
    "cosine_min_lr_ratio": "the schedule's shape", "ddp_timeout": "launcher", "embeddings_skip_upcast": "a transient "
    "at load time (the steady state is 16-bit either way)", "revision_of_model":
    "which revision to download", "gc_steps": "host garbage collection", "include_tokens_per_second": "logging",
    "ddp_find_unused_parameters": "launcher", "default_system_message": "the prompt",
}
for _k in ("wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "wandb_run_id",
           "mlflow_tracking_uri", "mlflow_experiment_name", "trackio_project_name", "trackio_run_name",
           "trackio_space_id", "comet_project_name", "comet_api_key"):
    IGNORED[_k] = "experiment tracking (peftplan's is [logging] report_to)"

LIGER = "axolotl.integrations.liger"
CCE = "axolotl.integrations.cut_cross_entropy"


def read(data: dict, lines: dict[str, int], config: Path, *, model: str | None, out_dir: Path) -> Collector:
    c = Collector(TOOL, data, lines)
    resolved = base_model(c, "base_model", c.get("base_model"), model)
    shape = resolved.shape if resolved is not None else None
    _precision(c)
    _method(c, shape)
    _geometry(c)
    _attention(c)
    _loss(c)
    _distributed(c, config)
    _schedule(c)
    read_data(c, config, out_dir)
    _unsupported(c, shape)
    packed_flash(c)
    if c.has("trust_remote_code"):
        c.skip("trust_remote_code", "not carried over: the generated project runs no code from the hub unless you set "
                                    "model.trust_remote_code = true yourself (models transformers has built in do not "
                                    "need it)")
    return c


def _precision(c: Collector) -> None:
    bf16, fp16 = c.get("bf16", "auto"), c.get("fp16")
    pure_bf16, pure_fp16 = as_bool(c.get("bfloat16")), as_bool(c.get("float16"))
    c.get("float32")
    if pure_bf16 or pure_fp16:
        c.set("model.dtype", "bfloat16" if pure_bf16 else "float16", "bfloat16" if pure_bf16 else "float16")
    elif str(bf16).lower() == "auto":
        c.set("model.dtype", "auto", "bf16: auto" if c.has("bf16") else "(axolotl default: bf16 auto)",
              "bfloat16 where the device supports it, else float16, as axolotl resolves it")
    elif as_bool(bf16):
        c.set("model.dtype", "bfloat16", "bf16")
    elif as_bool(fp16) or as_bool(c.get("load_in_8bit")):
        c.set("model.dtype", "float16", "fp16" if as_bool(fp16) else "load_in_8bit", "axolotl trains in fp16")
    else:
        c.set("model.dtype", "float32", "bf16: false, fp16 not set", "axolotl trains in fp32")


def _method(c: Collector, shape) -> None:
    adapter = c.get("adapter")
    four, eight = as_bool(c.get("load_in_4bit")), as_bool(c.get("load_in_8bit"))
    dora = bool(as_bool(c.get("peft_use_dora")))
    if adapter is None:
        if four or eight:
            c.problem("load_in_4bit" if four else "load_in_8bit", "needs an adapter (axolotl refuses a quantized base "
                                                                 "for full fine-tuning)")
        c.set("method.name", full_method(), "adapter not set", "full fine-tuning")
        return
    if adapter not in ("lora", "qlora"):
        c.problem("adapter", f"{shown(adapter)!r} is not an adapter peftplan plans: lora, qlora, or leave it out for "
                             "full fine-tuning")
        return
    if adapter == "qlora" and not four:
        c.problem("adapter", "qlora needs load_in_4bit: true (axolotl refuses it otherwise)")
    quantized = adapter == "qlora" or bool(four)
    if eight and not quantized:
        eight_bit_base(c, "load_in_8bit", shape)
    note = "DoRA (peft_use_dora)" if dora else ""
    if adapter == "lora" and four:
        note = "lora with load_in_4bit: transformers' default 4-bit (FP4, no double quantization), estimated as NF4"
    source = " + ".join(k for k, on in (("adapter", True), ("load_in_4bit", four), ("peft_use_dora", dora)) if on)
    c.set("method.name", adapter_method(quantized, dora), source, note)
    if c.has("lora_r"):
        c.set("method.rank", as_int(c, "lora_r", c.get("lora_r")), "lora_r")
    if c.has("lora_alpha"):
        c.set("method.alpha", as_float(c, "lora_alpha", c.get("lora_alpha")), "lora_alpha")
    dropout = as_float(c, "lora_dropout", c.get("lora_dropout")) if c.has("lora_dropout") else None
    if dropout is not None:
        c.set("method.dropout", dropout, "lora_dropout")
    else:
        c.default("method.dropout", 0.0, "axolotl sets lora_dropout to 0 when an adapter is given")
    targets, linear = c.get("lora_target_modules"), as_bool(c.get("lora_target_linear"))
    if linear:
        c.set("method.target_modules", "all-linear", "lora_target_linear: true",
              "every linear module but the output head" + (" (lora_target_modules adds nothing more)" if targets
                                                           else ""))
    elif targets:
        names = [targets] if isinstance(targets, str) else \
            [str(t) for t in targets] if isinstance(targets, list) else []
        if names:
            c.set("method.target_modules", names, "lora_target_modules")
        else:
            c.problem("lora_target_modules", f"must be a module name or a list of them (got {shown(targets)})")


def _pin(c: Collector, key: str, their: str, value, default) -> None:
    """The config's value for `their` key, or the tool's default when it is left out."""
    if value is None:
        c.default(key, default)
    else:
        c.set(key, value, their)


def _geometry(c: Collector) -> None:
    seq = c.get("sequence_len")
    _pin(c, "data.seq_len", "sequence_len", None if seq is None else as_int(c, "sequence_len", seq), 512)
    packing = as_bool(c.get("sample_packing"))
    _pin(c, "data.packing", "sample_packing", packing, False)
    mb = c.get("micro_batch_size")
    micro = as_int(c, "micro_batch_size", mb) if mb is not None else 1
    _pin(c, "training.micro_batch_size", "micro_batch_size", None if mb is None else micro, 1)
    gas, batch = c.get("gradient_accumulation_steps"), c.get("batch_size")
    if gas is not None:
        c.set("training.gradient_accumulation_steps", as_int(c, "gradient_accumulation_steps", gas),
              "gradient_accumulation_steps")
    elif batch is not None and micro:
        total = as_int(c, "batch_size", batch)
        if total:
            c.set("training.gradient_accumulation_steps", max(1, total // micro), "batch_size / micro_batch_size",
                  "as axolotl derives it (normalize_config)")
    else:
        c.default("training.gradient_accumulation_steps", 1)
    gc = c.get("gradient_checkpointing", False)
    offload = as_bool(c.get("activation_offloading"))
    if isinstance(gc, str) and gc.lower() in ("offload", "unsloth", "offload_disk"):
        c.set("training.gradient_checkpointing", True, f"gradient_checkpointing: {gc}")
        c.set("training.activation_offloading", True, f"gradient_checkpointing: {gc}",
              "checkpointed layer inputs kept in host memory, as peftplan's runtime can")
    else:
        on = as_bool(gc)
        c.set("training.gradient_checkpointing", bool(on), "gradient_checkpointing" if c.has("gradient_checkpointing")
              else "(axolotl default: false)")
    if offload or (isinstance(c.data.get("activation_offloading"), str)):
        c.set("training.activation_offloading", True, "activation_offloading",
              "axolotl offloads the saved activations to the CPU; with gradient checkpointing those are the layer "
              "inputs, which peftplan's runtime offloads too")


def _attention(c: Collector) -> None:
    chosen = None  # (attention, the key it came from)
    for key, value in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                       ("eager_attention", "eager"), ("flex_attention", "sdpa"), ("xformers_attention", "sdpa")):
        if as_bool(c.get(key)) and chosen is None:
            chosen = (value, key)
    names = {"flash": "flash_attention_2", "flash_attention_2": "flash_attention_2", "fa2": "flash_attention_2",
             "sdpa": "sdpa", "sdp": "sdpa", "eager": "eager", "flex": "sdpa", "flex_attention": "sdpa",
             "xformers": "sdpa"}
    for key in ("attention", "attn_implementation"):
        value = c.get(key)
        if value is None:
            continue
        low = str(value).lower()
        mapped = names.get(low) or ("flash_attention_2" if "flash" in low else None)
        if mapped is None:
            c.skip(key, f"attention {shown(value)} is not one peftplan runs", "not supported")
        elif chosen is None:
            chosen = (mapped, key)
        else:
            c.skip(key, f"{shown(value)}: the same saved tensors as {chosen[1]} ({chosen[0]})")
    if chosen:
        fused = chosen[0] == "sdpa" and chosen[1] in ("flex_attention", "xformers_attention")
        c.set("training.attention", chosen[0], chosen[1], "a fused kernel that saves no s×s scores, like sdpa"
              if fused else "")


def _loss(c: Collector) -> None:
    plugins = c.get("plugins") or []
    plugins = [str(p) for p in plugins] if isinstance(plugins, list) else [str(plugins)]
    liger = any(p.startswith(LIGER) for p in plugins)
    cce = any(p.startswith(CCE) for p in plugins)
    fused = None
    if liger and as_bool(c.get("liger_fused_linear_cross_entropy")):
        fused = "liger_fused_linear_cross_entropy"
    if cce and as_bool(c.get("cut_cross_entropy", True)) is not False:
        fused = fused or "Cut Cross Entropy plugin"
    if fused:
        c.set("training.loss", "chunked", fused, "the head and the loss never hold tokens × vocabulary logits")
    else:
        c.set("training.loss", "full", "(no fused-loss plugin)", "transformers' loss over fp32 logits, as axolotl "
                                                                  "runs it without Liger or Cut Cross Entropy")
    for key in ("liger_rms_norm", "liger_glu_activation", "liger_swiglu", "liger_rope", "liger_layer_norm"):
        if as_bool(c.get(key)) and liger:
            c.differ("activations", f"{key}: Liger's fused kernel saves less for backward than the PyTorch op the "
                                    "estimate counts (an upper bound)", key)
    if c.has("liger_cross_entropy") and not fused:
        c.differ("logits", "liger_cross_entropy fuses the loss but not the head: the 16-bit logits stay, without the "
                           "fp32 copies the estimate (loss = \"full\") counts", "liger_cross_entropy")
    for key in ("chunked_cross_entropy", "flash_attn_cross_entropy", "unsloth_cross_entropy_loss"):
        if as_bool(c.get(key)) and not fused:
            c.differ("logits", f"{key}: the cross-entropy runs without the fp32 copies of the logits; the estimate "
                               "(loss = \"full\") counts them: an upper bound", key)
    for p in plugins:
        if not (p.startswith(LIGER) or p.startswith(CCE)):
            c.skip("plugins", f"plugin {p}: not one peftplan's import knows; its effect on memory is not estimated",
                   "unknown", value=p)


def _distributed(c: Collector, config: Path) -> None:
    ds, fsdp, fsdp_cfg = c.get("deepspeed"), c.get("fsdp"), c.get("fsdp_config")
    version = c.get("fsdp_version") or (fsdp_cfg.get("fsdp_version") if isinstance(fsdp_cfg, dict) else None)
    parallelism = None
    if ds is not None:
        parallelism = deepspeed(c, "deepspeed", ds, config)
    elif fsdp is not None or isinstance(fsdp_cfg, dict):
        parallelism = fsdp_settings(c, "fsdp_config", fsdp, fsdp_cfg or {})
        c.set("training.parallelism", parallelism, "fsdp / fsdp_config")
        if str(version) == "1" or (version is None and fsdp is not None):
            c.differ("transient", "FSDP1 (fsdp_version 1, or the `fsdp: [full_shard, …]` form without a version, "
                                  "which the axolotl releases that wrote it ran as FSDP1); peftplan's runtime and "
                                  "estimate are FSDP2 (per-parameter sharding): the gathered buffers differ a little",
                     "fsdp_version")
        options = {k.removeprefix("fsdp_"): v for k, v in fsdp_cfg.items()} if isinstance(fsdp_cfg, dict) else {}
        if as_bool(options.get("activation_checkpointing")) and not c.has("gradient_checkpointing"):
            c.set("training.gradient_checkpointing", True, "fsdp_config.activation_checkpointing")
    for key in ("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size"):
        degree = c.get(key)
        if degree not in (None, 1, "1"):
            c.unsupported(key, f"{key} {shown(degree)} is not a parallelism peftplan plans", "activations",
                          f"{key} {shown(degree)} splits each sequence (or each layer) over devices: their per-device "
                          "activations are smaller than the estimate's")


def _schedule(c: Collector) -> None:
    if c.has("learning_rate"):
        c.set("training.learning_rate", as_float(c, "learning_rate", c.get("learning_rate")), "learning_rate")
    epochs = c.get("num_epochs")
    _pin(c, "training.epochs", "num_epochs", None if epochs is None else as_float(c, "num_epochs", epochs), 1.0)
    if c.has("max_steps"):
        c.set("training.max_steps", as_int(c, "max_steps", c.get("max_steps")), "max_steps")
    if c.has("warmup_ratio"):
        c.set("training.warmup_ratio", as_float(c, "warmup_ratio", c.get("warmup_ratio")), "warmup_ratio")
    if c.has("optimizer"):
        optimizer(c, "optimizer", c.get("optimizer"))
    else:
        optimizer(c, "optimizer", "adamw_torch_fused", default=True)
    if c.has("lr_scheduler"):
        scheduler(c, "lr_scheduler", c.get("lr_scheduler"))
    else:
        scheduler(c, "lr_scheduler", "cosine", default=True)
    if c.has("seed"):
        c.set("training.seed", as_int(c, "seed", c.get("seed"), minimum=0), "seed")
    save = c.get("save_steps")
    if isinstance(save, int) and not isinstance(save, bool) and save >= 1:
        c.set("training.save_steps", save, "save_steps")
    elif save is not None:
        c.skip("save_steps", "a fraction of the run: peftplan's save_steps counts steps")


def _unsupported(c: Collector, shape) -> None:
    optim = c.mapped.get("training.optimizer")
    if c.has("lora_modules_to_save"):
        modules_to_save(c, "lora_modules_to_save", c.get("lora_modules_to_save"), shape, optim.value if optim else None)
    if c.has("lora_target_parameters"):
        c.unsupported("lora_target_parameters", "adapters on fused expert parameters: peftplan adapts linear modules "
                                                "only", "adapter", "adapters on the experts' fused parameters are not "
                                                                   "in the estimate")
    if c.has("peft_layers_to_transform"):
        c.unsupported("peft_layers_to_transform", "adapters on some layers only: peftplan adapts every layer",
                      "adapter", "the estimate counts adapters (and their activations) in every layer: an upper bound")
    if c.has("unfrozen_parameters"):
        c.unsupported("unfrozen_parameters", "full fine-tuning of the matching parameters only: peftplan's full "
                                             "fine-tuning trains every parameter", "gradients",
                      "gradients and optimizer state for the frozen parameters are counted: an upper bound")
    if c.has("rl"):
        unknown_stage(c, "rl", c.get("rl"), "rl")
    if c.has("gptq"):
        c.unsupported("gptq", "a GPTQ base: peftplan quantizes with bitsandbytes NF4", "weights",
                      "GPTQ stores 4-bit weights with per-group scales; the estimate counts NF4's constants")
    quant = c.get("model_quantization_config")
    kwargs = c.get("model_quantization_config_kwargs") or {}
    if quant is not None:
        if isinstance(kwargs, dict) and as_bool(kwargs.get("dequantize")):
            c.skip("model_quantization_config", f"{shown(quant)} with dequantize: true: the checkpoint is de-quantized "
                                                "to 16-bit at load, the base the estimate counts")
            c.read.add("model_quantization_config_kwargs")
        else:
            c.unsupported("model_quantization_config", f"{shown(quant)}: a quantized base peftplan does not train",
                          "weights", f"{shown(quant)} weights are stored in fewer bytes than the estimate's")
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "unsloth_lora_mlp", "unsloth_lora_qkv",
                "unsloth_lora_o", "unsloth_rms_norm"):
        if as_bool(c.get(key)):
            c.differ("activations", f"{key}: a fused LoRA kernel that saves less for backward than the estimate "
                                    "counts (an upper bound)", key)
    if as_bool(c.get("use_kernels")):
        c.differ("activations", "use_kernels: kernels from the Hub replace some modules' forward (MoE experts, norms); "
                                "their saved tensors are not modelled", "use_kernels")
    if as_bool(c.get("s2_attention")):
        c.unsupported("s2_attention", "LongLoRA's shifted sparse attention is not one peftplan runs")
    for key in ("max_memory", "gpu_memory_limit", "device_map"):
        if c.has(key):
            c.unsupported(key, "a manual placement across devices and the CPU: peftplan plans whole devices")
