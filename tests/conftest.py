"""With META_REQUIRE_DATA=1 (set by .ci/run), a real-data test that would skip for missing data fails instead."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("META_REQUIRE_DATA") == "1":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "META_DATA_ROOT" in reason:
            report.outcome = "failed"
            report.longrepr = f"real data required (META_REQUIRE_DATA=1) but missing: {reason}"
