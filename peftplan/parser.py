"""The `peftplan` command line's arguments: every command and option with its help and an example.

`docs/cli.md` is generated from this parser (`make docs`; a test checks it is current), so the help a user reads
in the terminal and the reference in the repository are one text.
"""

from __future__ import annotations

import argparse

from . import __version__
from .runtime.cli_args import positive

EXIT_CODES = (
    (0, "success"),
    (1, "anything else: the file system refused (permissions, full disk), or an internal error"),
    (2, "your input is wrong: a bad spec, data file, config.json or plan.toml; an unknown model or GPU; an output "
        "folder that is not a peftplan project; a checkpoint that does not match the plan. One line per problem, "
        "naming the file, the line and the key"),
    (3, "a valid spec that nothing satisfies: no method fits in memory (`plan`: at any geometry it searched; "
        "`estimate`: at the geometry it estimated — the table still prints), or every plan is over "
        "objective.max_hours / objective.budget_usd. The message says what would fit or meet the caps"),
    (4, "`run`: the loss became NaN or infinite; training stopped before applying the step, the last checkpoint "
        "is good"),
    (130, "interrupted (Ctrl-C)"),
)


def _command(sub, name: str, summary: str, description: str, examples: list[str]):
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


SPEC_HELP = "the spec: a TOML file (see docs/spec.md)"
DIR_HELP = "a project folder written by peftplan generate"


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES)
    p = argparse.ArgumentParser(
        prog="peftplan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Will it fit, which method, how long — before you rent a GPU. Plan LLM fine-tuning (full, LoRA, "
                    "QLoRA, DoRA, QDoRA) from a short TOML spec, generate a standalone training project, run it.",
        epilog=f"exit codes:\n{codes}\n\nreference: docs/cli.md, docs/spec.md, docs/json.md")
    p.add_argument("--version", action="version", version=f"peftplan {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(sub, "estimate", "per-method memory breakdown for the spec's geometry, no choice made",
                 "Estimate peak memory per device for all five methods at the spec's geometry (micro-batch, "
                 "sequence length, checkpointing, optimizer), term by term. Exit 3 when none fits.",
                 ["peftplan estimate spec.toml", "peftplan estimate spec.toml --explain",
                  "peftplan estimate spec.toml --json | jq '.methods.qlora.peak_allocated_bytes'"])
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
    s.add_argument("--explain", action="store_true", help="every term of each method's peak, with its formula")
    s.add_argument("--exact", action="store_true",
                   help="trace one training step on fake tensors instead of the closed form (needs the [train] extra)")

    s = _command(sub, "plan", "choose a method and settings that fit, with reasons, time and cost",
                 "Choose the method, hyperparameters and batch geometry that fit, with the reasons, the time and the "
                 "cost; the data files, when the spec names them, are read first (format, records, token lengths).",
                 ["peftplan plan spec.toml", "peftplan plan spec.toml --json > plan.json"])
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")

    s = _command(sub, "validate", "check a spec and its data, report every problem at once",
                 "Check the spec (every key), the model's config.json and the data files; every problem at once, "
                 "one line each with the file, line and key. Exit 2 on any problem.",
                 ["peftplan validate spec.toml"])
    s.add_argument("spec", help=SPEC_HELP)

    _command(sub, "schema", "print the spec's JSON Schema",
             "Print the spec's JSON Schema (editors use it for completion: see the `#:schema` line in examples/).",
             ["peftplan schema > spec.schema.json"])

    for name, what in (("models", "model"), ("gpus", "hardware")):
        s = _command(sub, name, f"list the bundled {what} catalog",
                     f"List the bundled {what} catalog, each entry with its source.",
                     [f"peftplan {name}", f"peftplan {name} --json"])
        s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _command(sub, "generate", "compile the plan into a standalone training project",
                 "Plan the spec and write a training project that runs where peftplan is not installed: plan.toml, "
                 "train.py, the runtime, launch files, README. Only files peftplan wrote are ever replaced; a folder "
                 "that is not a peftplan project is refused.",
                 ["peftplan generate spec.toml -o out/my-run",
                  "peftplan generate spec.toml -o out/my-run --force   # regenerate after editing the spec"])
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="the project folder: new, empty, or a peftplan project (with --force)")
    s.add_argument("--force", action="store_true",
                   help="regenerate a peftplan project: replaces only the files peftplan wrote and you did not edit")

    s = _command(sub, "run", "train a generated project with its bundled runtime",
                 "Train a generated project (one process, or accelerate launch for several devices). One run per "
                 "project at a time.", ["peftplan run out/my-run", "peftplan run out/my-run --max-steps 5",
                                        "peftplan run out/my-run --resume"])
    s.add_argument("dir", help=DIR_HELP)
    s.add_argument("--max-steps", type=positive, default=None, metavar="N",
                   help="stop after N optimizer steps (a smoke test)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that reads back (older ones if it is damaged)")

    s = _command(sub, "merge", "merge a trained adapter into a 16-bit copy of the base",
                 "Merge outputs/final into a copy of the base model (de-quantized for QLoRA/QDoRA, never "
                 "re-quantized), saved in bfloat16 by default.",
                 ["peftplan merge out/my-run", "peftplan merge out/my-run -o /models/merged --dtype float16"])
    s.add_argument("dir", help=DIR_HELP)
    s.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="where to write (default: outputs/merged): new, empty, or an earlier merge's folder")
    s.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the saved weights (default: bfloat16; float16 for fp16 plans)")

    s = _command(sub, "sample", "complete prompts with the base and the trained model, side by side",
                 "Complete prompts with the base model and the trained one into outputs/samples.jsonl "
                 "({prompt, base, tuned, source}); greedy by default. Prompts: a file, or the held-out split.",
                 ["peftplan sample out/my-run", "peftplan sample out/my-run --prompts prompts.jsonl --n 8 "
                                                "--max-new-tokens 64"])
    s.add_argument("dir", help=DIR_HELP)
    s.add_argument("--prompts", metavar="FILE",
                   help="JSONL (a prompt field, or chat messages up to the last user turn) or .txt prompts "
                        "(default: the held-out split)")
    s.add_argument("--n", type=positive, metavar="N", help="how many prompts (default 8)")
    s.add_argument("--max-new-tokens", type=positive, metavar="N", help="tokens per completion (default 128)")
    s.add_argument("--temperature", type=float, metavar="T", help="0 (default): greedy and deterministic")
    s.add_argument("--seed", type=int, metavar="S", help="sampling seed when --temperature > 0")

    s = _command(sub, "push", "push the adapter (or --merged model) to the Hugging Face Hub with a model card",
                 "Upload outputs/final (or outputs/merged) with a model card generated from the plan and the run's "
                 "metrics. Needs a Hugging Face token and the network; refused offline.",
                 ["peftplan push out/my-run my-name/my-adapter --dry-run",
                  "peftplan push out/my-run my-name/my-model --merged --private"])
    s.add_argument("dir", help=DIR_HELP)
    s.add_argument("repo_id", help="OWNER/NAME on the Hub (created if it does not exist)")
    s.add_argument("--merged", action="store_true", help="push outputs/merged instead of the adapter")
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--dry-run", action="store_true", help="write the card and list the files; upload nothing")
    return p


def markdown() -> str:
    """docs/cli.md: every command's help, options and examples, and the exit codes (usage lines wrapped at 100
    columns, whatever the terminal)."""
    import os

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _markdown(build_parser())
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _markdown(parser: argparse.ArgumentParser) -> str:
    lines = ["# Command line", "", "<!-- generated from peftplan/parser.py by `make docs`; do not edit -->", "",
             parser.description, "", "| command | does |", "|---|---|"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in sub._choices_actions:
        lines.append(f"| `peftplan {choice.dest}` | {choice.help} |")
    lines += ["", "## Exit codes", "", "| code | meaning |", "|---|---|"]
    lines += [f"| `{code}` | {what} |" for code, what in EXIT_CODES]
    for name, cmd in sub.choices.items():
        lines += ["", f"## `peftplan {name}`", "", cmd.description or "", "", "```", cmd.format_usage().strip(), "```",
                  ""]
        for action in cmd._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.dest
            lines.append(f"- `{flag}`: {action.help}")
        if cmd.epilog:
            lines += ["", "```bash", *[line.strip() for line in cmd.epilog.splitlines()[1:]], "```"]
    return "\n".join(lines) + "\n"
