"""The README's ten-line API example runs as printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import has_omniglot

README = Path(__file__).resolve().parents[1] / "README.md"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.skipif(not has_omniglot(), reason="Omniglot is not under the data root (set META_DATA_ROOT)")
def test_readme_api_example_runs(capsys):
    example = re.search(r"## Ten lines of API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len([line for line in example.splitlines() if line.strip()]) <= 11
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.loss.shape == (32,) and result.accuracy.shape == (32,)
    assert set(result.grads) == set(dict(namespace["model"].named_parameters()))
    assert "tensor" in capsys.readouterr().out


def run_readme_block(heading: str, replacements: dict[str, str]) -> dict:
    """Run the first Python block under ``heading`` (in the current directory) with each ``replacements`` key
    (each must occur exactly once, so that a changed README fails here) replaced; returns the block's namespace."""
    code = re.search(rf"{re.escape(heading)}\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    for old, new in replacements.items():
        assert code.count(old) == 1, f"the README example no longer has {old!r}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_train_api_runs(tmp_path, monkeypatch, capsys):
    """The README's meta.train block as printed, on synthetic data, with 3 and 5 iterations instead of 100 and 200:
    a run, its evaluation, and its resume, which continues the same metrics file."""
    small = '"data.dataset=synthetic", "eval.tasks=10", "train.val_tasks=5"'  # the same in the run and its resume
    monkeypatch.chdir(tmp_path)
    namespace = run_readme_block("### Training from Python and from the command line", {
        '"train.iterations=100"': f'"train.iterations=3", {small}',
        '"train.iterations=200"': f'"train.iterations=5", {small}', '"eval.tasks=1000"': '"eval.tasks=20"'})
    result = namespace["result"]
    assert result.step == 3 and result.test["tasks"] == 10 and 0 <= result.test["accuracy"] <= 100
    assert f"{result.test['accuracy']} {result.test['ci95']} {result.checkpoint}" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/try/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # resumed: no repeat, no gap at the end
    again = namespace["again"]
    assert again["test"]["tasks"] == 20 and json.loads(again["out"].read_text())["test"] == again["test"]


def test_readme_first_experiment_runs(tmp_path, monkeypatch, capsys):
    """The "Write your first experiment" code as printed, on synthetic data for 3 iterations and 10 test tasks."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = run_readme_block("## Write your first experiment", {
        '"preset=omniglot_5w1s_quick",': '"preset=omniglot_5w1s_quick", "data.dataset=synthetic",',
        "range(1, 401)": "range(1, 4)", "step % 50 == 0": "step % 3 == 0",
        "num_tasks=100": "num_tasks=10", "batch_size=50": "batch_size=5"})
    import matplotlib.pyplot as plt

    plt.close("all")
    cfg, losses, test = namespace["cfg"], namespace["losses"], namespace["test"]
    assert (cfg.preset, cfg.inner.steps, cfg.train.meta_batch, cfg.train.iterations) == (
        "omniglot_5w1s_quick", 2, 16, 600)  # the preset, with the two knobs changed
    assert len(losses) == 3 and all(loss > 0 for loss in losses) and 0 <= test["accuracy"] <= 100
    printed = capsys.readouterr().out
    assert "step 3: query loss " in printed and "s in all" in printed  # progress, then the test result
    assert (tmp_path / "first_experiment.png").read_bytes()[:4] == b"\x89PNG"
    # the inheritance example is a preset that loads
    preset = re.search(r"```yaml\n(# My variant.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "configs").mkdir()
    import meta.training.config as config_module

    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path / "configs")
    for name in ("base", "maml_omniglot_5w1s"):
        (tmp_path / "configs" / f"{name}.yaml").write_text((REPO_CONFIGS / f"{name}.yaml").read_text())
    (tmp_path / "configs" / "my_variant.yaml").write_text(preset)
    mine = config_module.load_config(["preset=my_variant"])
    assert mine.inner.steps == 2 and mine.inner.lr == 0.4 and mine.model.init == "maml"
