"""Sampling base vs trained: the prompts it takes (held-out split, prompts files), completions that match an
independent `model.generate` for every method, and an output file that is replaced only when it is our own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peftplan.runtime.data_formats import DataError  # noqa: E402
from peftplan.runtime.sample import SampleError, Settings, main, sample, side_by_side  # noqa: E402
from peftplan.runtime.sample_prompts import prompts_from_file  # noqa: E402

NEW = 8  # tokens generated per prompt in these tests
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def write_plan(project: Path, method: str = "lora", eval_fraction: float = 0.25, data: str = "data.jsonl") -> Path:
    method_table = {"name": method}
    if method != "full":
        method_table.update(rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    plan = {
        "provenance": {"peftplan_version": "0.0.test"},
        "model": {"name": "../model"},
        "method": method_table,
        "data": {"path": data, "format": "auto", "seq_len": 96, "packing": False, "eval_fraction": eval_fraction},
        "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                     "optimizer": "adamw_torch", "learning_rate": 1e-3, "epochs": 1.0, "precision": "fp32",
                     "seed": 7},
        "output": {"dir": "outputs"},
    }
    project.mkdir(parents=True, exist_ok=True)
    (project / "plan.toml").write_text(tomli_w.dumps(plan))
    return project / "plan.toml"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from peftplan.runtime.testing import build_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("sample")
    build_tiny_model(root / "model", family="llama")
    for name in ("lora", "dora", "qlora", "qdora", "full", "noeval"):
        write_dataset(root / name / "data.jsonl", "chat", 24)
    return root


def base_model(root: Path, method: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method in ("qlora", "qdora"):
        q = BitsAndBytesConfig(**BNB, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, quantization_config=q)
    return AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)


def make_trained(root: Path, method: str) -> Path:
    """A project whose outputs/final is a deterministic non-trivial 'training' result: LoRA-family adapters with
    their B matrices set from a seeded generator (peft starts them at zero), or a full model with perturbed weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    project = root / method
    plan = write_plan(project, "lora" if method == "noeval" else method, 0.0 if method == "noeval" else 0.25)
    final = project / "outputs" / "final"
    if final.exists():
        return plan
    g = torch.Generator().manual_seed(123)
    model = base_model(root, method if method != "noeval" else "lora")
    if method == "full":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(final)
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                         use_dora=method in ("dora", "qdora"), task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(final)
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(final)
    return plan


def greedy(model, tok, text: str, special: bool) -> str:
    """The independent route: plain transformers generate, default greedy decoding of the tiny model's config."""
    ids = tok(text, add_special_tokens=special, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qdora", "full"])
def test_completions_match_an_independent_generate(root, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = make_trained(root, method)
    result = sample(plan, n=3, settings=Settings(max_new_tokens=NEW))
    rows = records(Path(result["out"]))
    assert rows == result["rows"] and len(rows) == 3
    final = plan.parent / "outputs" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    data = [json.loads(line) for line in (plan.parent / "data.jsonl").read_text().splitlines()]
    base = base_model(root, method)
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    else:
        tuned = PeftModel.from_pretrained(base_model(root, method), final)
    for row in rows:
        # the prompt: the record's conversation up to its last user turn, through the chat template
        line = int(row["source"].rsplit(":", 1)[1])
        messages = data[line - 1]["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        assert row["prompt"] == tok.apply_chat_template(messages[:last_user + 1], tokenize=False,
                                                        add_generation_prompt=True)
        assert row["reference"] == messages[last_user + 1]["content"]
        assert row["source"] == f"data.jsonl:{line}"
        assert row["base"] == greedy(base, tok, row["prompt"], False)
        assert row["tuned"] == greedy(tuned, tok, row["prompt"], False)
    assert any(r["base"] != r["tuned"] for r in rows)  # the perturbed weights change what the model says


@pytest.mark.slow
def test_held_out_prompts_are_the_split_training_used(root):
    from transformers import AutoTokenizer

    from peftplan.runtime.config import data_arguments, load_config
    from peftplan.runtime.data import prepare_data
    from peftplan.runtime.sample_prompts import prompts_from_plan

    plan = make_trained(root, "lora")
    config = load_config(plan)
    tok = AutoTokenizer.from_pretrained(root / "model")
    args = data_arguments(config)
    prepared = prepare_data(args.pop("sources"), tok, **args)
    held = [tok.decode(ex["input_ids"]) for ex in prepared.eval]
    trained = [tok.decode(ex["input_ids"]) for ex in prepared.train]
    data = [json.loads(line) for line in (plan.parent / "data.jsonl").read_text().splitlines()]
    full = [tok.apply_chat_template(r["messages"], tokenize=False) for r in data]
    # an example is its record's whole conversation, or (cut at seq_len) a prefix of it
    expected = {i + 1 for i, text in enumerate(full) if any(h.startswith(text) or text.startswith(h) for h in held)}
    assert len(expected) == 6 and not any(t.startswith(full[i - 1]) or full[i - 1].startswith(t)
                                          for t in trained for i in expected)
    prompts, note = prompts_from_plan(config, tok, 100)
    assert {int(p.source.rsplit(":", 1)[1]) for p in prompts} == expected
    assert note.startswith("the held-out split (data.eval_fraction = 0.25, seed 7)")
    # --n takes the first of them, in file order
    first, _ = prompts_from_plan(config, tok, 2)
    assert [p.source for p in first] == [p.source for p in prompts[:2]]


@pytest.mark.slow
def test_without_a_held_out_split_it_says_the_model_saw_them(root, capsys):
    plan = make_trained(root, "noeval")
    assert main(["--config", str(plan), "--n", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "the first training examples: this plan holds no examples out" in out
    rows = records(plan.parent / "outputs" / "samples.jsonl")
    assert [r["source"] for r in rows] == ["data.jsonl:1", "data.jsonl:2"]
    # the side-by-side: each shown row's source, prompt end, reference, and both completions
    assert "[1] data.jsonl:1" in out and "[2] data.jsonl:2" in out
    assert out.count("    base      │ ") == 2 and out.count("    tuned     │ ") == 2
    assert f"wrote {plan.parent / 'outputs' / 'samples.jsonl'}" in out


def test_side_by_side_is_one_line_per_field():
    rows = [{"source": "a.txt:1", "prompt": "x" * 500 + "\nQ?", "base": "", "tuned": "line1\nline2\x1b[31m"}]
    lines = side_by_side(rows)
    assert lines == ["[1] a.txt:1", f"    prompt    │ …{('x' * 500 + '⏎Q?')[-120:]}",
                     "    base      │ (nothing: the model ended at once)",
                     "    tuned     │ line1⏎line2\\x1b[31m"]


# ------------------------------------------------------------------------------------------ prompts files


def test_txt_prompts_one_per_line_or_per_block(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("Where is the cat?\nWhere is the dog?\n\n")
    got = prompts_from_file(lines, chat=True)
    assert [p.messages for p in got] == [[{"role": "user", "content": "Where is the cat?"}],
                                         [{"role": "user", "content": "Where is the dog?"}]]
    assert [p.source for p in got] == [f"{lines}:1", f"{lines}:2"]
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("First prompt,\nstill the first.\n\nSecond prompt.\n")
    got = prompts_from_file(blocks, chat=False)
    assert [(p.text, p.source) for p in got] == [("First prompt,\nstill the first.", f"{blocks}:1"),
                                                 ("Second prompt.", f"{blocks}:4")]


def test_jsonl_prompts_of_every_kind(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Tell me about the river."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {"conversations": [{"from": "human", "value": "Where?"}]},
        {"instruction": "Answer briefly.", "input": "Where is the cat?", "output": "Home."},
        {"text": "Once upon a time"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = prompts_from_file(f, chat=False)
    assert got[0].text == "Tell me about the river." and got[0].messages is None
    assert got[1].messages == rows[1]["messages"] and got[1].reference is None
    assert got[2].messages == rows[2]["messages"][:3] and got[2].reference == "A2"  # up to the last user turn
    assert got[3].messages == [{"role": "user", "content": "Where?"}]
    assert got[4].text == "### Instruction:\nAnswer briefly.\n\n### Input:\nWhere is the cat?\n\n### Response:\n"
    assert got[4].reference == "Home."
    assert got[5].text == "Once upon a time"
    assert [p.source for p in got] == [f"{f}:{i}" for i in range(1, 7)]
    assert len(prompts_from_file(f, chat=False, limit=2)) == 2
    chat = prompts_from_file(f, chat=True)  # plain prompts become a user turn when the training data is chat
    assert chat[0].messages == [{"role": "user", "content": "Tell me about the river."}]


def test_bad_prompt_records_are_named_by_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"question": "no"}\nnot json\n'
                 '{"messages": [{"role": "assistant", "content": "only an answer"}]}\n')
    with pytest.raises(DataError) as err:
        prompts_from_file(f, chat=False)
    text = str(err.value)
    assert text.startswith(f"{f}: 3 invalid records")
    assert "line 2: expected one of the keys messages, conversations, instruction, prompt, text; found question" in text
    assert "line 3: " in text and "line 4: 'messages' has no user turn to answer" in text


@pytest.mark.slow
def test_prompts_file_through_main(root, tmp_path, capsys):
    from transformers import AutoTokenizer

    plan = make_trained(root, "lora")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Where is the red cat?\nWhere is the small dog?\n")
    out = tmp_path / "s.jsonl"
    assert main(["--config", str(plan), "--prompts", str(prompts), "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = records(out)
    tok = AutoTokenizer.from_pretrained(root / "model")
    assert [r["prompt"] for r in rows] == [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Where is the red cat?", "Where is the small dog?")]  # the training data is chat
    assert [r["source"] for r in rows] == [f"{prompts}:1", f"{prompts}:2"] and "reference" not in rows[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    assert main(["--config", str(plan), "--prompts", str(bad), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert f"error: {bad}, line 1: expected one of the keys" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()


# ------------------------------------------------------------------------------------------ the output file


@pytest.mark.slow
def test_output_replaced_only_when_it_is_ours(root, tmp_path, capsys):
    plan = make_trained(root, "lora")
    out = tmp_path / "samples.jsonl"
    out.write_text("my own notes\n")
    args = ["--config", str(plan), "--n", "1", "--max-new-tokens", "2", "--out", str(out)]
    assert main(args) == 2
    assert "exists and is not an earlier output of this command" in capsys.readouterr().err
    assert out.read_text() == "my own notes\n"  # untouched
    out.unlink()
    assert main(args) == 0
    first = out.read_text()
    assert main(args) == 0  # our own earlier output: replaced
    assert out.read_text() == first  # greedy: the same every run
    out.write_text(first + "edited\n")
    assert main(args) == 2  # edited since: the user's now
    assert out.read_text() == first + "edited\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".samples.jsonl.peftplan", "samples.jsonl"]  # no temp files


def test_refusals_before_loading_anything(tmp_path, capsys):
    plan = write_plan(tmp_path / "p")
    assert main(["--config", str(plan)]) == 2
    assert "outputs/final does not exist (train first" in capsys.readouterr().err
    (tmp_path / "p" / "outputs" / "final").mkdir(parents=True)
    with pytest.raises(SampleError, match="no trained model in"):
        sample(plan)
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "plan file not found" in capsys.readouterr().err
