"""A LLaMA-Factory training config (https://github.com/hiyouga/LLaMA-Factory) as peftplan spec settings.

Every key that changes memory, time or the method is pinned to the value LLaMA-Factory runs with, its defaults
included (src/llamafactory/hparams/{model,data,finetuning}_args.py and transformers' TrainingArguments):
finetuning_type lora, lora_rank 8, lora_alpha 2 × rank, lora_dropout 0, lora_target all, cutoff_len 2048,
per_device_train_batch_size 8, gradient accumulation 1, AdamW, 3 epochs, val_size 0. Facts checked in its source:

- gradient checkpointing is ON unless disable_gradient_checkpointing is set
  (src/llamafactory/model/model_utils/checkpointing.py prepare_model_for_training); use_unsloth_gc offloads the
  checkpointed hidden states to the CPU, which peftplan's activation offloading does too.
- packing defaults to on for stage pt only, and neat_packing turns it on (hparams/parser.py, data_args.py).
- trainable parameters are cast to fp32 unless pure_bf16, BAdam, or a 16-bit base under ZeRO-3/FSDP
  (src/llamafactory/model/adapter.py init_adapter): adapters are fp32 as in peftplan's runtime, but full and freeze
  fine-tuning on one device or DDP keep fp32 weights, gradients and AdamW states (peftplan's full fine-tuning is
  pure bf16, as LLaMA-Factory's pure_bf16). Under DeepSpeed the engine casts the module back to 16-bit and keeps
  fp32 master weights, which the estimate counts.
- enable_liger_kernel applies Liger with its fused linear cross-entropy for stages pt and sft
  (model/model_utils/liger_kernel.py; model/loader.py passes require_logits only for other stages).
- quantization_bit 4 with bitsandbytes is NF4 with double quantization by default (hparams/model_args.py).
"""

from __future__ import annotations

from pathlib import Path

from .. import assumptions as A
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
from .llamafactory_data import read_data
from .result import Collector, gib, shown

TOOL = "LLaMA-Factory"

IGNORED = {k: v for keys, v in (
    (("do_train", "do_eval", "do_predict"), "which phases run"),
    (("output_dir", "overwrite_output_dir", "logging_dir", "plot_loss", "save_only_model", "save_strategy",
      "save_total_limit", "resume_from_checkpoint"), "outputs and checkpoints"),
    (("logging_steps", "report_to_swanlab", "use_swanlab", "swanlab_project", "swanlab_run_name",
      "include_num_input_tokens_seen", "include_effective_tokens_per_second", "include_mfu"), "logging"),
    (("overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size", "tokenized_path",
      "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
      "dataloader_persistent_workers", "buffer_size"), "data loading"),
    (("per_device_eval_batch_size", "eval_strategy", "evaluation_strategy", "eval_steps", "compute_accuracy",
      "predict_with_generate", "eval_on_each_dataset", "metric_for_best_model", "load_best_model_at_end"),
     "evaluation (its batches are smaller than training's)"),
    (("ddp_timeout", "ddp_find_unused_parameters", "ddp_backend"), "launcher"),
    (("weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon"), "the update rule: no memory"),
    (("warmup_steps",), "the schedule (peftplan takes training.warmup_ratio)"),
    (("template", "train_on_prompt", "mask_history", "tool_format", "default_system"),
     "the prompt format and which tokens count in the loss, not memory (peftplan renders instruction data with its "
     "own prompt and chat data with the tokenizer's chat template)"),
    (("use_fast_tokenizer", "split_special_tokens", "add_tokens", "add_special_tokens", "new_special_tokens_config"),
     "tokenizer only"),
    (("cache_dir", "model_revision", "low_cpu_mem_usage", "hf_hub_token", "ms_hub_token", "om_hub_token",
      "infer_backend", "infer_dtype", "offload_folder", "use_kv_cache", "quantization_device_map"),
     "loading and inference"),
    (("use_rslora", "loraplus_lr_ratio", "loraplus_lr_embedding", "create_new_adapter"),
     "the adapter's scaling and learning rates: no memory"),
    (("pissa_init", "pissa_iter", "pissa_convert"), "PiSSA initialises the adapter by SVD at the start: the same "
                                                    "adapter and training memory"),
    (("moe_aux_loss_coef", "rope_scaling", "train_from_scratch", "print_param_status", "use_reentrant_gc",
      "upcast_lmhead_output", "torch_compile", "flash_attn_cross_entropy", "disable_shuffling", "plot_loss",
      "use_v1_kernels"), "no effect on the estimate's terms"),
) for k in keys}
OPTIMIZER_EXTRAS = ("galore_", "apollo_", "badam_", "freeze_")


def read(data: dict, lines: dict[str, int], config: Path, *, model: str | None, out_dir: Path) -> Collector:
    c = Collector(TOOL, data, lines)
    resolved = base_model(c, "model_name_or_path", c.get("model_name_or_path"), model)
    shape = resolved.shape if resolved is not None else None
    stage = str(c.get("stage", "sft"))
    if stage not in ("sft", "pt"):
        unknown_stage(c, "stage", stage, "stage")
    _precision(c)
    _method(c, shape)
    _geometry(c, stage)
    _attention_and_loss(c, stage)
    _distributed(c, config)
    _schedule(c)
    _fp32_trainables(c, shape)
    read_data(c, config, out_dir, stage)
    _optimizer_variants(c, shape)
    packed_flash(c)
    if c.has("trust_remote_code"):
        c.skip("trust_remote_code", "not carried over: the generated project runs no code from the hub unless you set "
                                    "model.trust_remote_code = true yourself (models transformers has built in do not "
                                    "need it)")
    if c.has("report_to"):
        wanted = c.get("report_to")
        wanted = [wanted] if isinstance(wanted, str) else wanted if isinstance(wanted, list) else []
        kept = [w for w in dict.fromkeys(str(x) for x in wanted) if w in ("tensorboard", "wandb", "mlflow")]
        c.set("logging.report_to", kept, "report_to")
        dropped = [w for w in wanted if str(w) not in kept and str(w) != "none"]
        if dropped:
            c.skip("report_to", f"{shown(dropped)}: trackers peftplan does not report to", value=dropped)
    if c.has("run_name"):
        c.set("logging.run_name", str(c.get("run_name"))[:128], "run_name")
    return c


def _precision(c: Collector) -> None:
    pure, bf16, fp16 = as_bool(c.get("pure_bf16")), as_bool(c.get("bf16")), as_bool(c.get("fp16"))
    if pure or bf16:
        c.set("model.dtype", "bfloat16", "pure_bf16" if pure else "bf16")
    elif fp16:
        c.set("model.dtype", "float16", "fp16")
    else:
        c.set("model.dtype", "auto", "(neither bf16 nor fp16)", "LLaMA-Factory infers bf16, else fp16, else fp32 "
                                                               "from the device")


def _method(c: Collector, shape) -> None:
    kind = str(c.get("finetuning_type", "lora"))
    bits, how = c.get("quantization_bit"), str(c.get("quantization_method", "bitsandbytes")).lower()
    bits = as_int(c, "quantization_bit", bits, minimum=1) if bits is not None else None
    dora = bool(as_bool(c.get("use_dora")))
    if kind == "oft" or kind not in ("lora", "full", "freeze"):
        c.problem("finetuning_type", f"{shown(kind)!r} is not a method peftplan plans: lora (LoRA, QLoRA, DoRA, "
                                     "QDoRA), full, or freeze (estimated as full)")
        return
    if bits is not None and kind != "lora":
        c.problem("quantization_bit", "LLaMA-Factory trains a quantized model with LoRA only")
        return
    if kind in ("full", "freeze"):
        c.set("method.name", full_method(), f"finetuning_type: {kind}")
        if kind == "freeze":
            layers = c.get("freeze_trainable_layers", 2)
            c.unsupported("finetuning_type", f"freeze trains the last {shown(layers)} layers only (LLaMA-Factory "
                                             "freeze_trainable_layers): estimated as full fine-tuning", "gradients",
                          "freeze tuning: gradients and optimizer state exist for the trainable layers only; the "
                          "estimate counts them for every parameter (an upper bound)")
        return
    quantized = _quantization(c, bits, how, shape)
    source = "finetuning_type: lora" + (" + quantization_bit: 4" if quantized else "") + (" + use_dora" if dora else "")
    c.set("method.name", adapter_method(quantized, dora), source)
    _adapter(c, shape)


def _quantization(c: Collector, bits: int | None, how: str, shape) -> bool:
    """Whether LoRA trains on a 4-bit NF4 base (QLoRA / QDoRA); other quantizations are mapped or said to differ."""
    quantized = False
    if bits == 4 and how in ("bitsandbytes", "bnb"):
        quantized = True
        if str(c.get("quantization_type", "nf4")).lower() == "fp4":
            c.skip("quantization_type", "FP4 stores 4 bits per weight as NF4 does: estimated as NF4")
        if as_bool(c.get("double_quantization")) is False:
            c.differ("quant_constants", "double_quantization: false keeps an fp32 absmax per 64 weights (0.5 bit per "
                                        "weight) where the estimate counts double quantization's ≈0.13 bit",
                     "double_quantization")
    elif bits == 8 and how in ("bitsandbytes", "bnb"):
        eight_bit_base(c, "quantization_bit", shape)
    elif bits is not None:
        c.unsupported("quantization_bit", f"{bits}-bit {how} quantization is not one peftplan plans (bitsandbytes "
                                          "4-bit NF4): estimated as LoRA on the 16-bit base", "weights",
                      f"{bits}-bit {how} weights are smaller than the 16-bit weights the estimate counts")
    return quantized


def _adapter(c: Collector, shape) -> None:
    """The adapter's rank, alpha, dropout, target modules and fully trained extra modules."""
    rank = c.get("lora_rank")
    rank = as_int(c, "lora_rank", rank) if rank is not None else None
    if rank is None:
        c.default("method.rank", 8)
    else:
        c.set("method.rank", rank, "lora_rank")
    alpha = c.get("lora_alpha")
    if alpha is not None:
        c.set("method.alpha", as_float(c, "lora_alpha", alpha), "lora_alpha")
    else:
        c.default("method.alpha", float((rank or 8) * 2), "LLaMA-Factory's default: twice the rank")
    dropout = c.get("lora_dropout")
    if dropout is not None:
        c.set("method.dropout", as_float(c, "lora_dropout", dropout), "lora_dropout")
    else:
        c.default("method.dropout", 0.0)
    target = c.get("lora_target", "all")
    names = [t.strip() for t in target.split(",") if t.strip()] if isinstance(target, str) else \
        [str(t) for t in target] if isinstance(target, list) else []
    if names == ["all"]:
        c.set("method.target_modules", "all-linear", "lora_target: all" if c.has("lora_target")
              else "(LLaMA-Factory default: all)", "every linear module but the output head")
    elif names:
        c.set("method.target_modules", names, "lora_target")
    else:
        c.problem("lora_target", f"must be module names separated by commas, or all (got {shown(target)})")
    if c.has("additional_target") or as_bool(c.get("resize_vocab")):
        targets = c.get("additional_target")
        if targets is None:
            targets, key = ["embed_tokens", "lm_head"], "resize_vocab"
        else:
            targets, key = [t.strip() for t in str(targets).split(",")], "additional_target"
        optim = c.mapped.get("training.optimizer")
        modules_to_save(c, key, targets, shape, optim.value if optim else None)


def _geometry(c: Collector, stage: str) -> None:
    seq = c.get("cutoff_len")
    if seq is None:
        c.default("data.seq_len", 2048)
    else:
        c.set("data.seq_len", as_int(c, "cutoff_len", seq), "cutoff_len")
    packing, neat = as_bool(c.get("packing")), as_bool(c.get("neat_packing"))
    if neat:
        c.set("data.packing", True, "neat_packing", "packing without attention across examples (the same memory)")
    elif packing is not None:
        c.set("data.packing", packing, "packing")
    else:
        c.default("data.packing", stage == "pt", "on for stage pt only")
    mb = c.get("per_device_train_batch_size")
    if mb is None:
        c.default("training.micro_batch_size", 8, "transformers' TrainingArguments default")
    else:
        c.set("training.micro_batch_size", as_int(c, "per_device_train_batch_size", mb), "per_device_train_batch_size")
    gas = c.get("gradient_accumulation_steps")
    if gas is None:
        c.default("training.gradient_accumulation_steps", 1)
    else:
        c.set("training.gradient_accumulation_steps", as_int(c, "gradient_accumulation_steps", gas),
              "gradient_accumulation_steps")
    off = as_bool(c.get("disable_gradient_checkpointing"))
    c.get("gradient_checkpointing")  # transformers' own switch: LLaMA-Factory enables checkpointing itself
    c.set("training.gradient_checkpointing", not off, "disable_gradient_checkpointing" if off is not None else
          "(LLaMA-Factory default: on)", "" if off else "LLaMA-Factory enables it unless "
                                                        "disable_gradient_checkpointing is set")
    if as_bool(c.get("use_unsloth_gc")) and not off:
        c.set("training.activation_offloading", True, "use_unsloth_gc",
              "checkpointed hidden states kept on the CPU, as peftplan's runtime can")


def _attention_and_loss(c: Collector, stage: str) -> None:
    attn = str(c.get("flash_attn", "auto")).lower()
    mapped = {"disabled": "eager", "eager": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
              "fa3": "flash_attention_2"}.get(attn)
    if mapped:
        c.set("training.attention", mapped, f"flash_attn: {attn}",
              "FlashAttention 3 saves the same tensors as 2" if attn == "fa3" else "")
    elif attn != "auto":
        c.skip("flash_attn", f"attention {shown(attn)} is not one peftplan runs", "not supported")
    if as_bool(c.get("shift_attn")):
        c.unsupported("shift_attn", "LongLoRA's shifted sparse attention is not one peftplan runs")
    liger = as_bool(c.get("enable_liger_kernel"))
    if liger and stage in ("sft", "pt"):
        c.set("training.loss", "chunked", "enable_liger_kernel", "Liger's fused linear cross-entropy: never tokens × "
                                                                 "vocabulary logits")
        c.differ("activations", "enable_liger_kernel also swaps in Liger's RMSNorm, SwiGLU and RoPE, which save less "
                                "for backward than the ops the estimate counts (an upper bound)", "enable_liger_kernel")
    else:
        c.set("training.loss", "full", "(no enable_liger_kernel)", "transformers' loss over fp32 logits, as "
                                                                    "LLaMA-Factory runs it")
    if as_bool(c.get("upcast_layernorm")):
        c.differ("weights", "upcast_layernorm keeps the norm weights in fp32 (2 more bytes per norm weight: "
                            "a few MiB)", "upcast_layernorm")
    if as_bool(c.get("use_unsloth")):
        c.unsupported("use_unsloth", "Unsloth's patched model is not one peftplan runs", "activations",
                      "use_unsloth: Unsloth's fused LoRA kernels, offloaded checkpointing and chunked loss keep less "
                      "than the estimate counts (an upper bound)")
    if c.has("mixture_of_depths"):
        c.unsupported("mixture_of_depths", "mixture-of-depths layers are not an architecture peftplan estimates")


def _distributed(c: Collector, config: Path) -> None:
    if c.has("deepspeed"):
        deepspeed(c, "deepspeed", c.get("deepspeed"), config)
    elif c.has("fsdp"):
        c.set("training.parallelism", fsdp_settings(c, "fsdp", c.get("fsdp"), c.get("fsdp_config") or {}), "fsdp")


def _fp32_trainables(c: Collector, shape) -> None:
    """init_adapter casts trained full/freeze parameters to fp32 unless pure_bf16, BAdam, ZeRO-3 or FSDP."""
    full = c.mapped.get("method.name")
    engine = c.has("deepspeed") or c.has("fsdp")  # DeepSpeed casts back to 16-bit with fp32 master weights, as counted
    if full and full.value == full_method() and not as_bool(c.get("pure_bf16")) and not as_bool(c.get("use_badam")) \
            and not engine:
        optim = c.mapped.get("training.optimizer")
        kind, states = A.OPTIMIZER_STATES.get(optim.value if optim else "adamw_torch", ("param", 2))
        extra = 2 + 2 + (2 * states if kind == "param" else 0)
        c.differ("weights", f"LLaMA-Factory casts the trained parameters to fp32 (no pure_bf16): fp32 weights, "
                            f"gradients{' and AdamW states' if kind == 'param' else ''} — {extra} bytes per parameter "
                            "more than the estimate's pure-bf16 full fine-tuning"
                 + ("" if shape is None else f", ≈ {gib(extra * shape.parameters)}"),
                 "finetuning_type")


def _schedule(c: Collector) -> None:
    def pin(key, their, conv, default):
        value = c.get(their)
        if value is None:
            if default is not None:
                c.default(key, default, "transformers' TrainingArguments default")
        else:
            c.set(key, conv(c, their, value), their)

    pin("training.learning_rate", "learning_rate", as_float, 5e-5)
    pin("training.epochs", "num_train_epochs", as_float, 3.0)
    pin("training.warmup_ratio", "warmup_ratio", as_float, None)
    steps = c.get("max_steps")
    if steps is not None and str(steps).strip() not in ("-1", "0"):
        c.set("training.max_steps", as_int(c, "max_steps", steps), "max_steps")
    if c.has("seed"):
        c.set("training.seed", as_int(c, "seed", c.get("seed"), minimum=0), "seed")
    if c.has("save_steps"):
        save = c.get("save_steps")
        if isinstance(save, int) and not isinstance(save, bool) and save >= 1:
            c.set("training.save_steps", save, "save_steps")
        else:
            c.skip("save_steps", "a fraction of the run: peftplan's save_steps counts steps")
    optimizer(c, "optim", c.get("optim", "adamw_torch"), default=not c.has("optim"))
    scheduler(c, "lr_scheduler_type", c.get("lr_scheduler_type", "linear"), default=not c.has("lr_scheduler_type"))


def _optimizer_variants(c: Collector, shape) -> None:
    notes = {
        "use_galore": ("GaLore", "optimizer", "GaLore keeps AdamW states of the rank-r projected gradients (and, "
                       "layer-wise, never all gradients at once): the estimate's full AdamW states and gradients are "
                       "an upper bound"),
        "use_apollo": ("APOLLO", "optimizer", "APOLLO keeps low-rank auxiliary states instead of AdamW's: the "
                       "estimate's optimizer state is an upper bound"),
        "use_badam": ("BAdam", "optimizer", "BAdam updates one block of layers at a time (states and gradients for "
                      "that block only, 16-bit weights): the estimate's gradients and optimizer are an upper bound"),
        "use_adam_mini": ("Adam-mini", "optimizer", "Adam-mini keeps one second-moment value per block: about half "
                          "of AdamW's states"),
        "use_muon": ("Muon", "optimizer", "Muon keeps one momentum state for matrices instead of AdamW's two"),
        "use_llama_pro": ("LLaMA Pro", "weights", "LLaMA Pro trains added (expanded) blocks only: the model and its "
                          "trained part differ from the estimate's"),
    }
    for key, (name, term, text) in notes.items():
        if as_bool(c.get(key)):
            c.unsupported(key, f"{name} is not a method peftplan runs", term, text)
    for key in list(c.data):
        if key.startswith(OPTIMIZER_EXTRAS) and key not in c.read:
            c.skip(key, f"a setting of {key.split('_')[0]} (see its use_ flag or finetuning_type)")
