"""Property: whatever bytes a data file holds (random records in every file type and several encodings, then
mutated: junk bytes, truncation, deep nesting, huge numbers, NULs, CRs), reading, scanning and preparing it
raise DataError or nothing, never another exception."""

import csv
import io
import json

import pytest

pytest.importorskip("transformers", reason="needs the [train] extra")
hypothesis = pytest.importorskip("hypothesis", reason="needs the [dev] extra")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402
from peftplan.runtime.data_scan import scan_data  # noqa: E402

KEYS = ["messages", "conversations", "text", "prompt", "completion", "instruction", "input", "output", "role",
        "content", "from", "value", "tool_calls", "tools", "system", "function", "name", "arguments", "data"]
ODD = ["\ud800", "\x00", "\ufeff", "<|im_end|>", "\n\n", "é", "𝄞", "\r", "\\", '"', "{{ x }}", "{% if %}"]
VALID = [r for fmt in ("chat", "sharegpt", "instruction", "completion", "text") for r in T.example_records(fmt, 3)]

texts = st.one_of(st.text(max_size=20), st.sampled_from(ODD), st.sampled_from(["user", "assistant", "gpt", "human"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner,
                                                 max_size=4)), max_leaves=16)
records = st.lists(st.one_of(st.sampled_from(VALID), st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
                             values), min_size=0, max_size=6)
mutations = st.lists(st.tuples(st.sampled_from(["junk", "cut", "deep", "digits", "nul", "cr", "drop", "dup"]),
                               st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=3)


def serialize(rows, file_type: str) -> str:
    if file_type == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if file_type == "json":
        return json.dumps(rows, ensure_ascii=False, indent=1)
    if file_type == "txt":
        return "\n\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows)
    dicts = [r for r in rows if isinstance(r, dict)]
    keys = list(dict.fromkeys(k for r in dicts for k in r)) or ["text"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=keys)
    w.writeheader()
    for r in dicts:
        w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    return out.getvalue()


def mutate(data: bytes, ops) -> bytes:
    for op, where, blob in ops:
        i = int(where * len(data))
        if op == "junk":
            data = data[:i] + blob + data[i:]
        elif op == "cut":
            data = data[:i]
        elif op == "deep":
            data = data[:i] + b"[" * 5000 + data[i:]
        elif op == "digits":
            data = data[:i] + b"7" * 5000 + data[i:]
        elif op == "nul":
            data = data[:i] + b"\x00" + data[i:]
        elif op == "cr":
            data = data.replace(b"\n", b"\r")
        elif op == "drop":
            data = data[:i] + data[i + len(blob) * 50:]
        else:
            data = data[:i] + data[i: i + 200] + data[i:]
    return data


@pytest.mark.slow
@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=records, file_type=st.sampled_from(["jsonl", "json", "csv", "txt"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]), ops=mutations)
def test_any_file_gives_data_error_or_records(rows, file_type, encoding, ops, tok, tok_dir, tmp_path):
    text = serialize(rows, file_type)
    data = mutate(text.encode(encoding, errors="surrogatepass" if encoding == "utf-8" else "replace"), ops)
    path = tmp_path / f"fuzz.{file_type}"
    path.write_bytes(data)
    try:
        loaded = D.load_records(path)
    except D.DataError as e:
        assert str(e) and str(path) in str(e)
    else:
        assert all(isinstance(r.data, dict) for r in loaded)
    for kwargs in ({}, {"tokenizer_dir": tok_dir, "seq_len": 48}):
        summary = scan_data(path, **kwargs)  # problems are reported, not raised
        assert summary.ok == (not summary.problems)
        assert all(p.startswith(str(path)) for p in summary.problems)
        json.dumps(summary.as_dict())
    try:
        prepared = D.prepare_data(path, tok, seq_len=48)
    except D.DataError:
        assert not summary.ok or summary.train_examples == 0
    else:
        assert summary.ok and len(prepared.train) == summary.train_examples
