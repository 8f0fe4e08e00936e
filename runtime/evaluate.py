"""Evaluate the trained adapter (or full model) on the held-out split: mean loss and perplexity.

The held-out split is the one training used (plan.toml `data.eval_fraction`, same seed). A plan without one
is refused with a clear message rather than quietly measured on the training data; `--split train` asks for
the training loss explicitly, and the output names the split either way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import quiet  # noqa: F401  (filters known-harmless library warnings before they load)
from .config import data_arguments, load_config, resolve_path


class NoHeldOutSplit(Exception):
    """The plan holds no examples out: there is nothing to evaluate on but the training data."""


def held_out_check(config, config_path: Path, split: str) -> None:
    """Refuse an evaluation on a split the plan does not have, before anything heavy is loaded."""
    if split == "eval" and not (config.data["eval_fraction"] > 0 or config.data.get("eval_sources")):
        raise NoHeldOutSplit(
            f"{config_path}: data.eval_fraction = {config.data['eval_fraction']:g} holds no examples out, so there "
            "is no held-out split to evaluate on. Pass --split train for the training loss (it says nothing about "
            "generalization), or set data.eval_fraction in the spec, regenerate and retrain")


def evaluate(config_path: Path, model_dir: Path, max_batches: int | None = None, split: str = "eval") -> dict:
    config = load_config(config_path)
    held_out_check(config, config_path, split)

    import torch
    from transformers import AutoTokenizer

    from .data import DataCollator, prepare_data
    from .model import MethodSetup

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    args = data_arguments(config)
    data = prepare_data(args.pop("sources"), tokenizer, **args)
    if split == "eval" and not data.eval:  # e.g. a plan whose held-out data this runtime does not read
        raise NoHeldOutSplit(f"{config_path}: the held-out split is empty; pass --split train for the training loss")
    examples = data.eval if split == "eval" else data.train
    m = config.method
    if m["name"] == "full":
        from transformers import AutoModelForCausalLM

        from .model import torch_dtype

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(config.dtype),
                                                     use_safetensors=True)
    else:
        from peft import PeftModel

        setup = MethodSetup(method=m["name"], dtype=config.dtype, gradient_checkpointing=False, rank=m["rank"],
                            alpha=m["alpha"], dropout=0.0, target_modules=m["target_modules"],
                            trust_remote_code=config.model["trust_remote_code"],
                            attention=config.model["attention"])
        from .model import load_base

        base = load_base(resolve_path(config, config.model["name"]), setup)
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
    return {"split": "held-out" if split == "eval" else "train", "examples": len(examples), "tokens": tokens,
            "loss": loss, "perplexity": math.exp(min(loss, 50))}


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the trained model on the held-out split.")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml")
    ap.add_argument("--model", default=None, help="adapter or model directory (default: <output>/final)")
    ap.add_argument("--split", choices=("eval", "train"), default="eval",
                    help="eval: the held-out split training used (default); train: the training examples, explicitly")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    try:
        held_out_check(config, Path(args.config), args.split)
    except NoHeldOutSplit as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else config.output_dir / "final"
    if not model_dir.is_dir():
        print(f"error: {model_dir} does not exist (train first)", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(Path(args.config), model_dir, split=args.split), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
