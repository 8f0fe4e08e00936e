"""Look at what training did: the base model's completion and the trained model's, prompt by prompt.

    python sample.py [--prompts FILE] [--n N] [--max-new-tokens N] [--temperature T] [--seed S]
    peftplan sample DIR [same options]

Prompts come from a file or, by default, the held-out split (sample_prompts.py says how). Each prompt is completed
by the base model and by the trained one: for a LoRA/QLoRA/DoRA/QDoRA adapter, one model loaded as in training
(4-bit base for QLoRA/QDoRA) with the adapter off, then on; for a full fine-tune, the base model, then
outputs/final. Greedy by default (temperature 0: the same output every run); with --temperature T > 0, plain
temperature sampling (no top-k / top-p), seeded per prompt with S + i, the same seed for both models. One prompt
at a time, so padding never changes an answer. A prompt longer than the plan's seq_len keeps its last seq_len
tokens.

Written to outputs/samples.jsonl, one line per prompt: {"prompt", "base", "tuned", "source", "reference"}
("prompt": the exact text the models were given, chat template included; "reference": the data's own answer,
when it has one). The file is replaced atomically, and only when it is this command's own earlier output (a
hidden `.samples.jsonl.peftplan` beside it records its checksum): a file of the user's is never overwritten.
The first few rows are printed side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import quiet  # noqa: F401  (filters known-harmless library warnings before they load)
from .cli_args import positive
from .config import ConfigError, load_config, resolve_path
from .messages import printable, say

# peft asks the model `is_gradient_checkpointing`, which transformers 5.2x deprecates with a FutureWarning on every
# adapter load; harmless here (nothing trains)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

SHOWN = 3  # rows printed side by side
DEFAULT_N = 8  # prompts taken from the plan's data
OWNER_SUFFIX = ".peftplan"  # .samples.jsonl.peftplan: the checksums of the files this command wrote


class SampleError(ValueError):
    """Bad input to sampling (no trained model, an output file that is not ours); the message names it."""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    max_prompt_tokens: int | None = None  # the plan's seq_len


# ---------------------------------------------------------------------------------------------------- models


def tuned_kind(model_dir: Path) -> str:
    """"adapter" (adapter_config.json) or "full" (a whole model); SampleError when the folder holds neither."""
    if (model_dir / "adapter_config.json").is_file():
        from .merge import MergeError, check_adapter

        try:
            check_adapter(model_dir)
        except MergeError as exc:
            raise SampleError(str(exc)) from None
        return "adapter"
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return "full"
    raise SampleError(f"no trained model in {model_dir} (no adapter_config.json, nor config.json with safetensors "
                      "weights): train first, or pass --model DIR")


def load_base(config):
    """The base model as training loaded it (4-bit NF4 for QLoRA/QDoRA), in eval mode, on the GPU when there is one."""
    import torch

    from .model import MethodSetup, load_base, quantization_config

    setup = MethodSetup(method=config.method["name"], dtype=config.dtype, gradient_checkpointing=False,
                        trust_remote_code=config.model["trust_remote_code"],
                            attention=config.model["attention"])
    quant = quantization_config(setup)
    model = load_base(resolve_path(config, config.model["name"]), setup,
                      device_map={"": 0} if quant is not None and torch.cuda.is_available() else None)
    if quant is None and torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def _generation_config(model, tokenizer, s: Settings):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    sampling = {"do_sample": True, "temperature": s.temperature, "top_k": 0, "top_p": 1.0} if s.temperature > 0 \
        else {"do_sample": False}
    # a fresh config, not the model's: its own sampling defaults (temperature, top_p …) would apply otherwise
    return GenerationConfig(max_new_tokens=s.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                            bos_token_id=tokenizer.bos_token_id, **sampling)


def complete(model, tokenizer, inputs: list[tuple[str, bool]], s: Settings) -> list[str]:
    """One completion per (text, add_special_tokens), generated one prompt at a time."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.generation_config = _generation_config(inner, tokenizer, s)
    device = next(model.parameters()).device
    out = []
    for i, (text, special) in enumerate(inputs):
        ids = tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
        if s.max_prompt_tokens and ids.shape[1] > s.max_prompt_tokens:
            ids = ids[:, -s.max_prompt_tokens:]
        ids = ids.to(device)
        if s.temperature > 0:
            torch.manual_seed(s.seed + i)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def completions(config, tuned_dir: Path, tokenizer, inputs: list[tuple[str, bool]], s: Settings) -> tuple[list, list]:
    """(base completions, trained completions) for every input."""
    import gc

    kind = tuned_kind(tuned_dir)
    base = load_base(config)
    if kind == "adapter":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base, str(tuned_dir)).eval()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SampleError(f"{tuned_dir}: does not fit {config.model['name']} "
                              f"({str(exc).splitlines()[0][:300]})") from None
        with model.disable_adapter():
            before = complete(model, tokenizer, inputs, s)
        return before, complete(model, tokenizer, inputs, s)
    before = complete(base, tokenizer, inputs, s)
    del base
    gc.collect()
    from transformers import AutoModelForCausalLM

    from .model import torch_dtype

    tuned = AutoModelForCausalLM.from_pretrained(str(tuned_dir), dtype=torch_dtype(config.dtype), use_safetensors=True)
    import torch

    if torch.cuda.is_available():
        tuned = tuned.to("cuda")
    return before, complete(tuned.eval(), tokenizer, inputs, s)


# ---------------------------------------------------------------------------------------------------- output


def _owner(path: Path) -> Path:
    return path.with_name(f".{path.name}{OWNER_SUFFIX}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ours(path: Path) -> bool:
    """Whether `path` is a file this command wrote and nobody changed since (its checksum is in the owner file)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        known = json.loads(_owner(path).read_text(encoding="utf-8")).get("sha256", [])
        return isinstance(known, list) and _digest(path.read_bytes()) in known
    except (OSError, ValueError, AttributeError):
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path` (mode 0666 less the umask, like any new file), then rename it over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> None:
    """SampleError unless `path` is absent or this command's own unchanged earlier output."""
    if (path.exists() or path.is_symlink()) and not ours(path):
        raise SampleError(f"{path} exists and is not an earlier output of this command (or was edited since): "
                          "move it away, or pass --out FILE")


def write_samples(path: Path, rows: list[dict]) -> None:
    """Replace `path` atomically with `rows` as JSONL, only if it is absent or our own earlier output."""
    check_writable(path)
    lines = []
    for row in rows:
        line = json.dumps(row, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: keep the line valid UTF-8 JSON
            line = json.dumps(row)
        lines.append(line + "\n")
    data = "".join(lines).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    old = [_digest(path.read_bytes())] if path.is_file() else []
    owner = _owner(path)
    _atomic_write(owner, json.dumps({"sha256": old + [_digest(data)]}).encode())  # a crash leaves either file ours
    _atomic_write(path, data)
    _atomic_write(owner, json.dumps({"sha256": [_digest(data)]}).encode())


def _one_line(text: str | None, limit: int = 160) -> str:
    if not text:
        return "(nothing: the model ended at once)"
    text = text.replace("\r\n", "\n").replace("\n", "⏎")
    return printable(text[-limit:] if len(text) > limit else text)


def side_by_side(rows: list[dict], shown: int = SHOWN) -> list[str]:
    """The first `shown` rows as short aligned lines: the prompt's end, then each model's completion."""
    out = []
    for i, row in enumerate(rows[:shown], 1):
        out.append(f"[{i}] {printable(row['source'])}")
        out.append(f"    prompt    │ …{_one_line(row['prompt'], 120)}")
        if row.get("reference"):
            out.append(f"    reference │ {_one_line(row['reference'])}")
        out.append(f"    base      │ {_one_line(row['base'])}")
        out.append(f"    tuned     │ {_one_line(row['tuned'])}")
    return out


# ---------------------------------------------------------------------------------------------------- run


def sample(config_path: Path, *, model_dir: Path | None = None, prompts_file: str | None = None,
           n: int | None = None, settings: Settings = Settings(), out: Path | None = None) -> dict:
    """Sample, write the JSONL, and return {"out", "rows", "note"}; SampleError / DataError for bad input."""
    from transformers import AutoTokenizer

    from .sample_prompts import prompts_from_file, prompts_from_plan, training_format

    config = load_config(config_path)
    tuned = Path(model_dir) if model_dir else config.output_dir / "final"
    out = Path(out) if out else config.output_dir / "samples.jsonl"
    if not tuned.is_dir():
        raise SampleError(f"{tuned} does not exist (train first: python train.py)")
    tuned_kind(tuned)
    check_writable(out)  # before minutes of generation
    tok_dir = tuned if (tuned / "tokenizer_config.json").is_file() else resolve_path(config, config.model["name"])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if prompts_file:
        fmt = training_format(config)
        from .data_formats import CHAT_FORMATS

        chat = (fmt in CHAT_FORMATS) if fmt else bool(getattr(tokenizer, "chat_template", None))
        prompts = prompts_from_file(prompts_file, chat=chat, roles=config.data["roles"], limit=n)
        note = f"{prompts_file}" + (" (plain prompts as a user turn: the training data is chat)" if chat else "")
    else:
        prompts, note = prompts_from_plan(config, tokenizer, n or DEFAULT_N)
    inputs = []
    for p in prompts:
        try:
            inputs.append(p.render(tokenizer))
        except Exception as exc:  # noqa: BLE001 - the chat template is the model's code
            raise SampleError(f"{p.source}: the chat template cannot render this prompt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    s = Settings(settings.max_new_tokens, settings.temperature, settings.seed, config.data["seq_len"])
    before, after = completions(config, tuned, tokenizer, inputs, s)
    rows = []
    for p, (text, _), b, t in zip(prompts, inputs, before, after, strict=True):
        row = {"prompt": text, "base": b, "tuned": t, "source": p.source}
        if p.reference is not None:
            row["reference"] = p.reference
        rows.append(row)
    write_samples(out, rows)
    return {"out": str(out), "rows": rows, "note": note, "model": str(tuned)}


def _temperature(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= t <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 (greedy) and 100, got {text}")
    return t


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Complete prompts with the base model and the trained one, side by "
                                             "side, into outputs/samples.jsonl.",
                                 epilog="example: python sample.py --prompts prompts.txt --max-new-tokens 64")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml",
                    help="the project's plan file (default: plan.toml next to this script)")
    ap.add_argument("--prompts", default=None, metavar="FILE",
                    help="prompts: .jsonl/.json/.csv/.parquet records with prompt, messages, conversations, "
                         "instruction or text; or .txt, one per line (or per blank-line-separated block). "
                         "Default: the held-out split")
    ap.add_argument("--n", type=positive, default=None,
                    help=f"how many prompts (default: all of --prompts FILE; {DEFAULT_N} from the data)")
    ap.add_argument("--max-new-tokens", type=positive, default=128, help="tokens generated per prompt (default 128)")
    ap.add_argument("--temperature", type=_temperature, default=0.0,
                    help="0 (default): greedy, the same output every run; > 0: sampling at that temperature")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: the plan's training.seed)")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="the trained adapter or model (default: <output>/final; a checkpoint-N or merged folder "
                         "works too)")
    ap.add_argument("--out", default=None, metavar="FILE", help="where to write (default: <output>/samples.jsonl)")
    args = ap.parse_args(argv)
    from .data_formats import DataError

    try:
        config = load_config(args.config)
        seed = args.seed if args.seed is not None else config.training["seed"]
        result = sample(Path(args.config), model_dir=Path(args.model) if args.model else None,
                        prompts_file=args.prompts, n=args.n,
                        settings=Settings(args.max_new_tokens, args.temperature, seed),
                        out=Path(args.out) if args.out else None)
    except (ConfigError, SampleError, DataError) as exc:
        say(f"error: {exc}")
        return 2
    except OSError as exc:  # a model that cannot be loaded
        say(f"error: cannot load a model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return 2
    mode = f"temperature {args.temperature:g}, seed {seed}" if args.temperature > 0 else "greedy"
    print(f"{len(result['rows'])} prompts from {printable(result['note'])}; {mode}, up to {args.max_new_tokens} new "
          f"tokens; base vs {printable(result['model'])}")
    for line in side_by_side(result["rows"]):
        print(line)
    print(f"wrote {printable(result['out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
