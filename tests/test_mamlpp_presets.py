"""MAML++'s network and configs as HowToTrainYourMAMLPytorch ran them: its leaky ReLU (model.activation), exact
under every driver; the paper-era config of 1d872d3f in the table's presets and today's config (HEAD 8696470) in
the *_2019 presets; the paper's ± (a std over 3 runs) stored with its meaning in the table spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import meta
from meta import rules
from meta.algorithms import MAMLPlusPlus
from meta.experiments.tables import TableError, load_table, markdown_table
from meta.models import build_model, relative_error
from meta.models.networks import Activation
from meta.training.builders import build_learner
from meta.training.config import CONFIG_DIR, ConfigError, available_presets, load_config
from tests.helpers import random_tasks

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-10
CELLS = ("5w1s", "5w5s", "20w1s", "20w5s")
SIZE = 16  # the max-pool Conv4 halves four times
DRIVERS = ("vmap", "vmap_autograd", "loop_autograd", "loop_threads", "auto")


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=3, ways=5, shots=2, queries=2, size=SIZE)


# ---- model.activation ------------------------------------------------------------------------------------------


def test_leaky_relu_is_torchs_with_the_slope_and_relu_is_unchanged():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Activation("leaky_relu")(x), F.leaky_relu(x, 0.01))  # MAML++'s F.leaky_relu(out)
    assert torch.equal(Activation("leaky_relu", 0.2)(x), F.leaky_relu(x, 0.2))
    assert torch.equal(Activation()(x), torch.relu(x))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        Activation("gelu")
    with pytest.raises(ValueError, match="applies to activation leaky_relu only"):
        Activation("relu", 0.2)


@pytest.mark.parametrize("name", ["conv4", "conv4_maxpool", "mlp"])
def test_the_activation_follows_every_hidden_norm_and_changes_no_parameter_name(name):
    leaky = build_model(name, 5, image_size=SIZE, activation="leaky_relu", activation_slope=0.3)
    plain = build_model(name, 5, image_size=SIZE)
    assert [n for n, _ in leaky.named_parameters()] == [n for n, _ in plain.named_parameters()]
    acts = [m for m in leaky.modules() if isinstance(m, Activation)]
    assert len(acts) == 4 and all((a.kind, a.slope) == ("leaky_relu", 0.3) for a in acts)
    plain.load_state_dict(leaky.state_dict())
    x = torch.randn(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(leaky(x), plain(x))  # the knob changes the function


@pytest.mark.parametrize("name", ["conv4_maxpool", "mlp"])
def test_leaky_relu_meta_gradients_agree_under_every_driver_in_float64(tasks, name):
    model = build_model(name, 5, image_size=SIZE, activation="leaky_relu",
                        generator=torch.Generator().manual_seed(0)).double()
    for learner in (meta.MetaLearner(model, meta.sgd(lr=0.3), inner_steps=2),
                    MAMLPlusPlus(model, rules.mamlpp(lr=0.1, steps=2), 2).double()):
        loop = learner.meta_gradient(tasks, driver="loop")
        for driver in DRIVERS:
            other = learner.meta_gradient(tasks, driver=driver)
            assert torch.allclose(other.loss, loop.loss, rtol=TOL, atol=0), driver
            assert relative_error(other.adapted, loop.adapted) < TOL, driver
            assert relative_error(other.grads, loop.grads) < TOL, driver


def test_the_activation_keys_reach_the_model_and_bad_values_are_one_line_errors():
    model = build_learner(load_config(["preset=mamlpp_omniglot_5w1s"]), torch.float32, torch.device("cpu")).model
    acts = [m for m in model.modules() if isinstance(m, Activation)]
    assert len(acts) == 4 and all((a.kind, a.slope) == ("leaky_relu", 0.01) for a in acts)
    slope = build_learner(load_config(["model.activation=leaky_relu", "model.activation_slope=0.2"]),
                          torch.float32, torch.device("cpu")).model
    assert {m.slope for m in slope.modules() if isinstance(m, Activation)} == {0.2}
    with pytest.raises(ConfigError, match="model.activation='tanh' is not one of"):
        load_config(["model.activation=tanh"])
    with pytest.raises(ConfigError, match="model.activation_slope=0.2 applies to model.activation=leaky_relu only"):
        load_config(["model.activation_slope=0.2"])
    with pytest.raises(ConfigError, match=r"model.activation_slope must be in \[0, 1\)"):
        load_config(["model.activation=leaky_relu", "model.activation_slope=-0.1"])


def test_only_the_mamlpp_presets_use_leaky_relu():
    for preset in available_presets():
        model = load_config([f"preset={preset}"]).model
        expected = "leaky_relu" if preset.startswith("mamlpp_") else "relu"
        assert (model.activation, model.activation_slope) == (expected, 0.01), preset


# ---- the paper-era config (1d872d3f) and today's (HEAD 8696470) ------------------------------------------------


def knobs(preset: str) -> tuple:
    cfg = load_config([f"preset={preset}"])
    return (cfg.train.meta_batch, cfg.train.iterations, cfg.mamlpp.msl_iterations, cfg.mamlpp.first_order_iterations,
            cfg.inner.lr, cfg.train.val_tasks, cfg.eval.tasks, cfg.eval.checkpoint)


@pytest.mark.parametrize("cell", CELLS)
def test_the_table_presets_follow_the_paper_era_config_and_the_2019_presets_todays(cell):
    # @1d872d3f omniglot_maml++_*_seed_0.json: L2 batch 16, L21-22 250 epochs x 500, L18 MSL 20 epochs, L34 -1,
    # L33 0.1; experiment_builder.py L248, L281: validation and test on 500 batches of 16, the best epoch's model
    assert knobs(f"mamlpp_omniglot_{cell}") == (16, 125000, 10000, 0, 0.1, 8000, 8000, "best")
    # HEAD omniglot_maml++-omniglot_*.json: L2 batch 8, L27-28 100 epochs x 500, L21 MSL 10 epochs, L19 0.1, L23 600
    # evaluation tasks; experiment_builder.py L371: the top-5 ensemble
    assert knobs(f"mamlpp_omniglot_{cell}_2019") == (8, 50000, 5000, 0, 0.1, 600, 600, "ensemble")
    paper, today = (load_config([f"preset=mamlpp_omniglot_{cell}{s}"]) for s in ("", "_2019"))
    assert (paper.task.ways, paper.task.shots) == (today.task.ways, today.task.shots) == (
        int(cell.split("w")[0]), int(cell.split("w")[1][:-1]))
    assert today.eval.ensemble_size == 5 and paper.train.epoch_iterations == today.train.epoch_iterations == 500
    # each preset says which config it is
    assert "PAPER-ERA CONFIG" in (CONFIG_DIR / f"mamlpp_omniglot_{cell}.yaml").read_text()
    assert "TODAY'S CONFIG" in (CONFIG_DIR / f"mamlpp_omniglot_{cell}_2019.yaml").read_text()


def test_the_mamlpp_presets_cite_the_json_lines_of_val_seed_and_the_split():
    # val_seed and train_val_test_split are L13-14 in both the 1d872d3f and the HEAD files
    for path in (CONFIG_DIR / "mamlpp_omniglot_5w1s.yaml", REPO / "experiments/tables/mamlpp_omniglot.yaml"):
        text = path.read_text()
        assert "L13-14" in text and "L15-16" not in text, path.name


# ---- the paper's ±: a std over 3 runs, its value not recorded --------------------------------------------------


def test_the_mamlpp_table_stores_its_pm_as_a_std_over_3_runs():
    spec = load_table(REPO / "experiments/tables/mamlpp_omniglot.yaml")
    assert [c.preset for c in spec.cells] == [f"mamlpp_omniglot_{c}" for c in CELLS]
    for cell in spec.cells:
        assert (cell.pm_kind, cell.paper_pm) == ("seed_std", None)
        assert "std over 3 runs" in cell.pm_note
    row = {"cell": "5w1s", "preset": "mamlpp_omniglot_5w1s", "paper": 99.47, "paper_pm": None,
           "pm_kind": "seed_std", "pm_note": spec.cells[0].pm_note, "source": spec.cells[0].source,
           "seeds_done": 0, "seeds_planned": 3, "accuracy": None, "within_paper": None, "protocol": "not run"}
    text = markdown_table(spec, [row], "reproduce.py mamlpp_omniglot")
    assert "| 99.47 ± ? (std) |" in text and "the paper's ±: std over 3 runs" in text


@pytest.mark.parametrize(("paper", "message"), [
    ({"accuracy": 1.0, "pm": None, "pm_kind": "seed_std"}, "paper.pm must be given"),
    ({"accuracy": 1.0, "pm": 0.1, "pm_kind": "seed_std", "pm_note": "std"}, "pm_note says what an unrecorded"),
    ({"accuracy": 1.0, "pm": None, "pm_kind": "none", "pm_note": "std"}, "pm_note says what an unrecorded"),
    ({"accuracy": 1.0, "pm": 0.1, "pm_kind": "none"}, "paper.pm is given, so paper.pm_kind cannot be none"),
])
def test_pm_note_checks_are_one_line_errors(tmp_path, paper, message):
    import yaml

    spec = {"title": "t", "source": "s", "cells": [
        {"name": "a", "preset": "mamlpp_omniglot_5w1s", "paper": paper,
         "source": {"paper": "p", "table": "t", "code": "c"}, "requires": {"task.ways": 5}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TableError, match=message):
        load_table(path)
