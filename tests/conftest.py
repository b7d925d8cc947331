"""Shared test set-up.

Tests build tiny models and run in seconds; a call that names no method would run
the shipped default (EPTQ, 800 iterations), so the suite runs such calls as PTQ,
module- and session-scoped fixtures included (hence set at configure time, not by
a per-test fixture). Tests of EPTQ name it, with tiny budgets;
``SHIPPED_DEFAULT_METHOD`` keeps the real default for the test that checks it.
"""

from __future__ import annotations

import pytest

from eptq_deploy import api

SHIPPED_DEFAULT_METHOD = api.DEFAULT_METHOD


def pytest_configure(config: pytest.Config) -> None:
    api.DEFAULT_METHOD = "ptq"
