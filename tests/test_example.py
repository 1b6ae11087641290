"""The one-file MAML of examples/ computes what the library computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import meta
from meta.data import synthetic_pool
from meta.models import relative_error
from tests.helpers import random_tasks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "maml_in_one_file.py"


def load_example():
    spec = importlib.util.spec_from_file_location("maml_in_one_file", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_file_maml_meta_gradient_equals_the_learners():
    """float64, second order, 1 and 2 inner steps, Conv4 with task batch norm: the plain vmap(grad) of the
    example and MetaLearner's vmap driver agree to 1e-10 (loss, accuracy and meta-gradient)."""
    example = load_example()
    tasks = random_tasks(tasks=4, ways=5, shots=1, queries=2)
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).double()
    for steps in (1, 2):
        grads, losses, accuracies = example.meta_gradient(model, tasks, steps=steps, lr=0.4)
        result = meta.MetaLearner(model, meta.sgd(lr=0.4), inner_steps=steps).meta_gradient(tasks, driver="vmap")
        assert relative_error(grads, result.grads) < 1e-10
        assert relative_error({"loss": losses}, {"loss": result.loss}) < 1e-10
        assert torch.equal(accuracies, result.accuracy)
        assert relative_error(grads, meta.MetaLearner(model, meta.first_order(meta.sgd(lr=0.4)), steps)
                              .meta_gradient(tasks).grads) > 1e-3  # a first-order gradient would not pass


def test_one_file_maml_trains_and_evaluates():
    example = load_example()
    pool = synthetic_pool(20, 4, image_size=28, seed=0)
    model, accuracy = example.train(pool, synthetic_pool(10, 4, image_size=28, seed=1), iterations=2, eval_tasks=10)
    initial = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))
    assert 0.0 <= accuracy <= 1.0
