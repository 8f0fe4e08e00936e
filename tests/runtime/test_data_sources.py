"""Several data files with weights, mixed formats, a separate held-out file; counts computed here by hand."""

import json
from collections import Counter

import pytest

pytest.importorskip("transformers", reason="needs the [train] extra")

from peftplan.runtime import data as D  # noqa: E402
from peftplan.runtime import testing as T  # noqa: E402
from peftplan.runtime.data_files import Source, apply_weight, as_sources, weighted_count  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.build_tokenizer(tmp_path_factory.mktemp("tok"))


def key(ex):
    return tuple(ex["input_ids"])


def alone(path, tok, **kw):
    """The file's examples prepared on their own (each once)."""
    return [key(ex) for ex in D.prepare_data(path, tok, seq_len=256, **kw).train]


@pytest.fixture
def files(tmp_path):
    return {"chat": T.write_dataset(tmp_path / "chat.jsonl", "chat", 6),
            "txt": T.write_dataset(tmp_path / "notes.txt", "text", 5, "txt"),
            "csv": T.write_dataset(tmp_path / "plain.csv", "completion", 7, "csv"),
            "json": T.write_dataset(tmp_path / "inst.json", "instruction", 3, "json")}


def test_weights_repeat_and_subsample_each_file(files, tok):
    sources = [str(files["chat"]), {"path": str(files["txt"]), "weight": 2},
               {"path": str(files["csv"]), "weight": 0.5}, {"path": str(files["json"]), "weight": 1.5}]
    prepared = D.prepare_data(sources, tok, seq_len=256, seed=3)
    # chat 6 x 1; txt 5 x 2; csv: round(0.5 * 7) = 4 of 7 (half up); json: 3 + round(0.5 * 3) = 3 + 2
    assert len(prepared.train) == 6 + 10 + 4 + 5 == 25
    assert prepared.format == "chat+text+completion+instruction"
    assert [(s["path"], s["format"], s["records"], s["examples"]) for s in prepared.sources] == [
        (str(files["chat"]), "chat", 6, 6), (str(files["txt"]), "text", 5, 10), (str(files["csv"]), "completion", 7, 4),
        (str(files["json"]), "instruction", 3, 5)]
    got = Counter(key(ex) for ex in prepared.train)
    for name, times in (("chat", 1), ("txt", 2)):
        assert all(got[k] == times for k in alone(files[name], tok))
    csv_seen = [k for k in alone(files["csv"], tok) if got[k]]
    assert len(csv_seen) == 4 and all(got[k] == 1 for k in csv_seen)
    inst = [got[k] for k in alone(files["json"], tok)]
    assert sorted(inst) == [1, 2, 2]
    assert sum(got.values()) == 25
    again = D.prepare_data(sources, tok, seq_len=256, seed=3)
    assert again.train == prepared.train  # seeded: same files, same seed, same examples in the same order
    other = D.prepare_data(sources, tok, seq_len=256, seed=4)
    assert Counter(map(key, other.train)) != got or other.train != prepared.train


def test_weight_arithmetic():
    assert [weighted_count(7, w) for w in (1, 2, 0.5, 1.5, 0.1, 0.3)] == [7, 14, 4, 11, 1, 2]
    assert weighted_count(10, 0.3) == 3 and weighted_count(5, 0.5) == 3 and weighted_count(4, 0.1) == 0
    items = list("abcdefg")
    half = apply_weight(items, 0.5, seed=1)
    assert len(half) == 4 and half == sorted(half) and set(half) <= set(items)
    assert apply_weight(items, 2.0, 0) == items + items
    twice_and_half = apply_weight(items, 2.5, 1)
    assert twice_and_half[:14] == items + items and twice_and_half[14:] == half


def test_each_file_has_its_own_format_and_sources_can_set_it(tok, tmp_path):
    amb = tmp_path / "amb.jsonl"
    amb.write_text(json.dumps({"text": "t", "prompt": "Q:", "completion": " yes"}) + "\n")
    with pytest.raises(D.DataError, match="ambiguous data format"):
        D.prepare_data([str(amb)], tok)
    prepared = D.prepare_data([{"path": str(amb), "format": "completion"},
                               {"path": str(T.write_dataset(tmp_path / "t.jsonl", "text", 2)), "format": "auto"}], tok)
    assert prepared.format == "completion+text" and len(prepared.train) == 3
    first = prepared.train[0]  # one file, weight 1: not shuffled, the completion record comes first
    assert tok.decode([t for t, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != -100]) == (
        " yes<|eos|>")


def test_problems_of_every_file_in_one_error(tok, tmp_path):
    a = T.write_records(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": ""}])
    b = T.write_records(tmp_path / "b.csv", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(D.DataError) as e:
        D.prepare_data([str(a), str(b)], tok)
    assert e.value.problems == [f"{a}, line 2: field 'text' is empty (format 'text'; keys found: text)",
                                f"{b}, line 3: field 'completion' is empty (format 'completion'; keys found: "
                                "completion, prompt)"]  # a CSV row has every column: the missing cell is empty
    assert str(e.value) == "\n".join(e.value.problems)
    held = T.write_records(tmp_path / "held.jsonl", [{"text": 1}])
    with pytest.raises(D.DataError) as e:  # held-out files are checked in the same pass
        D.prepare_data([str(a)], tok, eval_path=str(held))
    assert e.value.problems == [f"{a}, line 2: field 'text' is empty (format 'text'; keys found: text)",
                                f"{held}, line 1: field 'text' must be a string, got int (format 'text'; keys found: "
                                "text)"]


def test_relative_paths_are_relative_to_base_dir(tok, tmp_path):
    T.write_dataset(tmp_path / "train.jsonl", "text", 3)
    T.write_dataset(tmp_path / "val.jsonl", "text", 2)
    prepared = D.prepare_data([{"path": "train.jsonl", "weight": 2}], tok, eval_path="val.jsonl", base_dir=tmp_path)
    assert (len(prepared.train), len(prepared.eval)) == (6, 2)
    assert prepared.sources[0]["path"] == str(tmp_path / "train.jsonl")
    with pytest.raises(D.DataError) as e:
        D.prepare_data("nope.jsonl", tok, base_dir=tmp_path)
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: file not found"


def test_eval_path_holds_out_a_separate_file(tok, tmp_path):
    train = T.write_dataset(tmp_path / "train.jsonl", "chat", 8)
    held = T.write_dataset(tmp_path / "val.csv", "instruction", 3, "csv")
    prepared = D.prepare_data(train, tok, eval_path=held, eval_fraction=0.25, seq_len=256)
    assert len(prepared.train) == 8 and len(prepared.eval) == 3  # eval_fraction not used
    assert prepared.notes == ["data.eval_fraction = 0.25 is ignored: data.eval_path holds the evaluation examples"]
    assert [(s["role"], s["format"], s["examples"]) for s in prepared.sources] == [("train", "chat", 8),
                                                                                   ("eval", "instruction", 3)]
    assert [key(e) for e in prepared.eval] == alone(held, tok)
    assert D.prepare_data(train, tok, eval_path=[str(held)], seq_len=256).notes == []
    with pytest.raises(D.DataError) as e:
        D.prepare_data(train, tok, eval_path=[{"path": str(held), "weight": 2}])
    assert str(e.value) == "data.eval_path[0].weight: held-out (evaluation) files take no weight"


def test_eval_fraction_over_several_files_then_weights(files, tok):
    sources = [{"path": str(files["chat"]), "weight": 2}, str(files["json"])]
    prepared = D.prepare_data(sources, tok, eval_fraction=0.25, seed=0, seq_len=256)
    # 9 records; round(9 * 0.25) = 2 held out (never repeated); the 7 left: chat ones twice, json ones once
    assert len(prepared.eval) == 2
    chat_left = sum(1 for k in alone(files["chat"], tok) if k not in {key(e) for e in prepared.eval})
    json_left = 7 - chat_left
    assert len(prepared.train) == 2 * chat_left + json_left


def test_packing_mixes_files(files, tok):
    prepared = D.prepare_data([str(files["chat"]), str(files["txt"])], tok, seq_len=64, packing=True)
    assert prepared.packed and all(len(r["input_ids"]) == 64 for r in prepared.train)
    unpacked = D.prepare_data([str(files["chat"]), str(files["txt"])], tok, seq_len=64)
    total = sum(len(e["input_ids"]) for e in unpacked.train)
    assert len(prepared.train) == -(-total // 64)


@pytest.mark.parametrize("value,message", [
    ([], "data.path: an empty list; give at least one data file"),
    ("  ", "data.path: an empty path"),
    (5, "data.path: expected a file path or a table {path, format, weight}, got int"),
    ([{"path": ""}], "data.path[0].path: must be a file path, got ''"),
    ([{"path": "a.jsonl", "weight": 0}], "data.path[0].weight: must be > 0 and ≤ 1000 (copies of each record per "
                                         "epoch), got 0"),
    ([{"path": "a.jsonl", "weight": True}], "data.path[0].weight: must be a number, got True"),
    ([{"path": "a.jsonl", "weight": float("nan")}], "data.path[0].weight: must be a number, got nan"),
    (["a.jsonl", {"path": "b.jsonl", "format": "alpaca"}], "data.path[1].format: must be one of auto, chat, sharegpt, "
                                                          "instruction, completion, text, got 'alpaca'"),
    ([{"path": "a.jsonl", "wieght": 2}], "data.path[0]: unknown key wieght; expected path, format, weight"),
])
def test_bad_sources_name_the_key(value, message):
    with pytest.raises(D.DataError) as e:
        as_sources(value)
    assert str(e.value) == message


def test_sources_from_paths_and_tables():
    assert as_sources("a.jsonl") == [Source("a.jsonl")]
    assert as_sources(["a.jsonl", {"path": "b.txt", "weight": 3}], format="chat") == [
        Source("a.jsonl", "chat"), Source("b.txt", "chat", 3.0)]


def test_plan_data_table_is_checked_for_the_runtime():
    from peftplan.runtime.data_files import data_settings

    got = data_settings({"path": ["a.jsonl", "b.txt"], "sources": [{"path": "c.csv", "weight": 2.0}],
                         "eval_path": "v.jsonl", "format": "auto", "roles": {"bot": "assistant"}, "seq_len": 64})
    assert got["sources"] == [Source("a.jsonl"), Source("b.txt"), Source("c.csv", "auto", 2.0)]
    assert got["eval_sources"] == [Source("v.jsonl")] and got["roles"]["bot"] == "assistant"
    assert got["txt_split"] == "blank_line" and got["format"] == "auto"
    for table, message in [({}, "data.path: required: a data file, a list of files, or [[data.sources]] tables"),
                           ({"path": "a", "format": "csv"}, "data.format: must be one of auto, chat, sharegpt, "
                                                            "instruction, completion, text, got 'csv'"),
                           ({"sources": {"path": "a"}}, "data.sources: must be a list of tables {path, format, "
                                                        "weight} ([[data.sources]])"),
                           ({"sources": [{"path": "a", "weight": -2}]}, "data.sources[0].weight: must be > 0 and ≤ "
                                                                        "1000 (copies of each record per epoch), "
                                                                        "got -2"),
                           ({"path": "a", "txt_split": "para"}, "data.txt_split: must be one of blank_line, line, "
                                                                "got 'para'"),
                           ({"path": "a", "roles": {"x": "bot"}}, "data.roles.x: must be one of system, user, "
                                                                  "assistant, tool, tool_call, got 'bot'")]:
        with pytest.raises(D.DataError) as e:
            data_settings(table)
        assert str(e.value) == message
