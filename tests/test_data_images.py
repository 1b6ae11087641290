"""Colour image pools: the synthetic data set at any channel count and size, sampled by the same TaskSampler, and the
MAML mini-ImageNet preset resolving to cbfinn/maml's values and training on synthetic data of the real shape."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meta.data import ClassPool, TaskSampler, synthetic_pool
from meta.training.builders import build_learner, build_samplers
from meta.training.config import flatten, load_config

REPO = Path(__file__).resolve().parents[1]


def test_grey_synthetic_pool_is_unchanged():
    """The one-channel pool every other test trains on: the same bytes as before channels existed."""
    pool = synthetic_pool(6, 4, 12, seed=3)
    assert pool.images.shape == (6, 4, 12, 12) and pool.image_shape == (1, 12, 12)
    digest = hashlib.sha256(pool.images.numpy().tobytes()).hexdigest()
    assert digest == "016b8febed0d4b8edd9a97d8a696394a002ae6e0eb0d5aa7a799c6eff0d3f172"


@pytest.mark.parametrize("channels,size", [(3, 84), (2, 10), (4, 7)])
def test_colour_synthetic_pool_has_any_shape(channels, size):
    pool = synthetic_pool(5, 3, size, seed=0, channels=channels)
    assert pool.images.shape == (5, 3, channels, size, size) and pool.images.dtype == torch.uint8
    assert pool.image_shape == (channels, size, size)
    again = synthetic_pool(5, 3, size, seed=0, channels=channels)
    assert torch.equal(pool.images, again.images)  # deterministic in the seed
    assert not torch.equal(pool.images, synthetic_pool(5, 3, size, seed=1, channels=channels).images)


def test_synthetic_pool_refuses_zero_channels():
    with pytest.raises(ValueError, match="channels must be positive, got 0"):
        synthetic_pool(5, 3, 8, channels=0)


def test_sampler_gathers_colour_images_exactly():
    pool = synthetic_pool(7, 6, 9, seed=2, channels=3)
    sampler = TaskSampler(pool, ways=3, shots=2, queries=2)
    g = torch.Generator().manual_seed(0)
    idx = sampler.sample_indices(4, g)
    batch = sampler.batch_from_indices(idx)
    assert batch.support_x.shape == (4, 6, 3, 9, 9) and batch.query_x.shape == (4, 6, 3, 9, 9)
    for t in range(4):
        for pos in range(6):
            label = int(batch.support_y[t, pos])
            slot = int(idx.support_order[t, pos])  # unshuffled position: class slot // 2, drawing slot % 2
            cls, drawing = int(idx.classes[t, label]), int(idx.drawings[t, label, slot % 2])
            assert slot // 2 == label
            assert torch.equal(batch.support_x[t, pos], pool.images[cls, drawing].float() / 255.0)


def test_sampler_reads_a_pool_without_rotations_in_place():
    """No copy of an unrotated pool: a memory-mapped mini-ImageNet cache stays mapped."""
    pool = synthetic_pool(4, 3, 6, seed=0, channels=3)
    sampler = TaskSampler(pool, ways=2, shots=1, queries=1)
    assert sampler._flat_images.data_ptr() == pool.images.data_ptr()


def test_pool_refuses_other_dimensions():
    with pytest.raises(ValueError, match=r"\[classes, drawings, channels, H, W\]"):
        ClassPool(torch.zeros(2, 3, 4, dtype=torch.uint8), torch.full((2,), 3), ["a", "b"])


def test_maml_miniimagenet_preset_is_cbfinn_mamls_command():
    """cbfinn/maml main.py L17 and the code it runs (each value cited in the preset)."""
    cfg = flatten(load_config(["preset=maml_miniimagenet_5w1s"]))
    expected = {
        "data.dataset": "miniimagenet", "data.image_size": 84, "data.channels": 3, "data.rotation": "none",
        "data.task_pool": 200000, "task.ways": 5, "task.shots": 1, "task.queries": 15, "task.test_queries": 1,
        "model.name": "conv4_maxpool", "model.filters": 32, "model.norm": "task_bn", "model.norm_affine": "beta",
        "model.norm_eps": 0.001, "model.init": "xavier", "inner.lr": 0.01, "inner.steps": 5, "inner.test_steps": 10,
        "inner.loss_reduction": "sum_over_shots", "inner.adapt_norm": False, "inner.first_order": False,
        "train.iterations": 60000, "train.meta_batch": 4, "train.meta_lr": 0.001, "eval.tasks": 600,
        "reference.accuracy": 48.7, "reference.ci95": 1.84,
    }
    assert {key: cfg[key] for key in expected} == expected


def test_the_preset_runs_on_synthetic_data_of_the_real_shape():
    cfg = load_config(["preset=maml_miniimagenet_5w1s", "data.dataset=synthetic",
                       "device=cpu"])
    assert cfg.reference.accuracy is None  # the paper's number is for mini-ImageNet, not the synthetic data
    samplers = build_samplers(cfg, torch.device("cpu"))
    batch = samplers["train"].sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 5, 3, 84, 84) and batch.query_x.shape == (4, 75, 3, 84, 84)
    assert samplers["test"].queries == 1
    learner = build_learner(cfg, torch.float32, torch.device("cpu"))
    assert learner.model.head.in_features == 800
    assert learner.model(batch.support_x[0]).shape == (5, 5)


def test_channels_must_match_the_data(monkeypatch):
    """A 3-channel model on a grey data set is refused before anything trains, naming the key to set."""
    from meta.training import builders

    cfg = load_config(["data.dataset=synthetic", "data.channels=3", "device=cpu"])
    monkeypatch.setattr(builders, "load_pool", lambda data, split: synthetic_pool(8, 20, 28, seed=0))
    with pytest.raises(ValueError, match=r"train split: its images have 1 channel\(s\), but data.channels=3; set "
                                         r"data.channels=1"):
        builders.build_sampler(cfg, "train", torch.device("cpu"))


@pytest.mark.slow
def test_train_script_runs_the_miniimagenet_preset_on_synthetic_data(tmp_path):
    """scripts/train_maml.py with the preset on synthetic 3x84x84 data: 3 iterations, a short validation and test."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    args = ["preset=maml_miniimagenet_5w1s", "data.dataset=synthetic", "train.iterations=3", "device=cpu",
            "train.val_tasks=4", "eval.tasks=4", "inner.test_steps=2", "data.synthetic_classes=16",
            "driver=loop_autograd", f"out_dir={out}", "progress=false"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_maml.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["tasks"] == 4
