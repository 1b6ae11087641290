"""The benchmark script runs a tiny configuration and writes its files (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.meta_step import CANDIDATE_NAMES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # benchmark runs in subprocesses (make test-fast leaves them out)


def test_benchmark_quick_writes_its_files(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["matmul_gflops"] > 0
    assert len(results["meta_step"]) == 2
    for row in results["meta_step"]:
        assert {"auto", "vmap", "loop", "functorch", "learn2learn"} <= set(row["drivers"]) <= set(CANDIDATE_NAMES)
        assert all(d["ms"] > 0 and d["gflops"] > 0 for d in row["drivers"].values())
    assert {"for-loop", "vmap(grad)"} <= set(results["per_sample"])
    assert len(results["memory"]["rows"]) == 10 and all(m["peak_mb"] > 0 for m in results["memory"]["rows"])
    assert "| setting |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "meta_step.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_refuses_bad_selections_before_writing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [(["--only", "20w3s"], "--only '20w3s' matches no setting"),
             (["--drivers", "auto,l2l"], "--drivers: unknown ['l2l']"),
             (["--drivers", "vmap,loop"], "--drivers must include auto")]
    for args, message in cases:
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "scripts/benchmark.py", *args, "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr and not out.exists()
