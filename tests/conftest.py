"""Shared test set-up.

Tests build tiny models and run in seconds; a call that names no method would run
the shipped default (EPTQ, 800 iterations), so the suite runs such calls as PTQ.
Tests of EPTQ name it, with tiny budgets; ``SHIPPED_DEFAULT_METHOD`` keeps the real
default for the test that checks it.
"""

from __future__ import annotations

import pytest

from eptq_deploy import api

SHIPPED_DEFAULT_METHOD = api.DEFAULT_METHOD


@pytest.fixture(autouse=True)
def _unnamed_method_is_ptq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "DEFAULT_METHOD", "ptq")
