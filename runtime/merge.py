"""Merge a trained adapter into a 16-bit copy of the base (`peftplan merge DIR` or `python merge.py`).

QLoRA / QDoRA adapters were trained against the de-quantized NF4 weights, so the base is loaded in
4-bit exactly as in training and de-quantized to the compute dtype before merging; the result is never
re-quantized. A merged LoRA model serves with no extra latency (Hu et al. 2021, §4.1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_config, resolve_path


def merge(config_path: Path, adapter_dir: Path, out_dir: Path, check: bool = True) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import MethodSetup, torch_dtype

    config = load_config(config_path)
    method = config.method["name"]
    if method == "full":
        raise SystemExit("a full fine-tune has no adapter to merge: the saved model is already complete")
    model_path = resolve_path(config, config.model["name"])
    dtype = torch_dtype(config.dtype)
    if method in ("qlora", "qdora"):
        setup = MethodSetup(method=method, dtype=config.dtype, gradient_checkpointing=False)
        base = _load_4bit(model_path, setup)
        base = base.dequantize()  # NF4 → compute dtype: the weights the adapter was trained against
        base = base.to(dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=config.model["trust_remote_code"])
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        before = peft_model(**probe).logits.float()
    merged = peft_model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    result = {"out": str(out_dir), "dtype": str(dtype)}
    if check:
        reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=dtype, use_safetensors=True)
        with torch.no_grad():
            after = reloaded(**probe).logits.float()
        diff = (after - before).abs().max().item()
        scale = before.abs().max().item()
        result.update(max_abs_logit_diff=diff, max_abs_logit=scale)
    return result


def _load_4bit(model_path: str, setup):
    from transformers import AutoModelForCausalLM

    from .model import quantization_config, torch_dtype

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(setup.dtype), use_safetensors=True,
                                                quantization_config=quantization_config(setup))


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge the trained adapter into a 16-bit base model.")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml")
    ap.add_argument("--adapter", default=None, help="adapter directory (default: <output>/final)")
    ap.add_argument("-o", "--out", default=None, help="where to write the merged model (default: <output>/merged)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    adapter = Path(args.adapter) if args.adapter else config.output_dir / "final"
    if not (adapter / "adapter_config.json").is_file():
        print(f"error: no trained adapter in {adapter} (run training first)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else config.output_dir / "merged"
    result = merge(Path(args.config), adapter, out)
    print(f"merged model written to {result['out']} ({result['dtype']}); max |logit difference| vs the adapter "
          f"model: {result.get('max_abs_logit_diff', float('nan')):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
