"""A plain LoRA / QLoRA / DoRA training script on transformers + peft (+ bitsandbytes): the baseline that
`benchmarks/throughput.py` compares a generated peftplan project against.

    python benchmarks/reference_train.py --model DIR --data train.jsonl --method lora --seq-len 512 \\
        --micro-batch-size 4 --max-steps 24 [--rank 8 --alpha 16 ...] [--json-out result.json]

It is written the way a competent user would write it by hand, with no peftplan code in the training path:

- the base model loads in the training dtype (fp32 on a CPU); QLoRA loads the decoder's linear layers in
  4-bit NF4 with double quantization (BitsAndBytesConfig) and runs peft's `prepare_model_for_kbit_training`;
- gradient checkpointing (non-reentrant) through `activation_checkpointing_enable`, `use_cache = False`;
- `get_peft_model` with a LoraConfig (use_dora=True for DoRA);
- padding to the longest sequence in each batch with transformers' `DataCollatorForSeq2Seq`
  (labels padded with -100);
- the stock `Trainer` with the given optimizer, schedule, precision, seed and a fixed number of steps.

Tokens: the chat records are tokenized by `peftplan.runtime.data.prepare_data` (imported from the peftplan
package, never from the project under test), so that both sides train on exactly the same token ids and
response-only labels (the chat template rendered, prompt tokens labelled -100, EOS appended). Tokenizing
happens before the timed loop, so this reuse does not affect the throughput measured.

Throughput: every micro-batch the Trainer feeds to `training_step` is counted — non-padding tokens
(attention_mask == 1), trained tokens (labels != -100) and padded slots (batch x longest). They are divided by
`train_runtime`, the Trainer's own wall time of the training loop (dataloader, forward, backward, optimizer,
logging and callbacks; model loading and tokenizing excluded). The same `train_runtime` is what a peftplan
project logs as its last record in outputs/metrics.jsonl, so both sides are timed the same way. The CPU time
of the process inside `trainer.train()` (time.process_time) is reported too, and a callback records when each
step ends (per-step times); neither changes what is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IGNORE = -100


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local model directory (config, safetensors, tokenizer)")
    ap.add_argument("--data", required=True, help="chat / instruction / completion / text JSONL")
    ap.add_argument("--method", choices=("lora", "qlora", "dora", "qdora"), default="lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--target-modules", default="all-linear", help="'all-linear' or a comma-separated list")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-scheduler", default="cosine")
    ap.add_argument("--warmup-ratio", type=float, default=0.0)
    ap.add_argument("--optim", default="adamw_torch_fused", help="TrainingArguments.optim")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--logging-steps", type=int, default=1)
    ap.add_argument("--output-dir", default="reference-out")
    ap.add_argument("--json-out", default=None, help="write the result here (JSON) as well as printing it")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from peftplan.runtime.data import prepare_data  # identical token ids and labels; see the module docstring

    t_setup = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(args.data, tokenizer, seq_len=args.seq_len, seed=args.seed, packing=False)
    # the collator pads what it is given; keep only the model inputs
    train = [{"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"], "labels": ex["labels"]}
             for ex in data.train]

    set_seed(args.seed)  # before the adapter is created
    quantized = args.method in ("qlora", "qdora")
    load_kwargs = {"dtype": dtype, "attn_implementation": args.attention}
    if quantized:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    model.config.use_cache = False
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
        use_dora=args.method in ("dora", "qdora"), bias="none", task_type="CAUSAL_LM"))

    counts = {"tokens": 0, "trained_tokens": 0, "padded_tokens": 0, "micro_batches": 0}

    step_ends: list[float] = []

    class StepClock(TrainerCallback):  # per-step wall times, to compare steady-state steps with peftplan's
        def on_step_end(self, *a, **kw):
            step_ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *a, **kw):
            ids = inputs["input_ids"]
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["trained_tokens"] += int((inputs["labels"] != IGNORE).sum())
            counts["padded_tokens"] += ids.numel()
            counts["micro_batches"] += 1
            return super().training_step(model, inputs, *a, **kw)

    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_steps=args.max_steps,
        optim=args.optim,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=args.logging_steps,
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    trainer = CountingTrainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                              processing_class=tokenizer, callbacks=[StepClock()])
    setup_s = time.perf_counter() - t_setup

    t0, c0 = time.perf_counter(), time.process_time()
    step_ends.append(t0)
    out = trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    runtime = float(out.metrics["train_runtime"])  # the Trainer's loop time; what peftplan's metrics.jsonl logs
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    result = {
        "method": args.method,
        "steps": trainer.state.global_step,
        "micro_batches": counts["micro_batches"],
        "examples": len(train),
        "tokens": counts["tokens"],
        "trained_tokens": counts["trained_tokens"],
        "padded_tokens": counts["padded_tokens"],
        "padding_efficiency": counts["tokens"] / counts["padded_tokens"] if counts["padded_tokens"] else None,
        "train_runtime_s": runtime,
        "train_call_wall_s": wall,
        "train_call_cpu_s": cpu,  # CPU seconds of this process inside trainer.train(): robust to other jobs
        "setup_s": setup_s,
        "tokens_per_second": counts["tokens"] / runtime,
        "trained_tokens_per_second": counts["trained_tokens"] / runtime,
        "padded_tokens_per_second": counts["padded_tokens"] / runtime,
        "losses": losses,
        "step_seconds": [round(b - a, 4) for a, b in zip(step_ends, step_ends[1:], strict=False)],
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    print(f"reference {args.method}: {result['steps']} steps, {result['tokens']} tokens "
          f"({result['padded_tokens']} padded) in {runtime:.2f} s: {result['tokens_per_second']:,.0f} tok/s, "
          f"{result['padded_tokens_per_second']:,.0f} padded tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
