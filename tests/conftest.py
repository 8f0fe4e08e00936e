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


@pytest.fixture(autouse=True)
def no_local_calibration(tmp_path_factory, monkeypatch):
    """`estimate`, `plan` and `generate` apply the user's local calibration (PEFTPLAN_CONFIG_DIR, else
    ~/.config/peftplan): a developer's own file must not change what the tests compute. An empty folder per session;
    tests of the calibration point the variable elsewhere themselves."""
    monkeypatch.setenv("PEFTPLAN_CONFIG_DIR", str(tmp_path_factory.getbasetemp() / "no-local-calibration"))
