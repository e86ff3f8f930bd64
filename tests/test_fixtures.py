"""The fixtures of the real tests: where their model or data is missing, they skip on a developer's
machine and fail under CI, where a skipped quality test would pass without measuring anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import in_ci, missing

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True), ("", False), ("false", False), ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_missing_data_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no data here.*CI is set"):
        missing("no data here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no data here"):
        missing("no data here")


def test_the_real_fixtures_fail_under_ci(pytester, monkeypatch):
    """The fixtures themselves, in a session whose shared data folder and packaged model are missing."""
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_x="def test_data(shared_data): pass\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    monkeypatch.delenv("CI")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
