"""What each published run's stack ran, for benchmarks/published.py: the settings peftplan's Setup can express
(model, loss, attention, padding, activation offloading) and, as text, the differences it cannot.

Every value a source leaves out is taken from the row's `note` or the source's own config and written down with
the reason (the comparison's `assumptions` column); how the measured stack differs from peftplan's runtime
(transformers + peft + bitsandbytes under autocast, the chunked loss, 16-bit adapter inputs) goes in the
`differences` column. Nothing here tunes the estimator.
"""

from __future__ import annotations

import re

from peftplan.planner.catalog import find_model, match_model

# Hub ids catalog.match_model does not resolve, with the catalog entry of the same architecture (identical
# config.json shapes). Everything else (instruct/chat variants listed in the catalog, mirror organisations)
# resolves through match_model.
SAME_ARCHITECTURE = {
    # an intermediate pre-training checkpoint of the same model
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}

# The stack each source measured, by id prefix: (name, kind, how its loss is computed). Kind "hf" is peftplan's own
# stack (transformers + peft + bitsandbytes); only "hf" rows measured as allocated memory count as "close stack".
STACKS = {
    "torchtune-": ("torchtune", "torchtune", None),  # per row: see loss_of
    "litgpt-": ("LitGPT", "litgpt", "LitGPT's own loss, closer to full than to chunked: see the differences"),
    "fms-": ("HF Trainer + peft (fms-hf-tuning)", "hf", "transformers' own loss, through HF Trainer / TRL SFTTrainer"),
    "peft-mc-": ("HF transformers + peft (PEFT method_comparison)", "hf",
                 "transformers' own loss: run.py's model(**batch).loss"),
    "peft-readme-": ("HF transformers + peft (PEFT examples)", "hf", "transformers' own loss"),
    "answerai-": ("Answer.AI fsdp_qlora (HF model + peft/bnb, custom loop)", "hf-custom",
                  "transformers' own loss: train.py's model(input_ids, labels=...).loss"),
    "qwen1-": ("Qwen finetune.py (HF Trainer + peft; GPTQ for Q-LoRA)", "hf",
               "transformers' own loss, through HF Trainer"),
}

# Settings a row leaves out, read from its `note` (or the source's config), with the reason.
# key: row id -> {field: (value, why)}
ASSUMED: dict[str, dict[str, tuple]] = {}
_ALPACA_512 = (512, "Alpaca truncated at max_seq_len 512 (note: assumed default of that era); batches are "
                    "padded to the longest sample, so 512 is an upper bound")
# torchtune PR #1390 introduced CEWithChunkedOutputLoss and moved the decoder's `.float()` into the loss: before it,
# the recipes computed nn.CrossEntropyLoss on the whole batch's fp32 logits
_TT_BEFORE_CHUNKED = ("full", "torchtune before its chunked loss (PR #1390): the decoder returned fp32 logits for "
                              "the whole batch and the recipe used nn.CrossEntropyLoss")
_TT_LLAMA31 = ("chunked", "not stated in the README; torchtune's llama3_1 configs at that commit use "
                          "CEWithChunkedOutputLoss (recipes/configs/llama3_1/8B_lora.yaml at 0031bfb)")
for _id in ("torchtune-tut-llama2-7b-lora-qv-r8", "torchtune-tut-llama2-7b-lora-all-r8",
            "torchtune-tut-llama2-7b-lora-all-r64", "torchtune-tut-llama2-7b-qlora",
            "torchtune-readme-2024-04-llama2-7b-lora-single", "torchtune-readme-2024-04-llama2-7b-full-lowmem"):
    ASSUMED[_id] = {"seq_len": _ALPACA_512, "loss": _TT_BEFORE_CHUNKED}
for _id in ("torchtune-readme-2024-04-llama2-7b-lora-2gpu-fsdp", "torchtune-readme-2024-04-llama2-7b-full-4gpu-fsdp"):
    ASSUMED[_id] = {"loss": _TT_BEFORE_CHUNKED}
ASSUMED["torchtune-pr961-llama2-7b-full-lowmem-bs4-2048"] = {
    "optimizer": ("paged_adamw_32bit", "note: 7B_full_low_memory used bitsandbytes PagedAdamW (32-bit) + "
                                       "optimizer_in_bwd"),
    "unit": ("GB", "unit not stated: GB (1e9) assumed, torchtune's logger of May 2024 divided by 1e9"),
    "loss": _TT_BEFORE_CHUNKED,
}
for _id in ("torchtune-readme-llama31-8b-full-4090", "torchtune-readme-llama31-8b-full-a6000"):
    ASSUMED[_id] = {"loss": _TT_LLAMA31}
ASSUMED["torchtune-readme-llama31-8b-lora-a6000"] = {
    "gradient_checkpointing": (False, "note: activation checkpointing OFF on the A6000 (assumed by the note)"),
    "loss": _TT_LLAMA31,
}
ASSUMED["torchtune-readme-llama32-3b-full-packed-compile"] = {
    "loss": ("full", "as the packed4096 row it extends (standard cross-entropy); chunked CE is the table's next row"),
}
ASSUMED["torchtune-readme-llama32-3b-full-packed-ac-optinbwd"] = {
    "optimizer": ("adamw_torch", "note: torch AdamW with bf16 states, step fused into backward"),
}
ASSUMED["fms-mistral7b-qlora-bnb-bs4-1gpu"] = {
    "dropout": (0.0, "lora_dropout 0.0 in the scenario's CSV row (quote)"),
}
ASSUMED["fms-mistral7b-lora-r16-bs8-1gpu"] = {
    "dropout": (0.0, "same standard-peft scenario as the batch-4 row, whose note gives dropout 0.0"),
}
for _id in ("peft-mc-llama32-3b-lora-r32-qv", "peft-mc-llama32-3b-dora-r32-qv"):
    ASSUMED[_id] = {"dropout": (0.0, "lora_dropout 0.0 in the experiment's adapter_config.json")}

# Row-specific facts from the notes that bear on the comparison.
EXTRA_DIFFERENCES = {
    "torchtune-tut-llama2-7b-qlora": [
        "reserved was already 9.13 GB at model init (the note): a load-time peak the caching allocator keeps; "
        "peftplan estimates the training step only"],
    "torchtune-readme-2024-04-llama2-7b-lora-single": [
        "same nominal config as the tutorial's 15.57 GB row, measured by another torchtune revision"],
}

_CHUNKED = re.compile(r"CEWithChunkedOutputLoss|chunked CE|chunked cross", re.I)
_STANDARD = re.compile(r"non-chunked|standard cross-entropy", re.I)


def stack_of(row: dict) -> tuple[str, str]:
    for prefix, (name, kind, _) in STACKS.items():
        if row["id"].startswith(prefix):
            return name, kind
    return ("unknown", "unknown")


def resolve_model(model_id: str):
    """(catalog entry or None, how it was matched or None): catalog.match_model first, then SAME_ARCHITECTURE."""
    m = match_model(model_id)
    if m is not None:
        return m.entry, (f"model: {m.how}" if m.how else None)
    if model_id in SAME_ARCHITECTURE:
        entry = find_model(SAME_ARCHITECTURE[model_id])
        if entry is not None:
            return entry, (f"model: catalog entry {entry.id} (same architecture; catalog.match_model does not "
                           "resolve it)")
    return None, None


def loss_of(row: dict, assumed: dict) -> tuple[str, str]:
    """("chunked" | "full", why): the loss the run computed, as stated by its note, assumed, or the stack's own."""
    note, kind = row.get("note", ""), stack_of(row)[1]
    if kind == "torchtune":
        if _STANDARD.search(note):
            return "full", "loss full (note: standard cross-entropy)"
        if _CHUNKED.search(note):
            return "chunked", "loss chunked (note: chunked cross-entropy)"
        if "loss" in assumed:
            value, why = assumed["loss"]
            return value, f"loss {value} ({why})"
        return "full", "loss not stated: full assumed"
    for prefix, (_, _, how) in STACKS.items():
        if row["id"].startswith(prefix) and how:
            return "full", f"loss full ({how})"
    return "full", "loss not stated: full assumed"


def dropout_of(row: dict, assumed: dict) -> tuple[float, str | None]:
    if "dropout" in assumed:
        v, why = assumed["dropout"]
        return v, f"dropout {v} ({why})"
    m = re.search(r"(?:lora_)?dropout[\s=:]*([0-9]*\.[0-9]+|[01])\b", row.get("note", ""))
    if m:
        return float(m.group(1)), None  # stated in the note
    return 0.05, "dropout not stated: 0.05 assumed (peftplan's default)"


def attention_of(row: dict) -> tuple[str, str | None]:
    note = row.get("note", "").lower()
    if row["id"].startswith("fms-"):
        return "flash_attention_2", "attention flash_attention_2 (fms defaults.yaml: use_flash_attn True)"
    if "flash-attn" in note or "flash attention" in note or "flash_attention" in note or "flash-attention" in note:
        return "flash_attention_2", "attention flash_attention_2 (note says flash attention)"
    return "sdpa", None


def padded_of(row: dict) -> tuple[bool, str | None]:
    note = row.get("note", "").lower()
    if "not packed" in note:
        return True, None
    if re.search(r"\bpacked\b", note) or "dummy" in note or "exactly" in note or "fixed length" in note:
        return False, "no padding mask (packed / fixed-length data)"
    return True, None


def offload_of(row: dict) -> str | None:
    """"parameters" (FSDP CPU offload: not modelled), "activations" (Setup.offload) or None."""
    note = row.get("note", "")
    # the notes flag offloaded runs in capitals or by the flag itself (a mere mention of other rows that
    # offload does not count)
    if re.search(r"USES FSDP CPU OFFLOAD|use_cpu_offload [Tt]rue", note):
        return "parameters"
    if re.search(r"WITH CPU ACTIVATION OFFLOADING|enable_activation_offloading=True", note):
        return "activations"
    return None


def known_mismatch(row: dict) -> str | None:
    """A close-stack row whose precision handling peftplan's runtime does not reproduce (said in section 2)."""
    rid = row["id"]
    if rid.startswith("fms-") and row["method"] == "full" and row.get("precision") == "fp16":
        return "pure fp16 without AMP"
    if rid.startswith("fms-") and row["method"] == "qlora" and "accel" not in rid:
        return "prepare_model_for_kbit_training upcasts to fp32"
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _torchtune(row: dict, loss: str, tokens: int, vocab: int) -> list[str]:
    note, method = row.get("note", ""), row["method"]
    out = ["torchtune, not transformers: own attention/MLP modules and loss"]
    if method in ("lora", "qlora", "dora", "qdora"):
        out.append("pure bf16 LoRA weights/grads/AdamW states (peftplan: fp32 adapters, autocast)")
    if method == "qlora":
        out.append("torchao NF4 (only LoRA-targeted linears quantized)")
    if loss == "chunked":
        out.append(f"CEWithChunkedOutputLoss keeps the whole batch's bf16 logits (8 output chunks, 2·T·V = "
                   f"{_gib(2 * tokens * vocab)}) and upcasts one chunk at a time; peftplan's chunked loss holds one "
                   "chunk of C tokens")
    else:
        out.append(f"fp32 logits and nn.CrossEntropyLoss over the whole batch (12·T·V = {_gib(12 * tokens * vocab)} "
                   "in peftplan's full loss)")
    if re.search(r"\bcompile", note, re.I) and not re.search(r"no (torch\.)?compile", note, re.I):
        out.append("torch.compile (fused activations)")
    if re.search(r"(?<!no )optimizer_in_bwd(?! ?=? ?False)|fused into backward|step fused", note, re.I):
        out.append("optimizer step fused into backward (no full gradient buffer)")
    if offload_of(row) == "activations":
        out.append("torchtune's OffloadActivations (every saved tensor to pinned host memory on a side stream) vs "
                   "peftplan's runtime/offload.py (checkpointed layer inputs, 3 on the device at a time)")
    return out


def _litgpt(row: dict, tokens: int, vocab: int) -> list[str]:
    note, method, rid = row.get("note", ""), row["method"], row["id"]
    out = ["LitGPT, not transformers: fused qkv, own loss",
           f"LitGPT's loss keeps the whole batch's logits in bf16 (head in 128-token chunks, all kept; cross-entropy "
           f"per chunk without an fp32 copy); peftplan's full loss counts 12·T·V = {_gib(12 * tokens * vocab)}"]
    if method in ("lora", "qlora", "dora", "qdora"):
        out.append("bf16-true: pure bf16 LoRA weights/grads/AdamW states (peftplan: fp32 adapters)")
    if method == "qlora":
        if "nf4-dq" in note or "WITH double quantization" in note:
            out.append("bnb NF4 with double quantization")
        else:
            out.append("bnb NF4 without double quantization (+~4 bits/64 weights of fp32 absmax)")
    if "validation" in note or "generation" in note:
        out.append("peak includes validation/generation (KV cache)")
    if rid.startswith("litgpt-hub-"):  # Alpaca2k truncated at 512, padded to the longest in the batch
        out.append("seq_len is a truncation cap: most batches are shorter")
    return out


_PEFT_CAST = ("stock peft casts each adapted module's input to the fp32 adapters' dtype (peftplan's runtime keeps "
              "the 16-bit input, shared by the modules that read it: LORA_INPUTS_UNCAST)")


def _hf(row: dict) -> list[str]:
    rid, method, out = row["id"], row["method"], []
    if rid.startswith("fms-"):
        if method == "full":
            out.append("pure fp16 weights/grads/AdamW states, no AMP (peftplan: fp32 master weights "
                       "under fp16 autocast)")
        elif method == "lora":
            out.append("fp16 base without AMP: adapters created in fp16 (peftplan: fp32 adapters, autocast)")
        elif method == "qlora" and "accel" in rid:
            out.append("accelerated-peft-bnb: fms-acceleration's own model preparation, no fp32 upcast (the "
                       "stack peftplan's runtime reproduces)")
            out.append(_PEFT_CAST)
        elif method == "qlora":
            out.append("baseline scenario: SFTTrainer prepares the 4-bit model with peft's "
                       "prepare_model_for_kbit_training, which upcasts embeddings, lm_head and norms to "
                       "fp32 (fms-acceleration's own plugin avoids it)")
            out.append(_PEFT_CAST)
        if "mixtral" in rid and method == "qlora":
            out.append("experts as per-expert nn.Linear in NF4 (transformers 4.45); peftplan's runtime stores the "
                       "fused experts per expert in NF4: the same bytes")
        out.append("~4096 tokens/sample derived from throughput, not stated")
    if rid.startswith("peft-mc-"):
        out.append("bf16 base without autocast")
        if method != "full":
            out.append(_PEFT_CAST)
        out.append("max over the whole run incl. eval generation (batch 50); seq_len 768 is a cap")
    return out


def differences(row: dict, compared_with: str, loss: str, tokens: int, vocab: int) -> list[str]:
    """How the measured stack differs from peftplan's runtime, in ways that matter for memory."""
    note, kind = row.get("note", ""), stack_of(row)[1]
    if kind == "torchtune":
        out = _torchtune(row, loss, tokens, vocab)
    elif kind == "litgpt":
        out = _litgpt(row, tokens, vocab)
    elif kind == "hf":
        out = _hf(row)
    else:
        out = []
    out += EXTRA_DIFFERENCES.get(row["id"], [])
    if compared_with == "device_total_bytes" and row["measured"] == "reserved":
        out.append("max_memory_reserved excludes the CUDA context (512 MiB in device_total_bytes)")
    paged = "paged" in row.get("optimizer", "") or "paged" in note.lower()
    if paged and row["measured"] in ("reserved", "allocated", "unknown"):
        out.append("paged optimizer state is outside torch's allocator")
    return out
