"""Presets that inherit (``extends: <preset>``): the resolved configs are those of the flat files they replaced,
cycles and unknown parents are one-line errors, and --help still lists every preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import meta.training.config as config_module
from meta.training.cli_help import preset_help
from meta.training.config import CONFIG_DIR, ConfigError, available_presets, flatten, load_config, preset_layers

# every preset's resolved config, flattened, computed at commit a14f838 (before any preset used extends:)
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "presets_resolved_a14f838.json").read_text())


# values changed on purpose since a14f838, each because the paper's code says so (see the preset's comments)
INTENDED_CHANGES = {
    # HowToTrainYourMAMLPytorch @1d872d3f "Update configs to reflect paper", experiment_config/omniglot_maml++_5_way_
    # 1_shot_5_batch_norm_log_64_seed_0.json: batch 16, 250 epochs x 500 iterations, multi-step loss for 20 epochs,
    # first_order_to_second_order_epoch -1; that commit's experiment_builder.py L242-292 validates and tests on 500
    # batches of 16 (8000 tasks) and tests the best validation epoch's model; meta_neural_network_architectures.py
    # L383, L426 F.leaky_relu. (Today's files: the presets mamlpp_omniglot_*_2019.)
    "mamlpp_omniglot_5w1s": {"train.meta_batch": 16, "train.iterations": 125000, "mamlpp.msl_iterations": 10000,
                             "mamlpp.first_order_iterations": 0, "train.val_tasks": 8000, "eval.tasks": 8000,
                             "eval.checkpoint": "best", "model.activation": "leaky_relu"},
    # jakesnell/prototypical-networks: 15 query examples per class at test time; nn.BatchNorm2d's running statistics,
    # used in eval mode at test (few_shot.py L71, eval.py L16), updated in place: loop_autograd; run_train.py
    # L46/L26 10,000 epochs of 100 episodes, each followed by a validation on 100 episodes (L28, train.py L78-89)
    # with early stopping, patience 200 (L57, train.py L98-114), on 5-way episodes with 15 queries (L20, L24);
    # PyTorch 0.4's default initialization (README L20)
    "protonets_omniglot_5w1s": {"task.test_queries": 15, "model.norm_stats": "running", "driver": "loop_autograd",
                                "train.iterations": 1000000, "train.val_every": 100, "train.val_tasks": 100,
                                "train.early_stop_patience": 200, "task.val_ways": 5, "task.val_queries": 15,
                                "model.init": "pytorch04"},
    # openai/supervised-reptile: 10,000 test tasks, batch norm eps 1e-3; the paper's +- is not a stated 95% CI;
    # models.py L27-30 minimizes the per-example loss vector (its sum); reptile.py L24
    # restores only trainable variables, so the inner Adam's state persists across tasks (inner.persistent_state),
    # which runs on driver=loop
    "reptile_omniglot_5w1s": {"eval.tasks": 10000, "model.norm_eps": 0.001, "reference.ci95": None,
                              "inner.loss_reduction": "sum", "driver": "loop"},
    # aravindr93/imaml_dev @6a2a669: omniglot_implicit_maml.py L107-112 (adapt without the proximal term, then the
    # pull-back step), L124 with learner_model.py L143-153 (CG operator (1 + 1.0) v + Hv / (lam + 10)), utils.py
    # L88-90 (CG residual_tol 1e-10), learner_model.py L17 (Adam eps 1e-3), L219-228 (256-feature head, init),
    # examples/README.md L9, L14 (a fixed pool of >= 200,000 training tasks)
    "imaml_omniglot_5w1s": {"imaml.formulation": "code", "imaml.regu_coef": 1.0, "imaml.lam_damping": 10.0,
                            "imaml.cg_tol": 1e-10, "train.adam_eps": 1e-3, "model.conv4_head": "flatten",
                            "model.init": "imaml", "data.task_pool": 200000},
    # MAML's alpha on MAML's loss scale: cbfinn/maml utils.py L56-58 xent / update_batch_size, differentiated as a
    # sum by tf.gradients in maml.py L90, L101 (docs/protocols.md#maml-inner-loss), for every preset that borrows it
    **{preset: {"inner.loss_reduction": "sum_over_shots"} for preset in (
        "clipped_sgd_omniglot_5w1s", "metacurvature_omniglot_5w1s")},
    # ANIL's runs used cbfinn/maml's TensorFlow code (Raghu et al. 2020, App. C.4) and Meta-SGD has no code of its
    # own: both presets extend MAML's, so they take cbfinn/maml's knobs (docs/protocols.md#anil, #meta-sgd):
    # tf.contrib batch norm (beta only, eps 1e-3, not adapted), MAML's init, the last checkpoint, 10 test steps
    # (Meta-SGD: its paper's single step)
    **{preset: {"inner.loss_reduction": "sum_over_shots", "eval.checkpoint": "last", "inner.adapt_norm": False,
                "model.init": "maml", "model.norm_affine": "beta", "model.norm_eps": 0.001,
                **({"inner.test_steps": 10} if preset.startswith("anil") else {})}
       for preset in ("anil_omniglot_5w1s", "metasgd_omniglot_5w1s")},
}
#: a citation, not a protocol value: rewritten when the sources moved from an external notes file to
#: docs/protocols.md (every citation is checked by tests/test_protocol_citations.py)
CITATION_KEYS = ("reference.source",)


@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_resolved_presets_are_unchanged_by_inheritance(preset: str) -> None:
    cfg = flatten(load_config() if preset == "<default>" else load_config(preset=preset))
    expected = {**BEFORE[preset], **INTENDED_CHANGES.get(preset, {})}
    changed = {key: (value, cfg.get(key, "<missing>")) for key, value in expected.items()
               if cfg.get(key, "<missing>") != value and key not in CITATION_KEYS}
    assert not changed, f"{preset}: resolved values changed (expected, now): {changed}"


def test_presets_inherit_and_state_only_what_differs() -> None:
    lines = [line for line in (CONFIG_DIR / "fomaml_omniglot_5w1s.yaml").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 3 and lines[0] == "extends: maml_omniglot_5w1s"
    assert [name for name, _ in preset_layers("fomaml_omniglot_20w5s")] == [
        "maml_omniglot_5w1s", "maml_omniglot_20w1s", "maml_omniglot_20w5s", "fomaml_omniglot_20w5s"]
    extending = [p for p in available_presets() if len(preset_layers(p)) > 1]
    assert len(extending) >= 10
    cfg = load_config(["preset=fomaml_omniglot_5w1s"])
    assert "extends" not in cfg and cfg.preset == "fomaml_omniglot_5w1s"  # the saved config is the resolved one
    assert (cfg.inner.first_order, cfg.inner.lr, cfg.reference.accuracy) == (True, 0.4, 98.3)


def test_help_lists_presets_that_extend_with_their_header() -> None:
    text = preset_help()
    assert "fomaml_omniglot_5w1s: First-order MAML (FOMAML), Omniglot 5-way 1-shot" in text
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == len(available_presets())


@pytest.fixture
def preset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(CONFIG_DIR / "base.yaml", tmp_path / "base.yaml")
    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize(("files", "message"), [
    ({"a": "extends: b\n", "b": "extends: c\n", "c": "extends: a\n"},
     r"preset a: extends: makes a cycle \(a -> b -> c -> a\)"),
    ({"a": "extends: a\n"}, r"makes a cycle \(a -> a\)"),
    ({"a": "extends: nope\nseed: 1\n"}, "preset a: extends: 'nope': unknown preset 'nope'; available: a"),
    ({"a": "extends: ../configs/base\n"}, "preset a: extends: '../configs/base' is not a preset name"),
    ({"a": "extends: base\n"}, "preset a: extends: 'base' is not a preset name"),
])
def test_bad_extends_are_one_line_errors(preset_dir: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (preset_dir / f"{name}.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(["preset=a"])
    assert "\n" not in str(error.value)


def test_a_child_overrides_its_parent_and_keeps_the_rest(preset_dir: Path) -> None:
    (preset_dir / "parent.yaml").write_text("seed: 3\ninner: {lr: 0.1, steps: 2}\n")
    (preset_dir / "child.yaml").write_text("extends: parent\ninner: {steps: 5}\n")
    cfg = load_config(["preset=child", "inner.lr=0.2"])
    assert (cfg.seed, cfg.inner.lr, cfg.inner.steps) == (3, 0.2, 5)
