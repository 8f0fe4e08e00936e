"""Merge a trained adapter into a 16-bit copy of the base (`peftplan merge DIR` or `python merge.py`).

The weights are saved in bfloat16 (float16 for fp16 plans; `--dtype` to choose), whatever dtype training used.

QLoRA / QDoRA adapters were trained against the de-quantized NF4 weights, so the base is loaded in
4-bit exactly as in training and de-quantized to the compute dtype before merging; the result is never
re-quantized. A merged LoRA model serves with no extra latency (Hu et al. 2021, §4.1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import quiet  # noqa: F401  (filters known-harmless library warnings before they load)
from .config import ConfigError, load_config, resolve_path
from .messages import say

MARKER = ".peftplan_merged"  # lists the files a merge wrote: the only folder content a later merge replaces
DTYPES = ("bfloat16", "float16", "float32")


class MergeError(ValueError):
    """The adapter or the output folder is unusable; the message names it."""


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter's config, after checking that its files read back (exit 2 otherwise, not a traceback)."""
    from .checkpoints import readable_safetensors

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergeError(f"no trained adapter in {adapter_dir} (run training first)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MergeError(f"{cfg_path}: unreadable ({str(exc)[:200]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int) or isinstance(cfg.get("r"), bool) \
            or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise MergeError(f"{cfg_path}: not a LoRA adapter config (needs an integer r ≥ 1 and lora_alpha)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() or not readable_safetensors(weights):
        raise MergeError(f"{weights}: missing, truncated or corrupt")
    return cfg


def check_output(out_dir: Path, forbidden: dict[str, Path]) -> None:
    """Refuse to write the merged model over (or into, or around) the base model or the adapter, over the project
    or around it, or into a folder of the user's: only an absent or empty folder, or a previous merge's (its MARKER
    lists what it wrote). A new folder inside the project is fine (outputs/merged is the default)."""
    out = out_dir.resolve()
    places = {what: Path(path).resolve() for what, path in forbidden.items()}
    relations = [(lambda p: out == p, "is"), (lambda p: p in out.parents, "is inside"),
                 (lambda p: out in p.parents, "contains")]
    for test, verb in relations:  # the closest relation first: "-o PROJECT" is the project, not "contains"
        for what, p in places.items():
            if what == "project" and verb == "is inside":
                continue  # a new folder in the project is fine: outputs/merged is the default
            if test(p):
                raise MergeError(f"-o {out_dir}: that {verb} the {what} ({p}); choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise MergeError(f"-o {out_dir}: exists and is not an earlier merge's output folder; choose a new or "
                         "empty folder")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished merge into place; an earlier merge's files (listed in its MARKER) are replaced."""
    if (out / MARKER).is_file():
        for name in (out / MARKER).read_text(encoding="utf-8").splitlines():
            if name and "/" not in name and name not in ("..", "."):
                (out / name).unlink(missing_ok=True)
        (out / MARKER).unlink()
        out.rmdir()  # fails (and stops) if anything not ours is left
    elif out.is_dir():
        out.rmdir()  # empty: checked before the merge
    os.rename(staging, out)


def merge(config_path: Path, adapter_dir: Path, out_dir: Path, check: bool = True,
          dtype_name: str | None = None) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import MethodSetup, load_base, torch_dtype

    config = load_config(config_path)
    method = config.method["name"]
    if method == "full":
        raise MergeError("a full fine-tune has no adapter to merge: the saved model in outputs/final is complete")
    check_adapter(adapter_dir)
    model_path = resolve_path(config, config.model["name"])
    check_output(out_dir, {"base model": Path(model_path), "adapter": adapter_dir, "project": config.path.parent})
    dtype_name = dtype_name or ("float16" if config.training["precision"] == "fp16" else "bfloat16")
    dtype = torch_dtype(dtype_name)
    if method in ("qlora", "qdora"):
        setup = MethodSetup(method=method, dtype=config.dtype, gradient_checkpointing=False,
                            trust_remote_code=config.model["trust_remote_code"],
                            attention=config.model["attention"])
        from .moe import dequantize_experts

        base = load_base(model_path, setup)
        base = base.dequantize()  # NF4 → compute dtype: the weights the adapter was trained against
        base = dequantize_experts(base).to(dtype)  # fused MoE experts too (runtime/moe.py)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=config.model["trust_remote_code"],
                                                    attn_implementation=config.model["attention"])
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MergeError(f"{adapter_dir}: does not fit {config.model['name']} "
                         f"({str(exc).splitlines()[0][:300]})") from None
    peft_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        before = peft_model(**probe).logits.float()
    merged = peft_model.merge_and_unload().to(dtype)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.peftplan-merge-", dir=out_dir.parent))
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / MARKER).write_text("\n".join(sorted(p.name for p in staging.iterdir())) + "\n", encoding="utf-8")
        result = {"out": str(out_dir), "dtype": dtype_name}
        if check:
            reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype, use_safetensors=True)
            with torch.no_grad():
                after = reloaded(**probe).logits.float()
            result.update(max_abs_logit_diff=(after - before).abs().max().item(),
                          max_abs_logit=before.abs().max().item())
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge the trained adapter into a 16-bit copy of the base model "
                                             "(de-quantized for QLoRA/QDoRA, never re-quantized).",
                                 epilog="example: python merge.py -o /models/my-merged --dtype bfloat16")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml",
                    help="the project's plan file (default: plan.toml next to this script)")
    ap.add_argument("--adapter", default=None, help="adapter directory (default: <output>/final)")
    ap.add_argument("-o", "--out", default=None,
                    help="where to write the merged model (default: <output>/merged); must be new, empty, or an "
                         "earlier merge's folder — never the base model's")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="dtype of the saved weights (default: bfloat16; float16 for fp16 plans)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        say(f"error: {exc}")
        return 2
    adapter = Path(args.adapter) if args.adapter else config.output_dir / "final"
    out = Path(args.out) if args.out else config.output_dir / "merged"
    try:
        result = merge(Path(args.config), adapter, out, dtype_name=args.dtype)
    except MergeError as exc:
        say(f"error: {exc}")
        return 2
    print(f"merged model written to {result['out']} ({result['dtype']}); max |logit difference| vs the adapter "
          f"model: {result.get('max_abs_logit_diff', float('nan')):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
