"""Hostile and broken data files: each gives one DataError line naming the file and the line (checked as exact
text), through load_records, prepare_data (with a real tokenizer: never blamed on the model) and scan_data."""

import csv
import io
import json
import sys
import tracemalloc

import pytest

pytest.importorskip("transformers", reason="needs the [train] extra")

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import data_read  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402
from peftplan.runtime.data_scan import scan_data  # noqa: E402

OK = b'{"text": "ok"}\n'
DIGITS = sys.get_int_max_str_digits()  # 4300 unless PYTHONINTMAXSTRDIGITS says otherwise


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok"))


def fails_the_same_everywhere(path, tok, expected: str):
    """load_records, prepare_data and scan_data all report exactly `expected` (one line)."""
    for call in (lambda: D.resolve_format(D.load_records(path)), lambda: D.prepare_data(path, tok)):
        with pytest.raises(D.DataError) as e:
            call()
        assert str(e.value) == expected
    summary = scan_data(path)
    assert summary.problems == [expected] and not summary.ok


CASES = {
    "latin1.jsonl": (OK + b'{"text": "caf\xe9"}\n',
                     "line 2: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8"),
    "latin1.json": (b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]',
                    "line 3: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8 (reading stopped here)"),
    "latin1.csv": (b'text\nok\n"two\nlines"\ncaf\xe9\n',
                   "line 5: not UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8 (reading stopped here)"),
    "latin1.txt": (b"doc one\n\ndoc\ntw\xe9o\n\ndoc three\n",
                   "line 4: not UTF-8 text (byte 0xe9 at column 3); save the file as UTF-8"),
    "bigint.jsonl": (OK + b'{"text": "a", "id": ' + b"9" * 5000 + b"}\n",
                     f"line 2: invalid JSON: a number with more than {DIGITS} digits (the most Python reads)"),
    "bigint.json": (b'[{"text": "ok"},\n {"id": ' + b"9" * 5000 + b"}]",
                    f"line 2: invalid JSON: a number with more than {DIGITS} digits (the most Python reads) "
                    "(reading stopped here)"),
    "deep.jsonl": (OK + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                   "line 2: invalid JSON: nested deeper than Python's JSON reader allows"),
    "deep.json": (b'[{"text": "ok"},\n\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]",
                  "line 3: invalid JSON: nested deeper than Python's JSON reader allows (reading stopped here)"),
    "surrogate.jsonl": (OK + b'{"text": "a\\ud800b"}\n',
                        "line 2: field 'text' contains an unpaired surrogate \\ud800 at character 1 (not valid "
                        "Unicode) (format 'text'; keys found: text)"),
    "cell.csv": (b'messages\n"' + b"[" * 50_000 + b'"\n',
                 "line 2: 'messages' must be a non-empty list of {role, content} or {from, value} objects "
                 "(format 'chat'; keys found: messages)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_record_names_file_and_line(name, tok, tmp_path):
    content, problem = CASES[name]
    path = tmp_path / name
    path.write_bytes(content)
    fails_the_same_everywhere(path, tok, f"{path}, {problem}")


@pytest.mark.parametrize("name,content,problem", [
    ("u16.jsonl", '{"text": "ok"}\n'.encode("utf-16"),
     ": the file is UTF-16 or UTF-32 text (it starts with that byte order mark); save it as UTF-8"),
    ("u16.csv", "text\nok\n".encode("utf-16-be"),
     ", line 1: a NUL byte: this is binary data or UTF-16/32 text, not UTF-8; save it as UTF-8"),
    ("empty.txt", b"\n \n\t\n", ": no records (the dataset is empty)"),
])
def test_files_that_are_not_utf8_text(name, content, problem, tok, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    fails_the_same_everywhere(path, tok, f"{path}{problem}")


@pytest.mark.parametrize("name,content", [
    ("bom.jsonl", b'\xef\xbb\xbf{"text": "ok"}\n'), ("bom.json", b'\xef\xbb\xbf[{"text": "ok"}]'),
    ("bom.csv", b"\xef\xbb\xbftext\nok\n"), ("bom.txt", b"\xef\xbb\xbfok\n"),
])
def test_a_utf8_bom_is_accepted(name, content, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    assert [r.data for r in D.load_records(path)] == [{"text": "ok"}]
    assert scan_data(path).files[0].valid == 1


# ---------------------------------------------------------------------------------------------------- CSV lines


def test_csv_lines_after_multi_line_fields(tmp_path):
    rows = [{"prompt": "one", "completion": " a"}, {"prompt": "two\nlines", "completion": " b"},
            {"prompt": "three\n\nlines\r\nhere", "completion": " c"}, {"prompt": "x", "completion": ""}]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["prompt", "completion"])
    w.writeheader()
    starts, line = [], 2  # the header is line 1
    for r in rows:
        before = buf.tell()
        w.writerow(r)
        starts.append(line)
        line += buf.getvalue()[before:].count("\n")  # \r\n ends a row; newlines inside quotes count too
    path = tmp_path / "multi.csv"
    path.write_bytes(buf.getvalue().encode())
    records = D.load_records(path)
    assert [r.where for r in records] == [f"line {n}" for n in starts]
    assert [r.data for r in records] == rows
    with pytest.raises(D.DataError) as e:
        D.resolve_format(records, "completion")
    assert str(e.value) == (f"{path}, line {starts[3]}: field 'completion' is empty (format 'completion'; "
                            "keys found: completion, prompt)")


def test_csv_field_over_the_limit_names_its_first_line(tmp_path, monkeypatch):
    long_ok = "word " * 40_000  # 200,000 characters: over Python's default csv field limit (131,072)
    path = tmp_path / "long.csv"
    path.write_text(f'text\nok\n"{long_ok}"\n', encoding="utf-8")
    assert [len(r.data["text"]) for r in D.load_records(path)] == [2, 200_000]
    monkeypatch.setattr(data_read, "CSV_FIELD_LIMIT", 1000)
    path.write_text('text\nok\n"multi\nline"\n"' + "x" * 400 + "\n" + "y" * 700 + '"\nafter\n', encoding="utf-8")
    with pytest.raises(D.DataError) as e:
        D.load_records(path)
    assert str(e.value) == (f"{path}, line 5: a field longer than 1,000 characters (an unclosed quote?) "
                            "(reading stopped here)")
    assert csv.field_size_limit() == 131072  # the process-wide limit is restored


def test_line_over_the_record_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(data_read, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_bytes(OK + b'{"text": "' + b"x" * 5000 + b'"}\n' + OK)
    with pytest.raises(D.DataError) as e:
        D.load_records(path)
    assert str(e.value) == f"{path}, line 2: a line longer than 1,000 bytes (a JSON list? name the file .json)"
    assert scan_data(path).files[0].records == 2  # the lines after it are still read


# ---------------------------------------------------------------------------------------------------- 50 MB


class Counting:
    """The real tokenizer, counting the characters handed to it (to encode, and as chat content to render)."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tok(text, **kw)

    def apply_chat_template(self, messages, **kw):
        self.chars += sum(len(m.get("content") or "") for m in messages)
        return self.tok.apply_chat_template(messages, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def big_text():
    sentences = " ".join(T.corpus(800))
    return (sentences * (50_000_000 // len(sentences) + 1))[:50_000_000]


@pytest.mark.parametrize("fmt", ["text", "completion", "chat_prompt", "chat_answer"])
def test_a_50mb_record_costs_what_it_keeps(fmt, big_text, tok):
    seq_len, short = 64, big_text[:20_000]  # 20,000 characters hold far more than 64 tokens
    record = {"text": {"text": big_text}, "completion": {"prompt": "Q: ", "completion": big_text},
              "chat_prompt": {"messages": [{"role": "user", "content": big_text},
                                           {"role": "assistant", "content": "ok"}]},
              "chat_answer": {"messages": [{"role": "user", "content": "Tell me."},
                                           {"role": "assistant", "content": big_text}]}}[fmt]
    data_fmt = "chat" if fmt.startswith("chat") else fmt
    counting = Counting(tok)
    tracemalloc.start()
    ex = D.tokenize_record(record, data_fmt, counting, seq_len)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert counting.chars < 20_000 and peak < 5_000_000  # not 50 million characters, not ~12 million token ids
    # the same 64 tokens and labels as the record cut by hand to 20,000 characters, tokenized directly
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = "<|im_start|>user\nTell me.<|im_end|>\n<|im_start|>assistant\n"
    untrained_ids, trained_ids = {"text": ([], enc(short)), "completion": (enc("Q: "), enc(short)),
                                  "chat_prompt": (enc("<|im_start|>user\n" + short), []),
                                  "chat_answer": (enc(head), enc(short))}[fmt]
    n = min(len(untrained_ids), seq_len)
    assert ex["input_ids"] == (untrained_ids + trained_ids)[:seq_len]
    assert ex["labels"] == [-100] * n + trained_ids[: seq_len - n]


def test_a_50mb_jsonl_record_through_prepare_data_and_the_scanner(big_text, tok, tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "a small one"}) + "\n" + json.dumps({"text": big_text}) + "\n")
    prepared = D.prepare_data(path, tok, seq_len=64)
    assert [len(e["input_ids"]) for e in prepared.train] == [len(tok("a small one")["input_ids"]) + 1, 64]
    summary = scan_data(path, seq_len=64, tokenizer_dir=tok.name_or_path)
    assert summary.histogram() == {len(prepared.train[0]["input_ids"]): 1, 64: 1}
