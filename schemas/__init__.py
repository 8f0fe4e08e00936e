"""The spec users write: pydantic models, loading with every problem reported, the JSON Schema."""

from .load import Problem, SpecError, load_spec, locate, parse_toml, read_spec_text, spec_from_dict
from .spec import METHOD_NAMES, Spec, json_schema

__all__ = [
    "METHOD_NAMES",
    "Problem",
    "Spec",
    "SpecError",
    "json_schema",
    "load_spec",
    "locate",
    "parse_toml",
    "read_spec_text",
    "spec_from_dict",
]
