"""Fixtures shared by the runtime's data tests (a module may define its own `tok` instead)."""

import pytest


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The test tokenizer (runtime.testing.build_tokenizer) saved to a folder."""
    from peftplan.runtime.testing import build_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)
