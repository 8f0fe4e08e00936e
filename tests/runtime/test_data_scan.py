"""The torch-free scanner against the training pipeline on the same files: same format, same count, same token
lengths with the tokenizer; hand-computed estimates without one; plain-data summary; no torch imported."""

import json
import math
import subprocess
import sys
from collections import Counter

import pytest

pytest.importorskip("transformers", reason="needs the [train] extra")

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402
from peftplan.runtime.data_scan import CHARS_PER_TOKEN, MESSAGE_OVERHEAD, format_summary, scan_data  # noqa: E402
from peftplan.runtime.data_tokenizer import LiteTokenizer  # noqa: E402

FORMATS = ["chat", "sharegpt", "instruction", "completion", "text"]


# a .txt file holds text records only
CASES = [(fmt, ft) for fmt in FORMATS for ft in ("jsonl", "json", "csv", "parquet", "txt")
         if ft != "txt" or fmt == "text"]


@pytest.mark.parametrize("seq_len", [40, 512])
@pytest.mark.parametrize("fmt,file_type", CASES)
def test_scanner_agrees_with_prepare_data(fmt, file_type, seq_len, tok, tok_dir, tmp_path):
    if file_type == "parquet":
        pytest.importorskip("pyarrow")
    path = T.write_dataset(tmp_path / f"d.{file_type}", fmt, 13, file_type)
    prepared = D.prepare_data(path, tok, seq_len=seq_len)
    summary = scan_data(path, seq_len=seq_len, tokenizer_dir=tok_dir)
    f = summary.files[0]
    assert (f.format, f.records, f.valid, summary.ok, summary.method) == (prepared.format, 13, 13, True, "tokenizer")
    assert f.lengths == dict(Counter(len(e["input_ids"]) for e in prepared.train))
    assert f.untrained == prepared.dropped and summary.train_examples == len(prepared.train)
    if seq_len == 40 and fmt in ("chat", "sharegpt", "instruction"):
        assert prepared.dropped > 0  # the short seq_len does drop records whose prompt fills it


def test_scanner_reports_the_problems_training_reports(tok, tok_dir, tmp_path):
    rows = T.example_records("instruction", 14)
    for i in (2, 5, 7, 9, 10, 11, 12, 13):
        del rows[i]["output"]
    path = T.write_records(tmp_path / "bad.jsonl", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok)
    summary = scan_data(path, tokenizer_dir=tok_dir, max_problems=10)
    assert summary.problems == e.value.problems and len(summary.problems) == 9  # 8 invalid records, 1 bad line
    assert summary.problem_count == 9 and summary.files[0].records == 14 and summary.files[0].valid == 6
    assert e.value.problems[-1] == (f"{path}, line 15: invalid JSON (Expecting property name enclosed in double "
                                    "quotes at column 2)")
    lines = format_summary(summary)
    assert lines[2:] == e.value.problems  # after the totals and the file line: one line per problem
    few = scan_data(path, max_problems=2)
    assert few.problems == e.value.problems[:2] and few.problem_count == 9
    assert format_summary(few)[-1] == f"{path}: 7 more problems not shown"


def test_estimates_without_a_tokenizer(tmp_path):
    rows = [{"text": "abcd" * 10},  # 40 characters
            {"prompt": "Q:", "completion": " yes"},
            {"messages": [{"role": "user", "content": "12345678"}, {"role": "assistant", "content": "x" * 12},
                          {"role": "user", "content": "dropped: after the last assistant turn"}]}]
    paths = [T.write_records(tmp_path / f"{i}.jsonl", [r]) for i, r in enumerate(rows)]
    summary = scan_data([str(p) for p in paths], seq_len=2048)
    assert summary.method == "estimate" and summary.chars_per_token == CHARS_PER_TOKEN == 4.0
    # ceil(characters / 4) per piece, +1 EOS; chat: +5 per message (ChatML's 5 tokens around each)
    assert [list(f.lengths) for f in summary.files] == [[10 + 1], [1 + 1 + 1], [2 + 5 + 3 + 5 + 1]]
    assert summary.mean_tokens == pytest.approx((11 + 3 + 16) / 3)
    cut = scan_data(str(paths[0]), seq_len=8)
    assert cut.files[0].lengths == {8: 1} and cut.files[0].at_seq_len == 1
    prompt_fills = T.write_records(tmp_path / "long_prompt.jsonl", [{"prompt": "p" * 40, "completion": "c"}])
    assert scan_data(str(prompt_fills), seq_len=8).files[0].untrained == 1


def test_chat_overhead_per_message_on_the_test_tokenizer(tok):
    """ChatML wraps each message in 4 tokens (<|im_start|>, "\\n", <|im_end|>, "\\n") plus the role name: one token
    in real vocabularies (so MESSAGE_OVERHEAD = 5); the test tokenizer spells role names in several tokens."""
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for record in T.example_records("chat", 6):
        messages = record["messages"]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        overhead = n(rendered) - sum(n(m["content"]) for m in messages) - sum(n(m["role"]) for m in messages)
        assert overhead == 4 * len(messages)
    assert MESSAGE_OVERHEAD == 4 + 1


def test_weights_eval_and_notes(tmp_path):
    a = T.write_dataset(tmp_path / "a.jsonl", "text", 7)
    b = T.write_dataset(tmp_path / "b.txt", "text", 5, "txt")
    ev = T.write_dataset(tmp_path / "ev.csv", "completion", 3, "csv")
    summary = scan_data([str(a), {"path": str(b), "weight": 0.5}], eval_path=str(ev), eval_fraction=0.1)
    assert summary.train_examples == 7 + 3 and summary.eval_examples == 3  # round(0.5 * 5) = 3 (half up)
    assert [(f.role, f.format, f.records) for f in summary.files] == [("train", "text", 7), ("train", "text", 5),
                                                                      ("eval", "completion", 3)]
    assert summary.notes == ["data.eval_fraction = 0.1 is ignored: data.eval_path holds the evaluation examples"]
    lengths = {f.path: f.lengths for f in summary.files}
    total = sum(n * c for n, c in lengths[str(a)].items()) + 0.5 * sum(n * c for n, c in lengths[str(b)].items())
    assert summary.total_tokens == pytest.approx(total) and summary.mean_tokens == pytest.approx(total / 9.5)
    as_dict = summary.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # plain data for the planner
    assert as_dict["train_examples"] == 10 and as_dict["files"][1]["weight"] == 0.5


def test_relative_paths_missing_files_and_hub_names(tmp_path):
    T.write_dataset(tmp_path / "rel.jsonl", "text", 2)
    summary = scan_data(["rel.jsonl", "missing.jsonl", "someorg/some-dataset"], base_dir=tmp_path)
    assert summary.files[0].records == 2
    assert summary.problems == [f"{tmp_path / 'missing.jsonl'}: file not found"]
    assert summary.files[2].note.startswith("a hub dataset name: not scanned")
    with pytest.raises(D.DataError, match=r"data.path\[0\].weight"):
        scan_data([{"path": "x.jsonl", "weight": -1}])


def test_lite_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    generation = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
                  "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
                  "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = T.example_records("chat", 4)[3]["messages"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    calls = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": "é"}}}]},
             {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}]
    for name, kw, convo, extra in [("chatml", {}, messages, {}), ("bos", {"add_bos": True}, messages, {}),
                                   ("tools", {"chat_template": T.TOOL_CHAT_TEMPLATE}, calls, {"tools": tools}),
                                   ("generation", {"chat_template": generation}, messages, {})]:
        T.build_tokenizer(tmp_path / name, **kw)
        hf, lite = AutoTokenizer.from_pretrained(tmp_path / name), LiteTokenizer(tmp_path / name)
        for gen in (False, True):
            a = hf.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen, **extra)
            assert lite.apply_chat_template(convo, add_generation_prompt=gen, **extra) == a
        text = "The quiet teacher <|im_end|> reads, é €."
        for special in (False, True):
            assert lite(text, add_special_tokens=special)["input_ids"] == \
                hf(text, add_special_tokens=special)["input_ids"]
        assert lite.eos_token_id == hf.eos_token_id and lite.get_vocab() == hf.get_vocab()
    with pytest.raises(D.DataError, match="no tokenizer.json"):
        LiteTokenizer(tmp_path)


def test_scanner_imports_no_torch(tok_dir, tmp_path):
    path = T.write_dataset(tmp_path / "d.jsonl", "chat", 5)
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'accelerate', 'numpy'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from peftplan.runtime.data_scan import scan_data\n"
        "s = scan_data(sys.argv[1], seq_len=64, tokenizer_dir=sys.argv[2])\n"
        "print(s.method, s.train_examples, s.ok)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tok_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tokenizer", "5", "True"]


def test_estimate_is_close_to_the_count_on_english(tok_dir, tmp_path):
    """Not a bound, a sanity check of the constant: within a factor of 2 of the test tokenizer's exact count."""
    path = T.write_dataset(tmp_path / "d.jsonl", "text", 40)
    exact, estimate = scan_data(path, tokenizer_dir=tok_dir), scan_data(path)
    assert 0.5 < estimate.mean_tokens / exact.mean_tokens < 2
    assert math.isclose(estimate.files[0].examples, exact.files[0].examples)
