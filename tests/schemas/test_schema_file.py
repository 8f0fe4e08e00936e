"""The committed JSON Schema matches the models, is strict and documented; every example validates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peftplan.schemas import json_schema, load_spec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "schemas" / "spec.schema.json"
EXAMPLES = ROOT / "examples"
TABLES = ("model", "data", "hardware", "method", "training", "objective", "logging")


def committed_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def object_schemas(schema: dict):
    """Every (path, sub-schema) that declares `properties`, wherever it sits in the document."""
    stack = [("#", schema)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node:
                yield where, node
            for key, value in node.items():
                stack.append((f"{where}/{key}", value))
        elif isinstance(node, list):
            for n, value in enumerate(node):
                stack.append((f"{where}/{n}", value))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("**/*.toml"))


def test_committed_schema_matches_models():
    assert SCHEMA_FILE.is_file(), f"{SCHEMA_FILE} is missing: run `make schema`"
    assert committed_schema() == json_schema(), (
        "schemas/spec.schema.json is out of date with schemas/spec.py: run `make schema` and commit the result")


def test_schema_declares_draft_and_top_level_tables():
    schema = committed_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(TABLES)
    assert set(schema["required"]) == {"model", "hardware"}


def test_schema_forbids_additional_properties_in_every_table():
    schema = committed_schema()
    found = dict(object_schemas(schema))
    # the top level and one definition per table at least
    assert "#" in found
    assert len(found) >= 1 + len(TABLES), sorted(found)
    loose = [where for where, node in found.items() if node.get("additionalProperties") is not False]
    assert not loose, f"tables that accept unknown keys: {loose}"


def test_every_table_definition_is_reachable_and_strict():
    schema = committed_schema()
    for table in TABLES:
        prop = schema["properties"][table]
        ref = prop.get("$ref") or next(
            (alt["$ref"] for alt in prop.get("anyOf", prop.get("allOf", [])) if "$ref" in alt), None)
        assert ref and ref.startswith("#/$defs/"), (table, prop)
        target = schema["$defs"][ref.removeprefix("#/$defs/")]
        assert target.get("additionalProperties") is False, table
        assert target["properties"], table


def test_every_property_has_a_description():
    schema = committed_schema()
    missing = []
    count = 0
    for where, node in object_schemas(schema):
        for name, prop in node["properties"].items():
            count += 1
            desc = prop.get("description")
            if not (isinstance(desc, str) and desc.strip()):
                missing.append(f"{where}/properties/{name}")
    assert count >= 30, count  # the contract alone lists more keys than this
    assert not missing, f"properties without a description: {missing}"


def test_contract_keys_are_in_the_schema():
    schema = committed_schema()
    defs = {table: schema["$defs"][schema["properties"][table]["$ref"].removeprefix("#/$defs/")]
            for table in TABLES}
    contract = {
        "model": ["name", "dtype"],
        "data": ["num_examples", "seq_len", "avg_tokens", "path"],
        "hardware": ["gpu", "memory_gib", "count", "nodes"],
        "method": ["name", "rank", "alpha", "dropout", "target_modules"],
        "training": ["micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "optimizer",
                     "attention", "epochs", "learning_rate"],
    }
    for table, keys in contract.items():
        for key in keys:
            assert key in defs[table]["properties"], f"{table}.{key}"


def test_examples_found_by_glob_and_walk_agree():
    walked = []
    for dirpath, _dirs, files in os.walk(EXAMPLES):
        walked += [Path(dirpath) / f for f in files if f.endswith(".toml")]
    globbed = example_files()
    assert len(globbed) >= 1
    assert len(globbed) == len(walked)
    assert {p.resolve() for p in globbed} == {p.resolve() for p in walked}


@pytest.mark.parametrize("example", example_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_points_at_schema_and_validates(example):
    first = example.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#:schema "), f"{example}: first line should be `#:schema <path>`, got {first!r}"
    target = first.removeprefix("#:schema ").strip()
    resolved = (example.parent / target).resolve()
    assert resolved.is_file(), f"{example}: #:schema points at {target}, which does not exist"
    assert resolved == SCHEMA_FILE.resolve(), f"{example}: #:schema points at {resolved}, not the spec schema"
    spec = load_spec(example)
    assert spec.model.name and spec.hardware.gpu
