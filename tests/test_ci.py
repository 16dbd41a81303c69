"""Under CI=true a missing test dependency fails its tests; elsewhere it skips them."""

import pytest

import conftest


def test_missing_dependency_fails_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true: test dependency 'no_such_module_x'"):
        conftest.require("no_such_module_x")


def test_missing_dependency_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(conftest, "CI", False)
    with pytest.raises(pytest.skip.Exception, match="'no_such_module_x' is not installed"):
        conftest.require("no_such_module_x")
    assert conftest.require("json").dumps([1]) == "[1]"
