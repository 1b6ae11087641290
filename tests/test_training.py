"""scripts/train_maml.py and scripts/evaluate.py end to end, config errors, resume, driver equivalence."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import meta
import meta.cli
from meta.drivers import AUTO_CANDIDATES
from meta.evaluation import mean_ci95
from meta.training.builders import build_learner, build_samplers
from meta.training.config import ConfigError, available_presets, load_config
from tests.helpers import has_omniglot

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.dataset=synthetic", "data.synthetic_classes=20", "train.meta_batch=4", "train.log_every=1",
    "train.val_every=3", "train.val_tasks=10", "train.checkpoint_every=3", "eval.tasks=20", "eval.batch_size=10",
    "progress=false", "device=cpu",
]
#: For comparing separate fresh runs exactly: the auto driver chooses its strategy by timing, and strategies agree
#: only up to float32 rounding, so two fresh auto runs can differ in the last bits.
PINNED = [*TINY, "driver=vmap"]


#: the command-line functions behind scripts/train_maml.py and scripts/evaluate.py (what each script calls)
IN_PROCESS = {"train_maml.py": meta.cli.train, "evaluate.py": meta.cli.evaluate}


def run_cli(script: str, *args: str, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """``python scripts/<script> args`` from the checkout: its exit status, stdout and stderr.

    train_maml.py and evaluate.py run in this process (the function the script calls, with its output captured
    and its exit status as ``sys.exit`` gives it: a message is printed to stderr, status 1), unless ``process``:
    then, like every other script, in a process of its own (the end-to-end tests of the command line)."""
    if process or script not in IN_PROCESS:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env, capture_output=True, text=True
        )
    else:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.chdir(REPO), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = IN_PROCESS[script](list(args), prog=f"python scripts/{script}")
            except SystemExit as stop:  # argparse's usage errors
                status = stop.code
            if isinstance(status, str):
                print(status, file=sys.stderr)
        code = status if isinstance(status, int) else 0 if status is None else 1
        proc = subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_records(out_dir: Path) -> list[dict]:
    """Metrics without wall-clock fields."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "its_per_s"} for r in records]


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_cli_smoke_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train_maml.py", *TINY, "train.iterations=6", f"out_dir={out}", process=True)  # end to end
    assert "test accuracy" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    test = results["test"]
    assert test["tasks"] == 20 and 0 <= test["accuracy"] <= 100 and test["ci95"] >= 0
    # what makes two runs comparable task by task, and what produced them
    assert len(test["task_accuracies"]) == 20 and np.mean(test["task_accuracies"]) == pytest.approx(test["accuracy"])
    assert results["schema_version"] == 2 and results["seed"] == 0
    assert results["torch"] == torch.__version__ and results["python"].count(".") == 2
    for key in ("config_hash", "git_commit", "device", "train_wall_time_s", "reference", "checkpoint"):
        assert key in results
    records = train_records(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # evaluate.py on the chosen checkpoint reproduces the reported test accuracy exactly
    chosen = "best.pt" if results["checkpoint"].startswith("best") else "checkpoint.pt"
    evaluated = run_cli("evaluate.py", str(out / chosen), process=True)
    assert "test accuracy" in evaluated.stdout
    again = json.loads((out / f"results_{Path(chosen).stem}.json").read_text())["test"]
    assert again.pop("task_accuracies") == test["task_accuracies"]  # the same tasks, each scored the same
    again_steps, test_steps = again.pop("steps"), test["steps"]
    assert [s["step"] for s in again_steps] == [s["step"] for s in test_steps] == list(range(len(test_steps)))
    for a, b in zip(again_steps, test_steps):
        assert a == pytest.approx(b, rel=1e-12)
    assert again == pytest.approx({k: v for k, v in test.items() if k not in ("task_accuracies", "steps")}, rel=1e-12)

    # a second run into the same folder is refused instead of overwriting it
    refused = run_cli("train_maml.py", *TINY, "train.iterations=6", f"out_dir={out}", check=False)
    assert refused.returncode != 0 and "resume=true" in refused.stderr


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_training_learns_synthetic_tasks(tmp_path):
    out = tmp_path / "learn"
    run_cli("train_maml.py", *TINY, "train.iterations=30", "train.val_every=30", "train.checkpoint_every=30",
            "eval.checkpoint=last", f"out_dir={out}")
    records = train_records(out)
    train = [r for r in records if r["split"] == "train"]
    first, last = np.mean([r["loss"] for r in train[:5]]), np.mean([r["loss"] for r in train[-5:]])
    assert last < first
    assert json.loads((out / "results.json").read_text())["test"]["accuracy"] > 60.0  # chance is 20%


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("train_maml.py", *PINNED, "train.iterations=6", f"out_dir={full}")
    run_cli("train_maml.py", *PINNED, "train.iterations=3", f"out_dir={part}")
    run_cli("train_maml.py", *PINNED, "train.iterations=6", f"out_dir={part}", "resume=true")
    assert train_records(part) == train_records(full)
    a = json.loads((full / "results.json").read_text())["test"]
    b = json.loads((part / "results.json").read_text())["test"]
    assert a == b


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_resume_keeps_the_auto_drivers_choice(tmp_path):
    out = tmp_path / "run"
    run_cli("train_maml.py", *TINY, "train.iterations=3", f"out_dir={out}")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(state["auto_choices"]) == 1
    # a strategy auto never picks on its own on a CPU: a resumed run that timed the candidates again could not
    # end up with it
    assert "loop" not in AUTO_CANDIDATES["backprop"]["cpu"]
    state["auto_choices"] = {key: "loop" for key in state["auto_choices"]}
    torch.save(state, out / "checkpoint.pt")
    run_cli("train_maml.py", *TINY, "train.iterations=6", f"out_dir={out}", "resume=true")
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 6 and list(resumed["auto_choices"].values()) == ["loop"]


def start_training(*args: str) -> subprocess.Popen:
    """scripts/train_maml.py in a process of its own (signals and locks need one), its output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "scripts/train_maml.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(out_dir: Path, count: int, timeout_s: float = 120) -> None:
    """Wait until ``out_dir``'s metrics.jsonl holds ``count`` lines (the run is training)."""
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + timeout_s
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < count):
        time.sleep(0.05)


#: a run long enough to be stopped by a signal in the middle (40 steps, validated and checkpointed at the end)
SIGNALLED = [*PINNED, "train.iterations=40", "train.val_every=40", "train.checkpoint_every=40"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The 40-step run of SIGNALLED, in this process: what every signalled and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("signals") / "full"
    meta.train(meta.load_config(overrides=[*SIGNALLED, f"out_dir={out}"]))
    return out


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(signum, uninterrupted, tmp_path):
    """Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP all finish the step, save, say how to resume
    and exit with status 1; the resumed run equals the uninterrupted one."""
    interrupted = tmp_path / "interrupted"
    proc = start_training(*SIGNALLED, f"out_dir={interrupted}")
    wait_for_records(interrupted, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    stopped = torch.load(interrupted / "checkpoint.pt", weights_only=False)["step"]
    named = "" if signum == signal.SIGINT else f" ({signum.name})"
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"interrupted{named}: checkpoint saved at step {stopped}; continue with the same command plus " \
           f"resume=true" in err
    assert 3 <= stopped < 40
    args = [*SIGNALLED, f"out_dir={interrupted}", "resume=true"]
    meta.train(meta.load_config(overrides=args), overrides=args)  # what the same command plus resume=true runs
    assert train_records(interrupted) == train_records(uninterrupted)


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_vmap_and_loop_drivers_give_the_same_trajectory(tmp_path):
    losses = {}
    for driver in ("vmap", "loop"):
        out = tmp_path / driver
        run_cli("train_maml.py", *TINY, "train.iterations=10", "dtype=float64", f"driver={driver}",
                "train.val_every=10", "train.checkpoint_every=10", f"out_dir={out}")
        losses[driver] = np.array([r["loss"] for r in train_records(out) if r["split"] == "train"])
    assert len(losses["vmap"]) == 10
    np.testing.assert_allclose(losses["vmap"], losses["loop"], rtol=1e-9, atol=0)


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.itrations"):
        load_config(["train.itrations=3"])
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config(["train.iterations=many"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(["preset=nope"])
    with pytest.raises(ConfigError, match="driver"):
        load_config(["driver=threads"])
    with pytest.raises(ConfigError, match="task.ways must be positive"):
        load_config(["task.ways=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["seed"])
    proc = run_cli("train_maml.py", "model.nam=conv4", check=False)
    assert proc.returncode != 0 and "model.nam" in proc.stderr
    if not torch.cuda.is_available():
        proc = run_cli("train_maml.py", "device=cuda", check=False)
        assert proc.returncode != 0 and "no CUDA device is available" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_training_episodes_can_have_their_own_ways_and_shots(tmp_path):
    cfg = load_config([*TINY, "preset=protonets_omniglot_5w1s", "data.image_size=16", "task.train_ways=12",
                       "task.train_shots=2", "task.queries=3", "task.test_queries=4"])
    samplers = build_samplers(cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    shapes = {split: [tuple(t.shape[:2]) for t in sampler.sample(2, generator)] for split, sampler in samplers.items()}
    assert shapes["train"] == [(2, 24), (2, 24), (2, 36), (2, 36)]  # 12-way 2-shot, 3 queries per class
    assert shapes["val"] == [(2, 5), (2, 5), (2, 75), (2, 75)]  # 5-way 1-shot, the preset's 15 validation queries
    assert shapes["test"] == [(2, 5), (2, 5), (2, 20), (2, 20)]
    # a ProtoNets run trains on 12-way episodes and is evaluated on 5-way ones
    out = tmp_path / "run"
    proc = run_cli("train_maml.py", *TINY, "preset=protonets_omniglot_5w1s", "data.image_size=16",
                   "task.train_ways=12", "train.iterations=3", f"out_dir={out}")
    assert math.isfinite(json.loads((out / "results.json").read_text())["test"]["accuracy"])
    assert "paper:" not in proc.stdout  # the preset's number is for Omniglot, not the synthetic data (issue 15)
    # the MAML family adapts an N-way head, so its training ways cannot differ from its test ways
    with pytest.raises(ConfigError, match="task.train_ways=20 differs from task.ways=5"):
        load_config(["task.train_ways=20"])
    for key in ("task.train_ways", "task.train_shots", "task.test_queries"):
        with pytest.raises(ConfigError, match=f"{key} must be positive"):
            load_config([f"{key}=0", "algorithm=protonets"])
    assert load_config(["task.train_ways=5", "task.train_shots=3"]).task.train_shots == 3


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_runs_that_cannot_start_say_why_in_one_line_and_write_nothing(tmp_path):
    cases = [
        (["task.train_shots=30"], "task error: train split: shots + queries = 30 + 1 = 31 drawings per class"),
        (["algorithm=protonets", "task.train_ways=30"], "task error: train split: 30-way tasks need at least 30"),
        (["data.dataset=omniglot", f"data.root={tmp_path / 'none'}"], "data error: Omniglot background set not found"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        proc = run_cli("train_maml.py", *TINY, *args, f"out_dir={out}", check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()
    proc = run_cli("evaluate.py", str(tmp_path / "missing.pt"), check=False)
    assert proc.returncode != 0 and "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # training runs, in this process (make test-fast leaves it out)
def test_cuda_graph_option_refuses_what_it_cannot_capture(tmp_path):
    with pytest.raises(ConfigError, match="needs device=cuda"):
        load_config(["train.cuda_graph=true", "device=cpu"])
    graphable = ["train.cuda_graph=true", "device=cuda", "driver=vmap_autograd"]
    for bad in (["algorithm=reptile", "driver=auto"], ["train.optimizer=sgd"], ["driver=loop_threads"],
                ["driver=vmap"], ["driver=auto"]):
        with pytest.raises(ConfigError, match="train.cuda_graph=true supports"):
            load_config([*graphable, *bad])
    assert load_config([*graphable, "algorithm=mamlpp"]).train.cuda_graph
    # the library class checks what the config cannot know: where the learner is, and the optimizer
    from meta.training.cuda_graph import GraphedMetaStep

    learner = meta.MetaLearner(meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)),
                               meta.sgd(lr=0.4), inner_steps=1)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedMetaStep(learner, torch.optim.Adam(learner.parameters(), capturable=True))
    if not torch.cuda.is_available():  # device=auto on a machine without CUDA: a clear exit, nothing written
        out = tmp_path / "run"
        proc = run_cli("train_maml.py", *TINY, "train.cuda_graph=true", "device=auto", "driver=vmap_autograd",
                       f"out_dir={out}", check=False)
        assert proc.returncode != 0 and "train.cuda_graph=true needs a CUDA device" in proc.stderr
        assert not out.exists()


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_and_pins_the_protocol(preset):
    cfg = load_config([f"preset={preset}"])
    assert cfg.preset == preset
    assert cfg.task.ways > 1 and cfg.inner.lr > 0 and cfg.eval.tasks >= 600


def test_paper_presets_match_maml_code():
    """The MAML-family presets follow cbfinn/maml's code (main.py usage lines, flags, utils.py, maml.py)."""
    five = load_config(["preset=maml_omniglot_5w1s"])
    assert (five.inner.steps, five.inner.lr, five.inner.test_steps, five.train.meta_batch) == (1, 0.4, 10, 32)
    twenty = load_config(["preset=maml_omniglot_20w5s"])
    assert (twenty.inner.steps, twenty.inner.lr, twenty.train.meta_batch, twenty.task.queries) == (5, 0.1, 16, 5)
    assert load_config(["preset=fomaml_omniglot_5w1s"]).inner.first_order
    for cfg in (five, twenty):
        assert cfg.train.iterations == 60000 and cfg.train.meta_lr == 1e-3 and cfg.eval.tasks == 600
    family = [f"{kind}_omniglot_{cell}" for kind in ("maml", "fomaml") for cell in ("5w1s", "5w5s", "20w1s", "20w5s")]
    family += ["maml_omniglot_5w1s_cpu30", "maml_mlp_omniglot_5w1s", "maml_mlp_omniglot_5w5s"]
    for preset in family:
        cfg = load_config([f"preset={preset}"])
        knobs = (cfg.inner.loss_reduction, cfg.inner.adapt_norm, cfg.model.norm_affine, cfg.model.norm_eps,
                 cfg.model.init, cfg.eval.checkpoint, cfg.inner.test_steps, cfg.task.queries)
        assert knobs == ("sum_over_shots", False, "beta", 1e-3, "maml", "last", 10, cfg.task.shots), preset
    mlp = load_config(["preset=maml_mlp_omniglot_5w5s"])
    assert (mlp.model.name, mlp.task.shots, mlp.reference.accuracy) == ("mlp", 5, 97.5)


def test_reptile_and_imaml_presets_test_their_final_model():
    # their code has no validation split (val = training characters here), and tests the final weights
    for preset in ("reptile_omniglot_5w1s", "imaml_omniglot_5w1s"):
        assert load_config([f"preset={preset}"]).eval.checkpoint == "last"


def test_reptile_and_protonets_presets_pin_their_training_episodes():
    reptile = load_config(["preset=reptile_omniglot_5w1s"])  # Nichol et al.: 10 train shots, inner batches of 10
    task, inner = reptile.task, reptile.inner
    assert (task.shots, task.train_shots, inner.batch_size, inner.steps) == (1, 10, 10, 5)
    protonets = load_config(["preset=protonets_omniglot_5w1s"])  # Snell et al.: 60-way training, 5 queries
    assert (protonets.task.ways, protonets.task.train_ways, protonets.task.queries) == (5, 60, 5)
    assert load_config([*TINY, "preset=reptile_omniglot_5w1s"]).inner.batch_size == 10
    with pytest.raises(ConfigError, match="inner.batch_size must be positive"):
        load_config(["inner.batch_size=0"])
    with pytest.raises(ConfigError, match="inner.batch_size applies to"):
        load_config(["algorithm=imaml", "inner.batch_size=5"])
    # the setting reaches the learner the training script builds
    assert build_learner(reptile, torch.float32, torch.device("cpu")).inner_batch_size == 10


def test_mean_ci95_formula():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])
    mean, ci = mean_ci95(values)
    assert mean == pytest.approx(np.mean(values.numpy()))
    assert ci == pytest.approx(1.96 * np.std(values.numpy()) / np.sqrt(5))


@pytest.mark.slow
@pytest.mark.skipif(not has_omniglot(), reason="Omniglot is not under the data root (set META_DATA_ROOT)")
def test_cli_smoke_on_real_omniglot(tmp_path):
    out = tmp_path / "omniglot"
    proc = run_cli("train_maml.py", "train.iterations=4", "train.val_every=2", "train.val_tasks=10",
                   "train.checkpoint_every=2", "eval.tasks=20", "progress=false", "device=cpu", f"out_dir={out}")
    assert "preset omniglot_5w1s_quick" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["tasks"] == 20 and results["reference"]["accuracy"] == 98.7
