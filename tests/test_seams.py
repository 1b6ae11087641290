"""Seams between learners, drivers and rules: every algorithm honours the driver it is given or refuses it,
``inner.learnable_lr`` means the same for every rule, and ``inner.test_lr`` never silently does nothing."""

from __future__ import annotations

import pytest
import torch

import meta
from meta.algorithms import ALGORITHMS, IMAML, MAMLPlusPlus, ProtoNet, Reptile
from meta.evaluation import evaluate_learner
from meta.training.builders import (
    build_inner_rule,
    build_learner,
    build_sampler,
    check_test_rule,
)
from meta.training.config import ConfigError, load_config
from tests.helpers import random_tasks
from tests.test_rules import assert_same, small_model
from tests.test_training import TINY, run_cli

MAP_LEARNERS = {
    "reptile": lambda: Reptile(small_model(), build_inner_rule(load_config(["inner.rule=adam", "inner.lr=0.01"])), 3),
    "imaml": lambda: IMAML(small_model(), build_inner_rule(load_config(["inner.lr=0.1"])), 3, lam=2.0, cg_steps=3),
}


#: every algorithm as a learner on a small float64 model (MAML++ in a multi-step-loss, first-order phase)
LEARNERS = {
    **MAP_LEARNERS,
    "maml": lambda: meta.MetaLearner(small_model(), meta.sgd(lr=0.3, learnable=True), 2),
    "mamlpp": lambda: MAMLPlusPlus(small_model(), meta.rules.mamlpp(lr=0.3, steps=2, per_step_bn=False), 2,
                                   msl_iterations=10, first_order_iterations=10),
    "protonets": lambda: ProtoNet(small_model(), ways=5),
}
ALL_DRIVERS = ("vmap", "loop", "vmap_autograd", "loop_autograd", "loop_threads", "auto")


@pytest.fixture(scope="module")
def tasks():
    return random_tasks(tasks=4, ways=5, shots=2, queries=2, size=8)


@pytest.mark.parametrize(("algorithm", "driver"), [("reptile", "vmap"), ("reptile", "loop_threads"),
                                                   ("reptile", "auto"), ("imaml", "vmap"), ("imaml", "auto")])
def test_reptile_and_imaml_run_each_driver_they_accept(algorithm, driver, tasks):
    learner = MAP_LEARNERS[algorithm]()
    reference = learner.meta_gradient(tasks, driver="loop")
    assert_same(learner.meta_gradient(tasks, driver=driver), reference)
    if driver == "auto":  # auto timed this learner's own candidates (it used to mean plain vmap, untimed)
        chosen = list(learner.auto_driver.choices.values())
        assert len(chosen) == 1 and chosen[0] in learner.drivers()


@pytest.mark.parametrize(("algorithm", "driver"), [("reptile", "vmap_autograd"), ("reptile", "loop_autograd"),
                                                   ("imaml", "vmap_autograd"), ("imaml", "loop_threads")])
def test_reptile_and_imaml_refuse_drivers_without_a_meaning_for_them(algorithm, driver, tasks):
    learner = MAP_LEARNERS[algorithm]()
    with pytest.raises(ValueError, match=f"unknown driver '{driver}' for"):
        learner.meta_gradient(tasks, driver=driver)
    with pytest.raises(ConfigError, match=f"algorithm={algorithm} does not run on driver={driver}"):
        load_config([f"algorithm={algorithm}", f"driver={driver}"])


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_honours_every_driver_or_refuses_it_at_start(algorithm, tasks):
    """The one outer-strategy x driver table: each driver an algorithm accepts gives the loop driver's numbers
    (float64, < 1e-10); each one it does not is refused, by the learner and by the config, before any work."""
    learner = LEARNERS[algorithm]()
    assert set(learner.supported_drivers()) == set(ALGORITHMS[algorithm].supported_drivers())
    reference = learner.meta_gradient(tasks, driver="loop")
    for driver in ALL_DRIVERS:
        if driver in learner.supported_drivers():
            threads = torch.get_num_threads()
            torch.set_num_threads(2)  # loop_threads really runs two threads (one, with OMP_NUM_THREADS=1, hid a race)
            try:
                assert_same(learner.meta_gradient(tasks, driver=driver), reference)
            finally:
                torch.set_num_threads(threads)
            load_config([f"algorithm={algorithm}", f"driver={driver}"])
        else:
            with pytest.raises(ValueError, match=f"unknown driver '{driver}' for"):
                learner.meta_gradient(tasks, driver=driver)
            with pytest.raises(ConfigError, match=f"algorithm={algorithm} does not run on driver={driver}"):
                load_config([f"algorithm={algorithm}", f"driver={driver}"])


def test_learners_are_composed_not_subclassed():
    """Every algorithm is a MetaLearner with its parts: no dummy rule for ProtoNets, MAML++'s annealing is a
    phase of its schedule (its rule is never rewritten), the inner mini-batch a constructor argument."""
    learners = {name: make() for name, make in LEARNERS.items()}
    assert all(type(learner) is meta.MetaLearner for learner in learners.values())
    assert learners["protonets"].rule is None and len(learners["protonets"].rule_params) == 0
    mamlpp = learners["mamlpp"]
    rule = mamlpp.rule
    assert mamlpp.active_rule().first_order and mamlpp.phase.step_weights is not None
    mamlpp.set_iteration(10, 20)
    assert mamlpp.rule is rule and not mamlpp.active_rule().first_order and mamlpp.phase.step_weights is None
    cfg = load_config([*TINY, "algorithm=reptile", "inner.batch_size=3"])
    assert build_learner(cfg, torch.float64, torch.device("cpu")).inner_batch_size == 3


def test_config_checks_of_an_algorithm_are_its_own(monkeypatch):
    """validate() runs the algorithm's own check_config (beside the algorithm) and reports its error as a config
    error; it holds no list of algorithm names for these checks."""

    def refuse(cfg):
        raise ValueError(f"algorithm={cfg.algorithm} refuses this on its own")

    monkeypatch.setitem(ALGORITHMS, "reptile", ALGORITHMS["reptile"]._replace(check_config=refuse))
    with pytest.raises(ConfigError, match="algorithm=reptile refuses this on its own"):
        load_config(["algorithm=reptile"])
    load_config(["algorithm=imaml"])


def test_learnable_lr_false_means_a_fixed_step_for_momentum_too():
    fixed = build_learner(load_config([*TINY, "inner.rule=momentum"]), torch.float64, torch.device("cpu"))
    assert len(fixed.rule_params) == 0
    learnable = build_learner(load_config([*TINY, "inner.rule=momentum", "inner.learnable_lr=true"]),
                              torch.float64, torch.device("cpu"))
    assert set(learnable.rule_params) == {"lr"}


def test_learnable_lr_for_a_rule_without_that_option_is_refused():
    with pytest.raises(ConfigError, match="has no learnable-step-size option"):
        load_config(["inner.rule=metasgd", "inner.learnable_lr=true"])
    with pytest.raises(ConfigError, match="inner.learnable_lr, not inner.options.learnable"):
        load_config(["inner.rule=momentum", "inner.options={learnable: true}"])


def test_test_lr_changes_the_momentum_rules_test_time_adaptation():
    losses = []
    for test_lr in (0.4, 0.001):
        cfg = load_config([*TINY, "dtype=float64", "inner.rule=momentum", f"inner.test_lr={test_lr}"])
        learner = build_learner(cfg, torch.float64, torch.device("cpu"))
        rule = build_inner_rule(cfg, test=True)
        check_test_rule(cfg, learner, rule)
        result = evaluate_learner(learner, build_sampler(cfg, "val", torch.device("cpu")), num_tasks=10, seed=0,
                                  batch_size=10, inner_steps=1, rule=rule, dtype=torch.float64,
                                  device=torch.device("cpu"))
        losses.append(result["loss"])
    assert losses[0] != losses[1]


@pytest.mark.parametrize("overrides", [["inner.rule=metasgd"], ["algorithm=mamlpp", "inner.rule=mamlpp",
                                                                 "inner.options={lslr: true, steps: 1}"]])
def test_test_lr_on_a_meta_learned_step_size_is_refused(overrides):
    cfg = load_config([*TINY, *overrides, "inner.test_lr=0.001"])
    learner = build_learner(cfg, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="has no effect"):
        check_test_rule(cfg, learner, build_inner_rule(cfg, test=True))


def test_train_script_refuses_a_test_lr_without_effect_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train_maml.py", *TINY, "inner.rule=metasgd", "inner.test_lr=0.01", "train.iterations=2",
                   f"out_dir={out}", check=False)
    assert proc.returncode != 0 and "config error: inner.test_lr=0.01 has no effect" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ---- one training step reads in few files ------------------------------------------------------------------

#: the library files one default training step runs code from; with the loop body of meta/training/run.py, six
STEP_FILES = {"meta/data/sampler.py", "meta/learner.py", "meta/drivers.py", "meta/rules/base.py",
              "meta/models/networks.py"}


@pytest.mark.slow  # the auto driver times every candidate (make test-fast leaves it out)
def test_one_default_training_step_runs_code_from_five_library_files():
    # the step of meta.train's loop body (meta/training/run.py) with the default config (MAML 5w1s, sgd, conv4, task_bn,
    # driver=auto) on synthetic data: the first step times every auto candidate, the second runs the chosen one;
    # every Python function called, in this thread and the driver's worker threads, is recorded by file
    import sys
    import threading
    from pathlib import Path

    root = Path(meta.__file__).resolve().parent
    cfg = load_config(["data.dataset=synthetic", "train.meta_batch=4", "device=cpu"])
    assert (cfg.algorithm, cfg.inner.rule, cfg.model.name, cfg.model.norm, cfg.driver) == (
        "maml", "sgd", "conv4", "task_bn", "auto")
    sampler = build_sampler(cfg, "train", torch.device("cpu"))
    learner = build_learner(cfg, torch.float32, torch.device("cpu"))
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.train.meta_lr)
    generator = torch.Generator().manual_seed(0)
    files: list[set[str]] = []
    for step in range(2):
        seen: set[str] = set()

        def record(frame, event, arg, seen=seen):
            path = Path(frame.f_code.co_filename)
            if event == "call" and path.is_relative_to(root):
                seen.add(path.relative_to(root.parent).as_posix())

        sys.setprofile(record)
        threading.setprofile(record)
        try:
            batch = sampler.sample(cfg.train.meta_batch, generator)
            learner.set_iteration(step, cfg.train.iterations)
            learner.train_step(optimizer, (batch.support_x, batch.support_y, batch.query_x, batch.query_y),
                               driver=cfg.driver)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        files.append(seen)
    assert files[0] == STEP_FILES, files[0]
    assert files[1] <= STEP_FILES and "meta/rules/base.py" in files[1], (files[1], learner.auto_driver.choices)
