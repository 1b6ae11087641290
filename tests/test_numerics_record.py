"""The opt-in numerics record (tests/numerics_record.py) and the kernel-path runner (scripts/kernel_paths.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests import numerics_record

REPO = Path(__file__).resolve().parents[1]


def kernel_paths():
    spec = importlib.util.spec_from_file_location("kernel_paths", REPO / "scripts" / "kernel_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_errors_record_each_comparison_with_its_site(tmp_path, monkeypatch):
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(numerics_record.RECORD_ENV, str(record))
    monkeypatch.setenv(numerics_record.PATH_ENV, "avx2")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_x.py::test_y[a] (call)")
    error = numerics_record.Measured(2e-12)
    assert error < 1e-10 and error > 1e-13 and error * 2 == 4e-12  # still a float
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["kind"], r["tolerance"]) for r in rows] == [("tolerance", "1e-10"), ("separation", "1e-13")]
    assert rows[0]["used"] == pytest.approx(0.02) and rows[1]["used"] == pytest.approx(0.05)
    assert rows[0]["test"] == "tests/test_x.py::test_y[a]" and rows[0]["path"] == "avx2"
    assert rows[0]["site"].startswith("tests/test_numerics_record.py:")


def test_elementwise_use_is_the_largest_share_of_the_tolerance():
    error, used = numerics_record._elementwise_used([1.0, 2.0, 0.0], [1.0, 2.0 + 1e-12, 1e-15], 1e-12, 1e-14)
    assert error == pytest.approx(1e-12, rel=1e-3)
    assert used == pytest.approx(1e-12 / (1e-14 + 2e-12), rel=1e-3)


def test_kernel_paths_are_a_prefix_of_the_isa_order_and_set_every_library():
    paths = kernel_paths()
    assert paths.supported_paths() == ["default", "avx2", "avx512"][: len(paths.supported_paths())]
    env = paths.path_env("avx2")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    with pytest.raises(ValueError, match="unknown kernel path"):
        paths.path_env("neon")


def test_table_keeps_the_worst_run_per_test_and_site(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    row = {"test": "tests/t.py::test_a[x]", "site": "tests/t.py:3", "check": "relative_error", "kind": "tolerance",
           "tolerance": "1e-10", "error": 1e-14, "used": 1e-4, "path": "avx512", "seed_offset": 0}
    worse = {**row, "test": "tests/t.py::test_a[y]", "error": 1e-13, "used": 1e-3, "path": "avx2"}
    (raw / "avx512-seed0-t.jsonl").write_text(json.dumps(row) + "\n")
    (raw / "avx2-seed0-t.jsonl").write_text(json.dumps(worse) + "\n")
    (raw / "avx2-seed0-t.log").write_text("1 passed\n")
    result = kernel_paths().table(tmp_path)
    assert len(result["sites"]) == 1
    site = result["sites"][0]
    assert site["path"] == "avx2" and site["comparisons"] == 2 and site["margin"] == pytest.approx(1e3)
    assert "| `test_a` | tests/t.py:3 |" in (tmp_path / "results.md").read_text()
