"""log.tensorboard=true: the scalars of metrics.jsonl plus the learning rate as TensorBoard events (skipped where
tensorboard is not installed; its absence is a one-line config error)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from meta.training.config import ConfigError, config_hash, load_config
from meta.training.metrics_log import MetricsLog
from meta.training.run_folder import TENSORBOARD_DIR, remove_run_files
from tests.test_training import PINNED, run_cli


def events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_missing_tensorboard_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=r"log.tensorboard=true needs the tensorboard package: pip install") as e:
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    assert "\n" not in str(e.value)
    MetricsLog(tmp_path / "metrics.jsonl")  # off by default: tensorboard is never imported


def test_the_key_is_off_by_default_safe_on_resume_and_outside_the_config_hash() -> None:
    assert load_config([]).log.tensorboard is False
    assert config_hash(load_config(["log.tensorboard=true"])) == config_hash(load_config([]))


def test_metrics_log_mirrors_records_and_learning_rate(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.append({"step": 10, "split": "train", "loss": 1.5, "accuracy": 40.0, "its_per_s": 3.0}, learning_rate=1e-3)
    log.append({"step": 10, "split": "val", "loss": 1.25, "accuracy": 50.0, "ci95": 2.0, "tasks": 20,
                "note": "text", "flag": True, "task_accuracies": [1.0]})
    log.close()
    got = events(tmp_path)
    assert got == {"train/loss": [(10, 1.5)], "train/accuracy": [(10, 40.0)], "train/its_per_s": [(10, 3.0)],
                   "train/learning_rate": [(10, pytest.approx(1e-3))], "val/loss": [(10, 1.25)],
                   "val/accuracy": [(10, 50.0)], "val/ci95": [(10, 2.0)], "val/tasks": [(10, 20.0)]}
    assert remove_run_files(tmp_path) == ["metrics.jsonl", f"{TENSORBOARD_DIR}/"]  # overwrite=true replaces it


@pytest.mark.slow
def test_training_run_writes_the_same_scalars_as_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run_cli("train_maml.py", *PINNED, "train.iterations=4", "train.lr_schedule=cosine", "log.tensorboard=true",
            f"out_dir={out}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = events(out)
    for record in records:
        for name, value in record.items():
            if name in ("step", "split") or not isinstance(value, int | float):
                continue
            assert (record["step"], pytest.approx(value, rel=1e-6)) in got[f"{record['split']}/{name}"], name
    lr = dict(got["train/learning_rate"])
    assert sorted(lr) == [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert lr[1] == pytest.approx(1e-3) and lr[1] > lr[2] > lr[3] > lr[4]  # the cosine schedule, per logged step
    assert not (tmp_path / "plain").exists()
    run_cli("train_maml.py", *PINNED, "train.iterations=2", f"out_dir={tmp_path / 'plain'}")
    assert not (tmp_path / "plain" / TENSORBOARD_DIR).exists()  # off by default
