"""With META_REQUIRE_DATA=1 (set by .ci/run), a real-data test that would skip for missing data fails instead; with
META_RECORD_TOLERANCES or META_TEST_SEED_OFFSET, the numerics record of tests/numerics_record.py is installed."""

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


# Opt-in numerics record (tests/numerics_record.py): META_RECORD_TOLERANCES=<file>, META_TEST_SEED_OFFSET=<n>
if os.environ.get("META_RECORD_TOLERANCES") or os.environ.get("META_TEST_SEED_OFFSET"):
    from tests import numerics_record

    numerics_record.install()

    def pytest_collection_modifyitems(items):
        if os.environ.get("META_RECORD_TOLERANCES"):
            for module in {item.module for item in items if getattr(item, "module", None) is not None}:
                numerics_record.wrap_module(module)
