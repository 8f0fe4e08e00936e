"""runtime/data.py with a real tokenizer trained by runtime/testing.py: file types, formats, labels, errors,
packing, collation, split, stats. No mocks; nothing downloaded."""

import ast
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch, transformers)")
pytest.importorskip("transformers", reason="needs the [train] extra")

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402

FORMATS = ["chat", "sharegpt", "instruction", "completion", "text"]
FILE_TYPES = ["jsonl", "json", "csv", "parquet"]
EOS = "<|eos|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_bos(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok_bos"), add_bos=True)


@pytest.fixture(scope="module")
def tok_plain(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok_plain"), chat_template=None)


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])


def records_of(rows, path="mem.jsonl"):
    return [D.Record(r, path, f"line {i + 1}") for i, r in enumerate(rows)]


def write_lines(path: Path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- artifacts


def test_tokenizer_is_real_and_reloads_offline(tok, tmp_path):
    assert 500 <= len(tok) <= 1000
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    text = "The quiet teacher reads a strange letter near the lake."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) < len(text) // 2  # merges were learned
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_tiny_model_loads_with_its_tokenizer(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = T.build_tiny_model(tmp_path / family, family=family)
    assert (path / "model.safetensors").exists()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and tok.chat_template
    ids = torch.tensor([tok("The cat sees the dog.")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_runtime_modules_import_nothing_from_the_planner():
    runtime = Path(D.__file__).parent
    names = sorted(p.name for p in runtime.glob("data*.py")) + ["testing.py"]
    assert len(names) >= 10  # data, data_chat, data_files, data_formats, data_json, data_read, data_scan, ...
    for name in names:
        tree = ast.parse((runtime / name).read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                assert not any(k in m.split(".") for k in ("planner", "schemas")), f"{name} imports {m}"


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_type_and_format_loads(fmt, file_type, tok, tmp_path):
    if file_type == "parquet":
        pytest.importorskip("pyarrow")
    path = T.write_dataset(tmp_path / f"d.{file_type}", fmt, 7, file_type)
    records = D.load_records(path)
    assert len(records) == 7
    assert D.resolve_format(records, "auto", tok) == fmt == D.resolve_format(records, fmt, tok)
    examples = D.tokenize_records(records, fmt, tok, seq_len=256)
    assert len(examples) == 7
    expected = T.example_records(fmt, 7)
    for ex, rec in zip(examples, expected, strict=True):
        assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
        response = {"chat": lambda r: r["messages"][-1]["content"], "instruction": lambda r: r["output"],
                    "sharegpt": lambda r: r["conversations"][-1]["value"],
                    "completion": lambda r: r["completion"], "text": lambda r: r["text"]}[fmt](rec)
        assert response in trained_text(tok, ex)


def test_json_data_wrapper_and_blank_jsonl_lines(tok, tmp_path):
    rows = T.example_records("completion", 3)
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": rows}))
    assert [r.data for r in D.load_records(wrapped)] == rows
    # one line: the line each record starts on, and its index in the list
    assert [r.where for r in D.load_records(wrapped)] == [f"line 1 (record index {i})" for i in range(3)]
    jl = write_lines(tmp_path / "b.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    assert [r.where for r in D.load_records(jl)] == ["line 1", "line 3"]


def test_parquet_without_pyarrow_says_to_install_it(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(D.DataError, match="pyarrow"):
            D.load_records(path)
    else:
        pytest.skip("pyarrow is installed; the round trip is covered by test_every_file_type_and_format_loads")


# ---------------------------------------------------------------------------------------------------- detection


def test_auto_detection_ambiguous_and_unknown_keys(tmp_path):
    amb = write_lines(tmp_path / "amb.jsonl", [json.dumps({"text": "a", "prompt": "b", "completion": "c"})])
    with pytest.raises(D.DataError) as e:
        D.resolve_format(D.load_records(amb))
    msg = str(e.value)
    assert str(amb) in msg and "line 1" in msg and "ambiguous" in msg and "completion, prompt, text" in msg

    unk = write_lines(tmp_path / "unk.jsonl", ["", json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(D.DataError) as e:
        D.resolve_format(D.load_records(unk))
    msg = str(e.value)
    assert str(unk) in msg and "line 2" in msg and "answer, question" in msg and "messages" in msg


def test_unknown_format_missing_file_and_unsupported_type(tmp_path):
    rec = records_of([{"text": "x"}])
    with pytest.raises(D.DataError, match="unknown data format 'alpaca'"):
        D.resolve_format(rec, "alpaca")
    with pytest.raises(D.DataError, match="nope.jsonl: file not found"):
        D.load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("hi")
    with pytest.raises(D.DataError, match="unsupported file type '.xml'"):
        D.load_records(tmp_path / "d.xml")


# ---------------------------------------------------------------------------------------------------- labels


def test_instruction_trains_only_the_output(tok):
    rec = {"instruction": "Where is the red cat?", "input": "Think about the park.", "output": "It is in the park."}
    ex = D.tokenize_record(rec, "instruction", tok, 512)
    assert trained_text(tok, ex) == "It is in the park." + EOS
    full = tok.decode(ex["input_ids"])
    assert full.endswith("It is in the park." + EOS)
    assert rec["instruction"] in full and rec["input"] in full
    n_trained = sum(lab != -100 for lab in ex["labels"])
    assert ex["labels"][-n_trained:] == ex["input_ids"][-n_trained:]  # one contiguous run at the end
    assert all(lab == -100 for lab in ex["labels"][:-n_trained])
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_completion_and_text_labels(tok):
    ex = D.tokenize_record({"prompt": "Question: Where is the dog?\nAnswer:", "completion": " At home."},
                           "completion", tok, 512)
    assert trained_text(tok, ex) == " At home." + EOS
    assert tok.decode(ex["input_ids"]) == "Question: Where is the dog?\nAnswer: At home." + EOS
    ex = D.tokenize_record({"text": "The dog is at home."}, "text", tok, 512)
    assert ex["labels"] == ex["input_ids"] and tok.decode(ex["input_ids"]) == "The dog is at home." + EOS


def test_tokenizer_that_adds_bos(tok_bos):
    ex = D.tokenize_record({"prompt": "Q:", "completion": " yes"}, "completion", tok_bos, 64)
    assert ex["input_ids"][0] == tok_bos.bos_token_id and ex["labels"][0] == -100
    assert ex["input_ids"].count(tok_bos.bos_token_id) == 1
    assert trained_text(tok_bos, ex) == " yes" + EOS
    ex = D.tokenize_record({"text": "hello there"}, "text", tok_bos, 64)
    assert ex["input_ids"][0] == tok_bos.bos_token_id and ex["labels"] == ex["input_ids"]


def test_chat_trains_only_the_two_assistant_turns(tok):
    messages = [{"role": "system", "content": "You are a careful farmer."},
                {"role": "user", "content": "Where is the old boat?"},
                {"role": "assistant", "content": "The old boat is by the sea."},
                {"role": "user", "content": "And the green apple?"},
                {"role": "assistant", "content": "It is in the kitchen."}]
    ex = D.tokenize_record({"messages": messages}, "chat", tok, 512)
    # ChatML, written out here by hand: each assistant turn is its content and "<|im_end|>\n"
    expected_full = ("<|im_start|>system\nYou are a careful farmer.<|im_end|>\n"
                     "<|im_start|>user\nWhere is the old boat?<|im_end|>\n"
                     "<|im_start|>assistant\nThe old boat is by the sea.<|im_end|>\n"
                     "<|im_start|>user\nAnd the green apple?<|im_end|>\n"
                     "<|im_start|>assistant\nIt is in the kitchen.<|im_end|>\n" + EOS)
    assert tok.decode(ex["input_ids"]) == expected_full
    assert trained_text(tok, ex) == ("The old boat is by the sea.<|im_end|>\n"
                                     "It is in the kitchen.<|im_end|>\n" + EOS)
    trained = [lab != -100 for lab in ex["labels"]]
    starts = [i for i, t in enumerate(trained) if t and (i == 0 or not trained[i - 1])]
    ends = [i for i, t in enumerate(trained) if t and (i + 1 == len(trained) or not trained[i + 1])]
    assert len(starts) == len(ends) == 2  # two contiguous trained runs
    assert tok.decode(ex["input_ids"][starts[0]:ends[0] + 1]) == "The old boat is by the sea.<|im_end|>\n"
    assert tok.decode(ex["input_ids"][starts[1]:]) == "It is in the kitchen.<|im_end|>\n" + EOS


def test_chat_with_a_template_that_ends_turns_with_eos(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    tok = T.build_tokenizer(tmp_path / "t", chat_template=template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."},
                {"role": "user", "content": "trailing turn, dropped"}]
    ex = D.tokenize_record({"messages": messages}, "chat", tok, 512)
    assert trained_text(tok, ex) == "Hello." + EOS + "Goodbye." + EOS  # no extra EOS: the template has one
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1
    assert "trailing" not in tok.decode(ex["input_ids"])


def test_truncation_and_untrained_examples_are_dropped(tok, tmp_path):
    ex = D.tokenize_record({"text": " ".join(["the big red cat"] * 50)}, "text", tok, 16)
    assert len(ex["input_ids"]) == 16 and ex["input_ids"][-1] != tok.eos_token_id
    rows = [{"prompt": "word " * 40, "completion": " yes"}, {"prompt": "Q:", "completion": " no"}]
    path = T.write_records(tmp_path / "c.jsonl", rows)
    prepared = D.prepare_data(path, tok, seq_len=20)
    assert prepared.dropped == 1 and len(prepared.train) == 1


# ---------------------------------------------------------------------------------------------------- errors


def test_jsonl_missing_field_names_file_and_line(tok, tmp_path):
    rows = T.example_records("instruction", 4)
    del rows[2]["output"]
    path = T.write_records(tmp_path / "bad.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok, format="auto")
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "missing field 'output'" in msg
    assert "keys found: input, instruction" in msg and "line 1" not in msg and e.value.problems


def test_at_most_ten_bad_records_reported(tmp_path):
    rows = [{"prompt": "p", "completion": ""} for _ in range(12)]
    path = T.write_records(tmp_path / "many.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        D.resolve_format(D.load_records(path), "completion")
    msg = str(e.value)
    assert "12 invalid records" in msg and "first 10 shown" in msg
    assert "line 10:" in msg and "line 11:" not in msg and len(e.value.problems) == 10


def test_csv_and_json_locations(tmp_path):
    csv_path = T.write_records(tmp_path / "bad.csv", [{"text": "ok"}, {"text": ""}, {"text": "ok"}])
    with pytest.raises(D.DataError) as e:  # one problem: one line naming the file and the line (header = line 1)
        D.resolve_format(D.load_records(csv_path), "text")
    assert str(e.value) == f"{csv_path}, line 3: field 'text' is empty (format 'text'; keys found: text)"
    json_path = T.write_records(tmp_path / "bad.json", [{"text": "ok"}, {"text": 5}])
    second = json_path.read_text().split("\n").index(" {", 2) + 1  # the line the second object starts on
    with pytest.raises(D.DataError) as e:
        D.resolve_format(D.load_records(json_path), "text")
    assert str(e.value) == (f"{json_path}, line {second} (record index 1): field 'text' must be a string, got int "
                            "(format 'text'; keys found: text)")


def test_invalid_json_lines(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", ['{"text": "a"}', '{"text": ', '["not", "an object"]'])
    with pytest.raises(D.DataError) as e:
        D.load_records(path)
    msg = str(e.value)
    assert "line 2: invalid JSON" in msg and "line 3: expected a JSON object, got list" in msg


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"),
                                          ("e.csv", "text\n")])
def test_empty_dataset(name, content, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(D.DataError, match=rf"{name}: no records"):
        D.load_records(path)


def test_chat_without_assistant_turn(tok, tmp_path):
    rows = T.example_records("chat", 3)
    rows[1] = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    path = T.write_records(tmp_path / "chat.jsonl", rows)
    with pytest.raises(D.DataError, match=r"line 2: no assistant turn"):
        D.prepare_data(path, tok)
    rows[1] = {"messages": [{"role": "bot", "content": "x"}]}
    path = T.write_records(tmp_path / "chat2.jsonl", rows)
    with pytest.raises(D.DataError, match=r"line 2: messages\[0\] has role 'bot'"):
        D.prepare_data(path, tok)


def test_chat_format_needs_a_chat_template(tok_plain, tmp_path):
    path = T.write_dataset(tmp_path / "chat.jsonl", "chat", 3)
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok_plain)
    assert str(path) in str(e.value) and "no chat template" in str(e.value)
    D.prepare_data(T.write_dataset(tmp_path / "c.jsonl", "completion", 3), tok_plain)  # other formats are fine


# ---------------------------------------------------------------------------------------------------- packing


def _packed(tok, seq_len, n=9, drop_last=False):
    examples = D.tokenize_records(records_of(T.example_records("chat", n)), "chat", tok, 512)
    return examples, D.pack(examples, seq_len, D.pad_token_id(tok), drop_last=drop_last)


@pytest.mark.parametrize("seq_len", [32, 100, 1000])
def test_packing_rows_and_labels(tok, seq_len):
    examples, rows = _packed(tok, seq_len)
    total = sum(len(e["input_ids"]) for e in examples)
    assert len(rows) == -(-total // seq_len)
    for r in rows:
        assert all(len(r[k]) == seq_len for k in ("input_ids", "labels", "attention_mask", "position_ids"))
        assert r["attention_mask"] == [1] * seq_len and r["position_ids"][0] == 0
    flat = [x for r in rows for x in r["input_ids"]]
    assert flat[:total] == [x for e in examples for x in e["input_ids"]]
    assert set(flat[total:]) <= {tok.pad_token_id}
    # trained labels: the examples' own, less each example's first token (never predicted across a boundary)
    expected = [x for e in examples for x in [-100] + e["labels"][1:] if x != -100]
    assert [x for r in rows for x in r["labels"] if x != -100] == expected


def test_packing_position_ids_restart_per_example(tok):
    examples, rows = _packed(tok, 1000, n=3)
    lengths = [len(e["input_ids"]) for e in examples]
    expected = [p for n in lengths for p in range(n)]
    assert rows[0]["position_ids"][: sum(lengths)] == expected
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(rows[0]["labels"][s] == -100 for s in starts)
    _, dropped = _packed(tok, 100, drop_last=True)
    _, padded = _packed(tok, 100)
    assert len(dropped) == len(padded) - 1 and dropped == padded[:-1]


def test_packed_examples_do_not_attend_to_each_other(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    path = T.build_tiny_model(tmp_path / "m", family="llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    examples = D.tokenize_records(records_of(T.example_records("text", 3)), "text", tok, 64)
    rows = D.pack(examples, sum(len(e["input_ids"]) for e in examples), D.pad_token_id(tok))
    batch = D.DataCollator.from_tokenizer(tok)(rows)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
                           for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- collator


def test_collator_pads_to_the_longest(tok):
    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = D.DataCollator.from_tokenizer(tok)(examples)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    batch = D.DataCollator(pad_token_id=0, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].shape == (2, 4)


def test_collator_pads_with_eos_when_there_is_no_pad_token(tmp_path):
    from transformers import AutoTokenizer

    tok = T.build_tokenizer(tmp_path / "t")
    tok.pad_token = None
    assert tok.pad_token_id is None
    batch = D.DataCollator.from_tokenizer(tok)([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7]}])
    assert batch["input_ids"][1, 1].item() == tok.eos_token_id
    assert batch["labels"].tolist() == [[5, 6], [7, -100]]
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "t").pad_token_id, int)


def test_collator_over_real_examples(tok):
    examples = D.tokenize_records(records_of(T.example_records("instruction", 5)), "instruction", tok, 512)
    batch = D.DataCollator.from_tokenizer(tok)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, longest)
    assert batch["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in examples)


# ---------------------------------------------------------------------------------------------------- split, stats


def test_split_is_deterministic():
    items = list(range(100))
    train, evals = D.split(items, 0.1, seed=3)
    assert (train, evals) == D.split(items, 0.1, seed=3)
    assert len(evals) == 10 and sorted(train + evals) == items and not set(train) & set(evals)
    assert train == sorted(train) and evals == sorted(evals)
    assert D.split(items, 0.1, seed=4)[1] != evals
    assert D.split(items, 0.0) == (items, [])
    assert len(D.split(items[:5], 0.01)[1]) == 1
    with pytest.raises(D.DataError):
        D.split([1], 0.5)
    with pytest.raises(D.DataError):
        D.split(items, 1.0)


def test_token_stats():
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [1, 2], "labels": [1, 2]}]
    s = D.token_stats(examples)
    assert (s.count, s.mean_tokens, s.max_tokens, s.trained_fraction) == (2, 3.0, 4, 4 / 6)
    assert s.as_dict()["trained_tokens"] == 4
    assert D.token_stats([]).count == 0


def test_prepare_data_end_to_end(tok, tmp_path):
    path = T.write_dataset(tmp_path / "d.csv", "chat", 20, "csv")
    a = D.prepare_data(path, tok, seq_len=64, eval_fraction=0.2, seed=1, packing=True)
    b = D.prepare_data(path, tok, seq_len=64, eval_fraction=0.2, seed=1, packing=True)
    assert a.format == "chat" and a.packed and a.train == b.train and a.eval == b.eval and a.eval
    assert all(len(r["input_ids"]) == 64 for r in a.train + a.eval)
    stats = a.stats()
    assert 0 < stats["train"]["trained_fraction"] < 1 and stats["train"]["max_tokens"] == 64
    unpacked = D.prepare_data(path, tok, seq_len=512, eval_fraction=0.2, seed=1)
    assert len(unpacked.train) == 16 and len(unpacked.eval) == 4
    ev = D.prepare_data(path, tok, seq_len=512, eval_path=T.write_dataset(tmp_path / "e.jsonl", "chat", 3))
    assert len(ev.train) == 20 and len(ev.eval) == 3


def test_hub_dataset_name_offline_is_a_clear_error(monkeypatch):
    from peftplan.runtime.data import DataError, load_records

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as exc:
        load_records("someorg/some-dataset")
    assert "someorg/some-dataset" in str(exc.value) and "HF_HUB_OFFLINE" in str(exc.value)
    with pytest.raises(DataError) as exc:  # a missing local file is still "file not found"
        load_records("missing/file.jsonl")
    assert "file not found" in str(exc.value)
