"""ShareGPT, role mapping, tool calls through the chat template, plain-text files and streamed .json files,
end to end through tokenization with the test tokenizer (runtime/testing.py). Expected texts are written out."""

import json

import pytest

pytest.importorskip("transformers", reason="needs the [train] extra")

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402
from peftplan.runtime.data_chat import TemplateSupport, template_support  # noqa: E402
from peftplan.runtime.data_files import resolve_roles  # noqa: E402

EOS = "<|eos|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tool_tok(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tool_tok"), chat_template=T.TOOL_CHAT_TEMPLATE)


def trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100])


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- ShareGPT


@pytest.mark.parametrize("file_type", ["jsonl", "json", "csv", "parquet"])
def test_sharegpt_is_detected_and_tokenizes_like_the_same_chat(file_type, tok, tmp_path):
    if file_type == "parquet":
        pytest.importorskip("pyarrow")
    share = T.write_dataset(tmp_path / f"s.{file_type}", "sharegpt", 9, file_type)
    chat = T.write_dataset(tmp_path / "c.jsonl", "chat", 9)
    a, b = D.prepare_data(share, tok, seq_len=256), D.prepare_data(chat, tok, seq_len=256)
    assert (a.format, b.format) == ("sharegpt", "chat")
    assert a.train == b.train and len(a.train) == 9


def test_sharegpt_system_field_and_messages_written_with_from_and_value(tok, tmp_path):
    share = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Where is the cat?"},
                                                      {"from": "gpt", "value": "In the park."}]}
    messages = {"messages": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Where is the cat?"},
                             {"from": "gpt", "value": "In the park."}]}
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is the cat?<|im_end|>\n"
                "<|im_start|>assistant\nIn the park.<|im_end|>\n" + EOS)
    for record, fmt in ((share, "sharegpt"), (messages, "chat")):
        path = jsonl(tmp_path / f"{fmt}.jsonl", [record])
        ex = D.prepare_data(path, tok, seq_len=256).train[0]
        assert D.resolve_format(D.load_records(path)) == fmt
        assert tok.decode(ex["input_ids"]) == expected
        assert trained_text(tok, ex) == "In the park.<|im_end|>\n" + EOS


def test_unknown_role_names_the_line_and_the_key_and_roles_map_it(tok, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "asker", "value": "Where is the dog?"}, {"from": "bot", "value": "At home."}]}]
    path = jsonl(tmp_path / "roles.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok)
    known = ("assistant, bard, bing, chatgpt, function, function_call, gpt, human, ipython, model, observation, "
             "system, tool, user")
    assert str(e.value) == (f"{path}, line 2: conversations[0] has from 'asker', conversations[1] has from 'bot': "
                            f"not known roles ({known}); map them with data.roles (format 'sharegpt'; keys found: "
                            "conversations)")
    one = jsonl(tmp_path / "one.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "bot", "value": "Hello."}]}])
    with pytest.raises(D.DataError) as e:
        D.prepare_data(one, tok)
    assert str(e.value) == (f"{one}, line 1: conversations[1] has from 'bot', which is not a known role ({known}); "
                            "map it with data.roles (format 'sharegpt'; keys found: conversations)")
    ex = D.prepare_data(path, tok, roles={"asker": "user", "bot": "assistant"}).train[1]
    assert tok.decode(ex["input_ids"]) == ("<|im_start|>user\nWhere is the dog?<|im_end|>\n"
                                           "<|im_start|>assistant\nAt home.<|im_end|>\n" + EOS)
    assert trained_text(tok, ex) == "At home.<|im_end|>\n" + EOS
    # a mapping overrides the defaults: "gpt" read as the user makes the first record lack an assistant turn
    with pytest.raises(D.DataError, match=r"line 1: no assistant turn"):
        D.prepare_data(path, tok, roles={"gpt": "user", "asker": "user", "bot": "assistant"})


def test_roles_mapping_values_are_checked():
    with pytest.raises(D.DataError) as e:
        resolve_roles({"bot": "robot"})
    assert str(e.value) == "data.roles.bot: must be one of system, user, assistant, tool, tool_call, got 'robot'"
    with pytest.raises(D.DataError, match="data.roles: must be a table"):
        resolve_roles(["human"])
    assert resolve_roles({"bot": "assistant"})["bot"] == "assistant" and resolve_roles(None)["gpt"] == "assistant"


# ---------------------------------------------------------------------------------------------------- tools


CALL_MESSAGES = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None,  # OpenAI's form: arguments as a JSON string, no content
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "22 C"},
    {"role": "assistant", "content": "It is 22 C."},
]
CALL_RENDERED = ("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                 "<|im_start|>assistant\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
                 "</tool_call><|im_end|>\n<|im_start|>tool\n22 C<|im_end|>\n"
                 "<|im_start|>assistant\nIt is 22 C.<|im_end|>\n")


def test_tool_calls_and_tool_turns_are_kept_when_the_template_renders_them(tool_tok, tmp_path):
    share = {"conversations": [{"from": "human", "value": "What is the weather in Paris?"},
                               {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": "
                                                                  "{\"city\": \"Paris\"}}"},
                               {"from": "observation", "value": "22 C"},
                               {"from": "gpt", "value": "It is 22 C."}]}
    path = jsonl(tmp_path / "tools.jsonl", [{"messages": CALL_MESSAGES}])
    spath = jsonl(tmp_path / "tools_share.jsonl", [share])
    for p in (path, spath):
        ex = D.prepare_data(p, tool_tok, seq_len=512).train[0]
        assert tool_tok.decode(ex["input_ids"]) == CALL_RENDERED + EOS
        # the call and the final answer are trained; the tool's result is not
        assert trained_text(tool_tok, ex) == ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": "
                                              "\"Paris\"}}</tool_call><|im_end|>\nIt is 22 C.<|im_end|>\n" + EOS)


def test_record_tools_reach_the_template(tool_tok, tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    path = jsonl(tmp_path / "t.jsonl", [{"messages": CALL_MESSAGES, "tools": json.dumps(tools)}])
    ex = D.prepare_data(path, tool_tok, seq_len=512).train[0]
    head = "<|im_start|>system\nTools: " + json.dumps(tools) + "<|im_end|>\n"
    assert tool_tok.decode(ex["input_ids"]) == head + CALL_RENDERED + EOS


def test_tool_calls_the_template_drops_are_a_data_error_naming_the_line(tok, tmp_path):
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = jsonl(tmp_path / "calls.jsonl", [plain, {"messages": CALL_MESSAGES}])
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok)
    assert str(e.value) == (f"{path}, line 2: messages[1] has tool calls, but the model's chat template does not "
                            "render them (a probe's call was missing from its output); remove them or use a model "
                            "whose template supports tool calls")
    # the ChatML template does render a tool turn's content
    tool_turn = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                              {"role": "assistant", "content": "y"}]}
    assert len(D.prepare_data(jsonl(tmp_path / "turn.jsonl", [tool_turn]), tok).train) == 1


def test_template_probe(tok, tool_tok, tmp_path):
    strict = T.build_tokenizer(tmp_path / "strict", chat_template=(
        "{%- for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role') }}{% endif %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"))
    assert template_support(tok) == TemplateSupport(tool_messages=True, tool_calls=False)
    assert template_support(tool_tok) == TemplateSupport(tool_messages=True, tool_calls=True)
    assert template_support(strict) == TemplateSupport(tool_messages=False, tool_calls=False)
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                          {"role": "assistant", "content": "y"}]}]
    path = jsonl(tmp_path / "tool_turn.jsonl", rows)
    with pytest.raises(D.DataError, match=r"tool_turn\.jsonl, line 1: messages\[1\] is a tool turn, but the model's "
                                          r"chat template does not render tool turns"):
        D.prepare_data(path, strict)


def test_bad_tool_calls_and_tools(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "x"},
                          {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]},
                          {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "nope"}]
    path = jsonl(tmp_path / "bad_tools.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        D.resolve_format(D.load_records(path))
    assert e.value.problems == [
        f"{path}, line 1: messages[1]: a tool call needs a function 'name' (format 'chat'; keys found: messages)",
        f"{path}, line 2: messages[0] (user) has tool_calls, which only an assistant turn may have (format 'chat'; "
        "keys found: messages)",
        f"{path}, line 3: field 'tools' must be a list of function schemas (objects), or that list as a JSON string "
        "(format 'chat'; keys found: messages, tools)"]


# ---------------------------------------------------------------------------------------------------- plain text


def test_txt_documents_are_separated_by_blank_lines(tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbfThe red cat.\nIt sleeps.\n\n\n   \nThe blue dog.\r\n\r\nA bird.\n\t\n")
    records = D.load_records(path)
    assert [(r.data, r.where) for r in records] == [({"text": "The red cat.\nIt sleeps."}, "line 1"),
                                                   ({"text": "The blue dog."}, "line 6"),
                                                   ({"text": "A bird."}, "line 8")]
    lines = D.load_records(path, txt_split="line")
    assert [(r.data["text"], r.where) for r in lines] == [("The red cat.", "line 1"), ("It sleeps.", "line 2"),
                                                          ("The blue dog.", "line 6"), ("A bird.", "line 8")]
    prepared = D.prepare_data(path, tok, seq_len=64)
    assert prepared.format == "text" and len(prepared.train) == 3
    for ex, text in zip(prepared.train, ["The red cat.\nIt sleeps.", "The blue dog.", "A bird."], strict=True):
        assert ex["labels"] == ex["input_ids"]  # every token trained
        assert tok.decode(ex["input_ids"]) == text + EOS


def test_txt_format_is_text_and_written_datasets_round_trip(tok, tmp_path):
    path = T.write_dataset(tmp_path / "d.txt", "text", 6, "txt")
    assert [r.data for r in D.load_records(path)] == T.example_records("text", 6)
    with pytest.raises(D.DataError) as e:
        D.prepare_data(path, tok, format="chat")
    assert str(e.value) == f"{path}: a .txt file holds plain text: its format is text, not chat"
    with pytest.raises(D.DataError, match="data.txt_split: must be one of blank_line, line, got 'page'"):
        D.load_records(path, txt_split="page")


# ---------------------------------------------------------------------------------------------------- .json streamed


def test_json_records_across_chunk_boundaries_and_their_lines(tmp_path):
    chunk = 1 << 20  # data_json reads 1 MiB at a time
    rows = [{"text": "x" * (chunk - 40), "n": 1}, {"text": "é" * 300_000 + "€𝄞", "n": 1234567890123456789012},
            {"text": "short", "n": -1.5e-3}]
    # the number of the first record, and multi-byte characters, straddle the 1 MiB boundaries
    pieces = [json.dumps(r, ensure_ascii=False, indent=2) for r in rows]
    text = "[\n" + ",\n".join(pieces) + "\n]\n"
    path = tmp_path / "big.json"
    path.write_text(text, encoding="utf-8")
    starts, line = [], 2
    for p in pieces:
        starts.append(line)
        line += p.count("\n") + 1
    records = D.load_records(path)
    assert [r.data for r in records] == rows == json.loads(text)
    assert [r.where for r in records] == [f"line {n} (record index {i})" for i, n in enumerate(starts)]


def test_json_shapes(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 2, "data": rows, "license": {"name": "x"}}, indent=2))
    assert [r.data for r in D.load_records(wrapped)] == rows
    lines = tmp_path / "lines.json"  # JSON Lines saved as .json
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [(r.data, r.where) for r in D.load_records(lines)] == [(rows[0], "line 1"), (rows[1], "line 2")]
    cases = {
        "scalar.json": ('"text"', "scalar.json: expected a JSON list of records or an object {\"data\": [...]}, "
                                  "got str"),
        "obj.json": ('{"text": "a"}', "obj.json: expected a JSON list of records or an object {\"data\": [...]}, "
                                      "got an object with keys text"),
        "extra.json": ('[{"text": "a"}]\n\n]', "extra.json, line 3: invalid JSON (extra data after the list) "
                                               "(reading stopped here)"),
        "open.json": ('[{"text": "a"},\n{"text": "b"}\n', "open.json, line 3: invalid JSON (expected ',' or ']' after "
                                                          "a record, found the end of the file) (reading stopped "
                                                          "here)"),
        "bad.json": ('[\n{"text": "a"},\n{"text": "b",, }]', "bad.json, line 3: invalid JSON (Expecting property name "
                                                             "enclosed in double quotes at column 14) (reading stopped "
                                                             "here)"),
        "list.json": ('[{"text": "a"}, [1]]', "list.json, line 1 (record index 1): expected an object, got list"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(D.DataError) as e:
            D.load_records(tmp_path / name)
        assert str(e.value) == f"{tmp_path}/{message}"
