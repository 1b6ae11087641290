"""Command-line sweeps: seed=0,1 (and other comma lists) run one run per value, then print one summary line."""

from __future__ import annotations

import json
import re

import pytest

from meta.experiments.sweep import expand_sweep, sweep_axes
from tests.test_training import PINNED, run_cli


def test_comma_lists_expand_into_their_product_and_bracketed_values_stay_whole():
    args = ["seed=0,1", "inner.lr=0.1,0.4", "data.rotations=[0,90]", "inner.options={clip: 1.0, x: 2}", "out_dir=o"]
    assert sweep_axes(args) == {"seed": ["0", "1"], "inner.lr": ["0.1", "0.4"]}
    runs = expand_sweep(args, "base")
    assert [name for name, _ in runs] == ["seed=0,inner.lr=0.1", "seed=0,inner.lr=0.4", "seed=1,inner.lr=0.1",
                                          "seed=1,inner.lr=0.4"]
    assert runs[1][1] == ["data.rotations=[0,90]", "inner.options={clip: 1.0, x: 2}", "seed=0", "inner.lr=0.4",
                          "out_dir=base/seed=0,inner.lr=0.4"]
    with pytest.raises(ValueError, match="out_dir cannot be swept"):
        sweep_axes(["out_dir=a,b"])


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_a_seed_sweep_runs_each_seed_into_a_sibling_folder_and_sums_them_up(tmp_path):
    proc = run_cli("train_maml.py", *PINNED, "train.iterations=2", "seed=0,1", f"out_dir={tmp_path}")
    accuracies = []
    for seed in (0, 1):
        results = json.loads((tmp_path / f"seed={seed}" / "results.json").read_text())
        assert results["seed"] == seed
        accuracies.append(results["test"]["accuracy"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("sweep: "))
    mean = float(re.match(r"sweep: ([0-9.]+)% ± [0-9.]+ \(std over runs\) over 2/2 runs", line).group(1))
    assert mean == pytest.approx(sum(accuracies) / 2, abs=0.01)
    assert "seed=0: " in line and "seed=1: " in line


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_a_bad_value_in_a_sweep_fails_before_any_run(tmp_path):
    proc = run_cli("train_maml.py", *PINNED, "train.iterations=2", "seed=0,x", f"out_dir={tmp_path / 's'}",
                   check=False)
    assert proc.returncode != 0 and "config error" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()
