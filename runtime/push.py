"""Push the trained adapter (outputs/final) or the merged model (outputs/merged) to the Hugging Face Hub, with a
model card generated from the plan (card.py):

    python push.py REPO_ID [--merged] [--private] [--dry-run]
    peftplan push DIR REPO_ID [--merged] [--private] [--dry-run]

Only the model's own files are pushed, named one by one (never a pattern, never the folder as a whole): the
adapter or model weights (safetensors) and configs, the tokenizer and its chat template, and README.md. Anything
else in the folder (training_args.bin, a pickle; checkpoints; your notes) stays here, and the command lists it.
Nothing else of the project is ever pushed.

Refused before any network call, with one line saying why: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; no
token (`hf auth login`, or HF_TOKEN); an invalid repo id; no trained model in the folder. --dry-run writes the
card and lists what would be pushed, offline.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .messages import printable, say

# file names a model folder may push; shards are model-00001-of-00004.safetensors
FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
         "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
         "chat_template.jinja", "chat_template.json", "README.md")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TEMPLATES_DIR = "additional_chat_templates"  # transformers saves extra named chat templates here (*.jinja)


class PushError(ValueError):
    """The push is refused or failed; the message says why and what to do."""


def offline_reason(environ=None) -> str | None:
    import os

    from .tracking import offline

    env = os.environ if environ is None else environ
    if offline(env):
        which = "HF_HUB_OFFLINE" if str(env.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "true", "yes", "on") \
            else "TRANSFORMERS_OFFLINE"
        return (f"{which} is set: nothing is pushed offline. Unset it on a machine with network access to push "
                "(python push.py REPO_ID --dry-run writes the card and lists the files without pushing)")
    return None


def files_to_push(model_dir: Path) -> tuple[list[str], list[str]]:
    """(the folder's files that are pushed, as paths inside the repo; the files left here). Sorted."""
    pushed, left = [], []
    for p in sorted(Path(model_dir).rglob("*")):
        if not p.is_file() and not p.is_symlink():
            continue
        rel = p.relative_to(model_dir).as_posix()
        top = "/" not in rel
        ok = not p.is_symlink() and ((top and (p.name in FILES or _SHARD.fullmatch(p.name)))
                                     or (rel.startswith(f"{_TEMPLATES_DIR}/") and rel.count("/") == 1
                                         and p.suffix == ".jinja"))
        (pushed if ok else left).append(rel)
    return pushed, left


def model_kind(config, model_dir: Path) -> str:
    """adapter | merged | full, after checking the folder holds that model's weights (PushError otherwise)."""
    from .merge import MARKER, MergeError, check_adapter

    if (model_dir / "adapter_config.json").is_file():
        try:
            check_adapter(model_dir)
        except MergeError as exc:
            raise PushError(str(exc)) from None
        return "adapter"
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return "merged" if (model_dir / MARKER).is_file() or config.method["name"] != "full" else "full"
    raise PushError(f"no trained model in {model_dir} (no adapter_config.json, nor config.json with safetensors "
                    "weights)")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"{repo_id!r} is not a valid repository id ({str(exc).splitlines()[0][:200]}); "
                        "expected owner/name, e.g. alice/llama-8b-lora") from None
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise PushError(f"{repo_id!r} is not a valid repository id: expected owner/name")


def push(config_path: Path, repo_id: str, *, merged: bool = False, private: bool = False, dry_run: bool = False,
         environ=None) -> dict:
    """Check, write the card, push the model's files in one commit; {"url", "kind", "pushed", "left", "card"}."""
    from .card import render_card, write_card

    config = load_config(config_path)
    model_dir = config.output_dir / ("merged" if merged else "final")
    if not model_dir.is_dir():
        raise PushError(f"{model_dir} does not exist: " + ("merge first (python merge.py)" if merged
                                                            else "train first (python train.py)"))
    kind = model_kind(config, model_dir)
    check_repo_id(repo_id)
    token = None
    if not dry_run:
        reason = offline_reason(environ)
        if reason:
            raise PushError(reason)
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            raise PushError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write "
                            "access (https://huggingface.co/settings/tokens)")
    card = write_card(model_dir, render_card(config, kind, repo_id=repo_id))
    pushed, left = files_to_push(model_dir)
    result = {"url": None, "kind": kind, "pushed": pushed, "left": left, "card": card, "dir": str(model_dir)}
    if dry_run:
        return result
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    version = config.provenance.get("peftplan_version", "unknown")
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, repo_type="model",
                                 operations=[CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(model_dir / rel))
                                             for rel in pushed],
                                 commit_message=f"peftplan {version}: {config.method['name']} {kind}")
    except Exception as exc:  # noqa: BLE001 - any Hub or network failure is reported as one line, exit 2
        raise PushError(f"pushing to {repo_id} failed: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    result["url"] = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return result


def main(argv=None, default_config: Path | None = None) -> int:
    ap = argparse.ArgumentParser(description="Push the trained adapter (or, with --merged, the merged model) to the "
                                             "Hugging Face Hub with a model card generated from the plan.",
                                 epilog="example: python push.py alice/llama-8b-lora --private")
    ap.add_argument("repo_id", help="the Hub repository, owner/name (created if it does not exist)")
    ap.add_argument("--config", default=str(default_config) if default_config else "plan.toml",
                    help="the project's plan file (default: plan.toml next to this script)")
    ap.add_argument("--merged", action="store_true", help="push <output>/merged (python merge.py) instead of the "
                                                          "adapter in <output>/final")
    ap.add_argument("--private", action="store_true", help="create the repository private")
    ap.add_argument("--dry-run", action="store_true", help="write the card and list the files; push nothing")
    args = ap.parse_args(argv)
    try:
        result = push(Path(args.config), args.repo_id, merged=args.merged, private=args.private, dry_run=args.dry_run)
    except (ConfigError, PushError) as exc:
        say(f"error: {exc}")
        return 2
    readme = Path(result["dir"]) / "README.md"
    print(f"model card: {printable(readme)}" + ("" if result["card"] else " (yours, kept as it is)"))
    print(("would push" if args.dry_run else "pushed") + f" {len(result['pushed'])} files: "
          + printable(", ".join(result["pushed"])))
    if result["left"]:
        print(f"not pushed (not model files): {printable(', '.join(result['left']))}")
    if result["url"]:
        print(f"done: {printable(result['url'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
