"""--help and --show-config of the scripts, generated from the structured config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from meta.training.cli_help import DEFAULT_PRESET, config_keys, info_text
from meta.training.config import CHOICES, EVAL_KEYS, available_presets, load_config
from tests.test_training import run_cli


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_train_help_lists_every_key_with_its_meaning_and_every_preset():
    proc = run_cli("train_maml.py", "--help", process=True)  # the script itself, end to end
    lines = proc.stdout.splitlines()
    keys = list(config_keys())
    assert len(keys) > 60
    for key, kind, meaning in keys:
        line = next((ln for ln in lines if ln.startswith(f"  {key} (")), None)
        assert line is not None, f"--help does not list {key}"
        assert meaning and line.endswith(f": {meaning}"), f"{key} has no meaning in --help"
        assert f"({kind}, default " in line
        if key in CHOICES:
            assert "{" + ", ".join(map(str, CHOICES[key])) + "}" in line
    for preset in available_presets():
        name = f"{preset} (default)" if preset == DEFAULT_PRESET else preset
        assert any(ln.startswith(f"  {name}: ") and len(ln) > len(name) + 10 for ln in lines), preset


@pytest.mark.slow  # make test-fast leaves it out
def test_help_defaults_are_the_resolved_defaults():
    lines = run_cli("train_maml.py", "--help").stdout.splitlines()
    default = load_config([])
    for key in ("inner.lr", "data.rotation", "train.meta_batch", "model.norm_affine"):
        line = next(ln for ln in lines if ln.startswith(f"  {key} ("))
        assert f"default {OmegaConf.select(default, key)})" in line


@pytest.mark.slow  # make test-fast leaves it out
def test_show_config_prints_the_resolved_config_and_runs_nothing(tmp_path):
    args = ["preset=maml_omniglot_5w1s", "inner.lr=0.2", f"out_dir={tmp_path / 'run'}"]
    proc = run_cli("train_maml.py", "--show-config", *args)
    shown = OmegaConf.to_container(OmegaConf.create(proc.stdout))
    assert shown == OmegaConf.to_container(load_config(args))
    assert shown["inner"]["lr"] == 0.2 and not (tmp_path / "run").exists()


@pytest.mark.slow  # make test-fast leaves it out
def test_evaluate_help_names_the_keys_that_apply_to_a_saved_run():
    proc = run_cli("evaluate.py", "--help")
    assert all(key in proc.stdout for key in EVAL_KEYS)


def test_list_presets_names_every_preset_and_marks_the_default():
    listed = info_text("doc", ["--list-presets"]).splitlines()
    assert [name.removesuffix(" (default)") for name in listed] == available_presets()
    assert f"{DEFAULT_PRESET} (default)" in listed and DEFAULT_PRESET in available_presets()
    assert info_text("doc", ["preset=maml_omniglot_5w1s", "seed=1"]) is None  # a command line that trains


def test_help_states_the_default_preset_not_null():
    text = info_text("doc", ["--help"])
    assert text.startswith("doc\n") and f"  preset (str | None, default {DEFAULT_PRESET})" in text
    assert f"  {DEFAULT_PRESET} (default): " in text


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_train_list_presets_on_the_command_line():
    proc = run_cli("train_maml.py", "--list-presets")
    assert proc.stdout.splitlines() == info_text("doc", ["--list-presets"]).splitlines()


def test_console_commands_name_themselves_in_their_usage(capsys):
    """meta-train --help and meta-evaluate --help show meta-train and meta-evaluate, not a script's path."""
    import meta.cli

    assert meta.cli.train(["--help"]) == 0  # what the meta-train console entry point runs
    usage = capsys.readouterr().out.split("Presets (")[0]
    assert "    meta-train preset=maml_omniglot_5w1s seed=1" in usage and "scripts/" not in usage
    assert meta.cli.evaluate(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "    meta-evaluate runs/x" in usage and "meta-train --help" in usage and "scripts/" not in usage
    assert meta.cli.train(["--help"], prog="python scripts/train_maml.py") == 0
    assert "    python scripts/train_maml.py preset=" in capsys.readouterr().out
