"""Bad config values and bad YAML fail at validation with one line naming the key or file, before anything runs or
is written (issue 24)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meta.training.config as config_module
from meta.training import cli_help
from meta.training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

#: (overrides, a fragment the one-line error must contain: the key, the value and the range)
BAD_VALUES = [
    (["train.meta_lr=-1"], "train.meta_lr must be positive, got -1.0"),
    (["train.meta_lr=0"], "train.meta_lr must be positive, got 0.0"),
    (["seed=100000000000000000000000"], "seed must be in [0, 9223372036854775807], got 100000000000000000000000"),
    (["seed=-1"], "seed must be in [0, 9223372036854775807], got -1"),
    (["eval.seed=-5"], "eval.seed must be in [0,"),
    (["data.task_pool_seed=18446744073709551616"], "data.task_pool_seed must be in [0,"),
    (["train.chunk_size=0"], "train.chunk_size must be positive (or null), got 0"),
    (["train.iterations=0"], "train.iterations must be positive, got 0"),
    (["train.meta_batch=-2"], "train.meta_batch must be positive, got -2"),
    (["task.ways=0"], "task.ways must be positive, got 0"),
    (["task.shots=0"], "task.shots must be positive, got 0"),
    (["task.queries=-1"], "task.queries must be positive, got -1"),
    (["inner.lr=-0.1"], "inner.lr must be >= 0, got -0.1"),
    (["inner.test_lr=-1"], "inner.test_lr must be >= 0 (or null), got -1.0"),
    (["inner.steps=-1"], "inner.steps must be >= 0, got -1"),
    (["train.adam_eps=0"], "train.adam_eps must be positive, got 0.0"),
    (["train.min_meta_lr=-1e-4"], "train.min_meta_lr must be >= 0, got -0.0001"),
    (["train.val_every=0"], "train.val_every must be positive, got 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be positive, got 0"),
    (["train.early_stop_patience=-1"], "train.early_stop_patience must be >= 0 (or null), got -1"),
    (["mamlpp.msl_iterations=-1"], "mamlpp.msl_iterations must be >= 0, got -1"),
    (["imaml.lam=-1"], "imaml.lam must be >= 0, got -1.0"),
    (["data.synthetic_classes=0"], "data.synthetic_classes must be positive, got 0"),
    (["reference.accuracy=150"], "reference.accuracy must be in [0, 100] (or null), got 150.0"),
    (["model.activation=leaky_relu", "model.activation_slope=1"], "model.activation_slope must be in [0, 1), got 1.0"),
    (["train.meta_lr=.inf"], "train.meta_lr=inf is not a finite number"),
    (["inner.rule=clipped_sgd"], "inner.rule=clipped_sgd takes per-sample gradients"),
    (['seed=!!python/object/apply:os.system ["true"]'], "YAML tags (!!python/..., !!binary, ...) are not accepted"),
    (["data.root=!!python/name:os.system"], "'data.root=!!python/name:os.system'"),
    (["out_dir=/tmp/run\udcff"], r"'out_dir=/tmp/run\xff' is not UTF-8 text"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_ranges_accept_every_preset_and_the_edges():
    for preset in config_module.available_presets():
        load_config([], preset=preset)
    load_config(["inner.lr=0", "inner.steps=0", "seed=9223372036854775807", "train.chunk_size=1",
                 "inner.rule=clipped_sgd", "model.norm=group"])


#: (preset file bytes, a fragment of the one-line error)
BAD_PRESETS = {
    "tag": (b'seed: !!python/object/apply:os.system ["true"]\n', "YAML tags (!!python/..., !!binary, ...) are not"),
    "tab": (b"train:\n\titerations: 5\n", "(line 2, column 1); YAML indents with spaces, not tabs"),
    "latin": ("# caf\xe9\nseed: 1\n".encode("latin-1"), "latin.yaml is not UTF-8 text (byte 5: 0xe9)"),
    "listed": (b"- seed: 1\n- seed: 2\n", "listed.yaml is a YAML list, not a mapping of keys"),
    "child": (b"extends: latin\n", "preset latin: "),  # the bad file is named, not the preset that extends it
}


@pytest.fixture
def user_configs(tmp_path, monkeypatch):
    """A configs/ folder holding base.yaml and :data:`BAD_PRESETS`."""
    shutil.copy(config_module.CONFIG_DIR / "base.yaml", tmp_path / "base.yaml")
    for name, (content, _) in BAD_PRESETS.items():
        (tmp_path / f"{name}.yaml").write_bytes(content)
    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(cli_help, "CONFIG_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", list(BAD_PRESETS))
def test_bad_preset_is_one_line_config_error(user_configs, name):
    with pytest.raises(ConfigError) as error:
        load_config([f"preset={name}"])
    assert BAD_PRESETS[name][1] in str(error.value)
    assert "\n" not in str(error.value)


def test_help_survives_a_preset_that_is_not_utf8(user_configs):
    text = cli_help.script_help("doc")
    assert "latin: (unreadable:" in text and "save it as UTF-8" in text
    assert "train.meta_lr" in text


def test_bad_value_on_the_command_line_exits_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_maml.py"), "data.dataset=synthetic",
                           "train.meta_lr=-1", "device=cpu", "progress=false", f"out_dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "config error: train.meta_lr must be positive, got -1.0"
    assert not out.exists()
