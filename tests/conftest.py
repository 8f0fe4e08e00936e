"""Shared fixtures for the whole suite."""

import pytest

from peftplan.planner import resolve


@pytest.fixture(autouse=True)
def no_registered_describer():
    """`peftplan.cli.main` registers the meta-device describer process-wide; a test that ran the CLI in
    this process must not change what the next test's `resolve_model` can describe."""
    saved = resolve._describer
    resolve.set_describer(None)
    yield
    resolve.set_describer(saved)
