"""Evaluate the trained adapter (or full model) on the held-out split: mean loss and perplexity."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .config import load_config, resolve_path


def evaluate(config_path: Path, model_dir: Path, max_batches: int | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from .data import DataCollator, prepare_data
    from .model import MethodSetup

    config = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data = prepare_data(resolve_path(config, config.data["path"]), tokenizer, format=config.data["format"],
                        seq_len=config.data["seq_len"], eval_fraction=max(config.data["eval_fraction"], 0.0),
                        seed=config.training["seed"], packing=config.data["packing"])
    examples = data.eval or data.train
    m = config.method
    if m["name"] == "full":
        from transformers import AutoModelForCausalLM

        from .model import torch_dtype

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(config.dtype), use_safetensors=True)
    else:
        from peft import PeftModel

        setup = MethodSetup(method=m["name"], dtype=config.dtype, gradient_checkpointing=False, rank=m["rank"],
                            alpha=m["alpha"], dropout=0.0, target_modules=m["target_modules"])
        from .model import quantization_config, torch_dtype
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": torch_dtype(config.dtype), "use_safetensors": True}
        if quantization_config(setup) is not None:
            kwargs["quantization_config"] = quantization_config(setup)
        base = AutoModelForCausalLM.from_pretrained(resolve_path(config, config.model["name"]), **kwargs)
        model = PeftModel.from_pretrained(base, str(model_dir))
    model.eval()
    collate = DataCollator.from_tokenizer(tokenizer)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    bs = config.training["micro_batch_size"]
    with torch.no_grad():
        for n, start in enumerate(range(0, len(examples), bs)):
            if max_batches is not None and n >= max_batches:
                break
            batch = {k: v.to(device) for k, v in collate(examples[start:start + bs]).items()}
            out = model(**batch)
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * count
            tokens += count
    loss = total / max(tokens, 1)
    return {"split": "eval" if data.eval else "train", "examples": len(examples), "tokens": tokens,
            "loss": loss, "perplexity": math.exp(min(loss, 50))}


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the trained model on the held-out split.")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml")
    ap.add_argument("--model", default=None, help="adapter or model directory (default: <output>/final)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    model_dir = Path(args.model) if args.model else config.output_dir / "final"
    if not model_dir.is_dir():
        print(f"error: {model_dir} does not exist (train first)", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(Path(args.config), model_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
