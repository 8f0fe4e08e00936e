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
    (5, "`run --probe` (and the probe `run` starts with on CUDA): the plan's worst-case step does not fit this "
        "device — out of memory, or more than its memory. The message says which spec keys would lower it"),
    (6, "`run --probe`: the step fits, but inside the planner's safety headroom (5% of the device's memory): too "
        "tight to start a long run. The message says which spec keys would lower it"),
    (130, "interrupted (Ctrl-C)"),
)


def _command(sub, name: str, summary: str, description: str, examples: list[str]):
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


SPEC_HELP = "the spec: a TOML file (see docs/spec.md)"
DIR_HELP = "a project folder written by peftplan generate"
NO_CALIBRATION_HELP = ("leave out the local correction `peftplan calibrate` fitted from your runs on this device "
                       "(applied by default, and said so)")


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
    s.add_argument("--no-local-calibration", action="store_true", help=NO_CALIBRATION_HELP)

    s = _command(sub, "plan", "choose a method and settings that fit, with reasons, time and cost",
                 "Choose the method, hyperparameters and batch geometry that fit, with the reasons, the time and the "
                 "cost; the data files, when the spec names them, are read first (format, records, token lengths).",
                 ["peftplan plan spec.toml", "peftplan plan spec.toml --json > plan.json"])
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (docs/json.md)")
    s.add_argument("--no-local-calibration", action="store_true", help=NO_CALIBRATION_HELP)

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
    s.add_argument("--no-local-calibration", action="store_true", help=NO_CALIBRATION_HELP)

    s = _command(sub, "import", "read an axolotl or LLaMA-Factory config into a spec; list what was not mapped",
                 "Read an axolotl or LLaMA-Factory training YAML and write a commented spec that pins every setting "
                 "that changes memory, time or the method to the value that tool runs with (its defaults included), "
                 "so that `peftplan estimate` describes that run. Every key not mapped is listed with why, and where "
                 "the estimate differs from the tool's run the spec says which terms (docs/import.md). The spec goes "
                 "to stdout unless -o is given; the summary and the estimate of the config's method go to stderr.",
                 ["peftplan import qlora.yml --gpu RTX-4090 -o spec.toml",
                  "peftplan import llama3_lora_sft.yaml --gpu A100-80GB > spec.toml",
                  "peftplan import qlora-fsdp-70b.yaml --gpu RTX-3090 --count 2 --model meta-llama/Meta-Llama-3-70B "
                  "-o spec.toml"])
    s.add_argument("config", help="an axolotl or LLaMA-Factory training config (YAML)")
    s.add_argument("--gpu", metavar="NAME",
                   help="the device to plan for, as in hardware.gpu (default: A100-80GB, marked as assumed)")
    s.add_argument("--count", type=positive, metavar="N",
                   help="devices per node (default: 1, or 2 when the config shards with DeepSpeed or FSDP)")
    s.add_argument("--model", metavar="NAME",
                   help="estimate with this model instead of the config's (a catalog id, a local model folder or a "
                        "config.json): for a copy of a model under a name the catalog does not know")
    s.add_argument("-o", "--output", metavar="SPEC",
                   help="write the spec to this file (default: stdout); an existing file is refused")
    s.add_argument("--force", action="store_true", help="replace an existing -o file")

    s = _command(sub, "run", "train a generated project with its bundled runtime",
                 "Train a generated project (one process, or accelerate launch for several devices). One run per "
                 "project at a time. On CUDA it first probes the plan's worst-case step (exit 5 or 6 with advice "
                 "when it does not fit or leaves less than the headroom), so an out-of-memory error comes in the "
                 "first minute, not hours into the run; on the CPU it does not probe unless asked.",
                 ["peftplan run out/my-run", "peftplan run out/my-run --max-steps 5",
                  "peftplan run out/my-run --resume",
                  "peftplan run out/my-run --probe      # measure the worst-case step only, train nothing"])
    s.add_argument("dir", help=DIR_HELP)
    s.add_argument("--max-steps", type=positive, default=None, metavar="N",
                   help="stop after N optimizer steps (a smoke test)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that reads back (older ones if it is damaged)")
    probe = s.add_mutually_exclusive_group()
    probe.add_argument("--probe", action="store_true",
                       help="only probe: load the model as planned, run optimizer steps on micro-batch × full seq_len "
                            "rows, report the measured peak memory and step time next to the prediction "
                            "(outputs/metrics.jsonl); trains nothing further, saves no adapter or checkpoint")
    probe.add_argument("--no-probe", action="store_true",
                       help="on CUDA, train without the probe that otherwise comes first (the CPU never probes "
                            "unless asked)")

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

    s = _command(sub, "calibrate", "fit a local correction (device model × method) from your runs' measurements",
                 "Read the measured-vs-predicted records of runs (outputs/metrics.jsonl: probes, each run's peak "
                 "memory and tokens/s) and keep, per device model × method, the median ratio as a correction that "
                 "`estimate` and `plan` apply and name. Stored with the runs it came from in "
                 "$PEFTPLAN_CONFIG_DIR, else $XDG_CONFIG_HOME/peftplan or ~/.config/peftplan (calibration.json). "
                 "A record that ran on another device than its plan's, or whose ratio is outside the sane band "
                 "(memory 0.8–1.25, tokens/s 0.33–3), is refused with the reason. Without run folders: show it.",
                 ["peftplan calibrate out/run-a out/run-b", "peftplan calibrate",
                  "peftplan calibrate --clear"])
    s.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="project folders that ran (peftplan run, or peftplan run --probe); a folder read again "
                        "replaces what it gave before")
    s.add_argument("--clear", action="store_true", help="forget the local calibration (delete its file)")
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
