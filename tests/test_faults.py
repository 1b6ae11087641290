"""Fault injection (issue 15): kills, damaged files, unsafe checkpoints, divergence, config drift, bad paths.

Every case here gave a silently wrong result, lost data, ran code or ended in a raw traceback before issue 15.
Error cases run the scripts in this process (``runpy``): an exception other than the scripts' one-line
``SystemExit`` fails the test, which is what "no traceback" means. Kills need real processes.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from meta.data import DataError, load_mnist
from meta.data.cache import load_or_build
from meta.training.checkpoints import CheckpointError, load_checkpoint
from meta.training.config import ConfigError, check_resume_config, load_config
from meta.training.metrics_log import MetricsLog, to_json
from tests.test_training import PINNED, REPO, run_cli, train_records

ARGS = [*PINNED, "train.iterations=8", "train.val_every=2", "train.checkpoint_every=4"]


def strict_json(text: str):
    """``json.loads`` that rejects NaN and Infinity, as strict parsers do."""
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


def run_script(script: str, *args: str) -> str | None:
    """Run a script in this process; return its exit message (None when it finished normally)."""
    handler = signal.getsignal(signal.SIGINT)
    argv = sys.argv
    sys.argv = [str(REPO / "scripts" / script), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        return None if stop.code in (0, None) else str(stop.code)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)
    return None


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run: the reference the faulted runs must reproduce."""
    out = tmp_path_factory.mktemp("faults") / "full"
    run_cli("train_maml.py", *ARGS, f"out_dir={out}")
    return out


def copy_run(full_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    return out


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_kill_9_at_random_steps_then_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    draws = random.Random(15)  # seeded: which metrics line each kill waits for
    resume: list[str] = []
    for kill in range(2):
        lines = draws.randint(2, 5) + 5 * kill
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts/train_maml.py"), *ARGS, f"out_dir={out}",
                                 *resume], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and (
                not metrics.exists() or len(metrics.read_text().splitlines()) < lines):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert not (out / "results.json").exists(), "the kill came too late to test anything"
        resume = ["resume=true"]
    # what a kill during a save leaves: a temporary file next to the checkpoint, and a half-written metrics line
    (out / "checkpoint.pt.x1y2.tmp").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "split": "tr')
    # a safe key may change on resume (progress, logging and checkpoint intervals): the steps are the same
    run_cli("train_maml.py", *ARGS, f"out_dir={out}", "resume=true", "train.checkpoint_every=3")
    assert not list(out.glob("*.tmp"))
    assert train_records(out) == train_records(full_run)
    assert strict_json((out / "results.json").read_text())["test"] == \
        strict_json((full_run / "results.json").read_text())["test"]


def test_a_half_written_metrics_line_is_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    log.truncate_after(2)  # raised JSONDecodeError before
    assert log.path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_diverging_training_stops_keeps_the_last_finite_checkpoint_and_writes_no_nan(tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("train_maml.py", *ARGS, "train.meta_lr=1e30", f"out_dir={out}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "non-finite (NaN or inf) at step 2" in proc.stderr and "train.meta_lr=1e+30" in proc.stderr
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 0 and all(torch.isfinite(v).all() for v in state["learner"].values())
    assert not (out / "results.json").exists() and not (out / "best.pt").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    with pytest.raises(ConfigError, match="inner.lr=nan is not a finite number"):
        load_config(["inner.lr=nan"])
    # numbers that can legitimately be non-finite (a diverging test-time loss) are written as null
    assert strict_json(to_json({"loss": float("nan"), "xs": [float("inf"), 1.0]})) == {"loss": None, "xs": [None, 1.0]}


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_resume_with_a_changed_config_is_refused(full_run, tmp_path):
    out = copy_run(full_run, tmp_path)
    before = (out / "config.yaml").read_text()
    message = run_script("train_maml.py", *ARGS, f"out_dir={out}", "resume=true", "inner.lr=0.1",
                         "train.meta_batch=2")
    assert "inner.lr=0.4 -> 0.1" in message and "train.meta_batch=4 -> 2" in message
    assert "train.iterations" in message  # the keys that may change are listed
    assert (out / "config.yaml").read_text() == before
    # a cosine schedule is a function of the total iterations: then train.iterations is not safe either
    saved = load_config([*ARGS, "train.lr_schedule=cosine"])
    constant = load_config(ARGS)
    assert check_resume_config(constant, load_config([*ARGS, "train.iterations=10"])) == ["train.iterations"]
    with pytest.raises(ConfigError, match="train.iterations=8 -> 10"):
        check_resume_config(saved, load_config([*ARGS, "train.lr_schedule=cosine", "train.iterations=10"]))
    # a checkpoint written before a key existed resumes: the key's default is how that run ran
    older = OmegaConf.to_container(constant)
    del older["model"]["activation"], older["model"]["activation_slope"]
    assert check_resume_config(older, load_config(ARGS)) == []
    with pytest.raises(ConfigError, match="model.activation='relu' -> 'leaky_relu'"):
        check_resume_config(older, load_config([*ARGS, "model.activation=leaky_relu"]))
    (out / "checkpoint.pt").unlink()
    assert "no checkpoint" in run_script("train_maml.py", *ARGS, f"out_dir={out}", "resume=true")


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_an_existing_run_is_never_overwritten_and_overwrite_is_explicit(full_run, tmp_path):
    out = copy_run(full_run, tmp_path)
    (out / "checkpoint.pt").unlink()  # a run killed after best.pt and metrics, before any checkpoint
    best = (out / "best.pt").read_bytes()
    message = run_script("train_maml.py", *ARGS, f"out_dir={out}")
    assert "already holds a run" in message and "resume=true" in message and "overwrite=true" in message
    assert (out / "best.pt").read_bytes() == best
    assert "pass one" in run_script("train_maml.py", *ARGS, f"out_dir={out}", "resume=true", "overwrite=true")
    (out / "results.json").write_text("stale")
    assert run_script("train_maml.py", *ARGS, "train.iterations=2", f"out_dir={out}", "overwrite=true") is None
    assert strict_json((out / "results.json").read_text())["test"]["tasks"] == 20
    # a fresh run writes a step-0 checkpoint at once, so a kill at any later point can be resumed
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert stat.S_IMODE((out / "results.json").stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Payload:
    """Pickles to a call of ``Path.touch``: loading the checkpoint with weights_only=False creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_damaged_and_unsafe_checkpoints_are_refused_in_one_line(full_run, tmp_path):
    out = copy_run(full_run, tmp_path)
    good = (out / "checkpoint.pt").read_bytes()
    marker = tmp_path / "pwned"
    state = torch.load(full_run / "checkpoint.pt", weights_only=True)
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "text": b"not a checkpoint\n",
    }
    for name, data in cases.items():
        (out / "checkpoint.pt").write_bytes(data)
        for script, args in (("evaluate.py", [str(out / "checkpoint.pt")]),
                             ("train_maml.py", [*ARGS, f"out_dir={out}", "resume=true"])):
            message = run_script(script, *args)
            assert "is not a readable checkpoint" in message and str(out / "checkpoint.pt") in message, name
    torch.save({**state, "payload": _Payload(marker)}, out / "checkpoint.pt")
    for script, args in (("evaluate.py", [str(out / "checkpoint.pt")]),
                         ("train_maml.py", [*ARGS, f"out_dir={out}", "resume=true"])):
        assert "is refused" in run_script(script, *args)
        assert not marker.exists()  # weights_only=False ran the payload
    with pytest.raises(CheckpointError, match="not a checkpoint of scripts/train_maml.py"):
        torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")
    # a checkpoint of another model (3-way head) against its config: the file and the cause, not a state-dict dump
    state["config"]["task"]["ways"] = 3
    torch.save(state, out / "checkpoint.pt")
    message = run_script("evaluate.py", str(out / "checkpoint.pt"))
    assert "does not fit the configured learner" in message and "task.ways" in message


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_evaluate_refuses_keys_that_cannot_apply_to_a_saved_run(full_run):
    message = run_script("evaluate.py", str(full_run / "best.pt"), "preset=maml_omniglot_5w1s")
    assert message.startswith("config error: preset cannot apply to a saved run")
    assert "task.ways" in run_script("evaluate.py", str(full_run / "best.pt"), "task.ways=3")


def test_presets_are_names_and_references_belong_to_their_protocol():
    for bad in ("../configs/base", str(REPO / "configs" / "base"), "base"):
        with pytest.raises(ConfigError, match="not a preset name"):
            load_config([f"preset={bad}"])
    quick = "omniglot_5w1s_quick"  # the default preset, whose number is MAML's on Omniglot 5-way 1-shot
    assert load_config([], preset=quick).reference.accuracy == 98.7
    mnist = load_config(["data.dataset=mnist", "data.protocol=within"], preset=quick)
    assert mnist.reference.accuracy is None and mnist.reference.source is None
    assert load_config(["task.ways=20"], preset=quick).reference.accuracy is None
    assert load_config(["train.iterations=5"], preset=quick).reference.accuracy == 98.7


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_bad_out_dirs_are_one_line_errors_before_data_loading(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"), (a_file / "run", "is a file; choose another out_dir"),
             (Path("/proc/meta-run/x"), "is not writable")]
    for out, expected in cases:
        message = run_script("train_maml.py", *ARGS, f"out_dir={out}")
        assert expected in message and "Traceback" not in message
    assert a_file.read_text() == "x"


def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, capsys):
    builds = []

    def build():
        builds.append(1)
        return {"images": torch.full((64, 1024), 7, dtype=torch.uint8), "names": ["a", "b"]}

    spec = {"format": 1}
    content, rebuilt = load_or_build(tmp_path, "toy", spec, build)
    assert rebuilt and len(builds) == 1
    assert not load_or_build(tmp_path, "toy", spec, build)[1]
    path = next(tmp_path.glob("toy-*.pt"))
    data = bytearray(path.read_bytes())
    at = data.find(b"\x07" * 4096)
    data[at: at + 1000] = b"\x00" * 1000  # damage the stored tensor, not the file's structure
    path.write_bytes(bytes(data))
    assert (torch.load(path, weights_only=True)["images"] == 0).any()  # torch itself loads it without complaint
    content, rebuilt = load_or_build(tmp_path, "toy", spec, build)
    assert rebuilt and len(builds) == 2 and (content["images"] == 7).all()
    assert "rebuilding the cache" in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~_umask()
    with pytest.raises(DataError, match="is not writable"):
        load_or_build(Path("/proc/meta-cache"), "toy", spec, build)
    assert len(builds) == 2  # checked before the (slow) build


def test_truncated_mnist_files_are_named_as_truncated(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated or damaged: 100 bytes"):
        load_mnist(tmp_path, "train", cache_dir=tmp_path / "cache")


@pytest.mark.slow  # a CLI run in a subprocess (make test-fast leaves it out)
def test_a_second_process_in_a_busy_run_folder_is_refused_naming_the_holder(tmp_path):
    """Two processes on one out_dir (issue 24: two resumes of one run interleaved metrics.jsonl for hours): while a
    run trains, a second run, a resume, an overwrite and an evaluation writing into the folder are all refused
    with one line naming the holder's PID, and the folder is left to the first. Once it is gone, even by a
    signal, the lock is free and the run resumes."""
    import meta
    from meta.training.errors import RunError
    from tests.test_training import start_training, wait_for_records

    out = tmp_path / "busy"
    args = [*ARGS, "train.iterations=100000", "train.val_every=100000", "train.checkpoint_every=4"]
    first = start_training(*args, f"out_dir={out}")
    try:
        wait_for_records(out, 5)
        second = subprocess.run([sys.executable, str(REPO / "scripts/train_maml.py"), *args, f"out_dir={out}",
                                 "resume=true"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                capture_output=True, text=True)
        holder = f"is in use by another process (PID {first.pid}"
        assert second.returncode == 1 and holder in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        for extra in (["resume=true"], [], ["overwrite=true"]):  # this test's own process is the second one
            with pytest.raises(RunError, match=f"PID {first.pid}"):
                overrides = [*args, f"out_dir={out}", *extra]
                meta.train(meta.load_config(overrides=overrides), overrides=overrides)
        with pytest.raises(RunError, match=f"PID {first.pid}.*evaluate it when that run has finished"):
            meta.evaluate(out, ["eval.checkpoint=last"])
        assert first.poll() is None  # the first run goes on, alone in its folder
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 1 and "interrupted (SIGTERM)" in err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in train_records(out) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order, none twice
    assert not list(out.glob("results_*.json"))
    resumed = [*args, "train.iterations=" + str(len(steps) + 1), f"out_dir={out}", "resume=true"]
    meta.train(meta.load_config(overrides=resumed), overrides=resumed)  # the lock went with the process
    assert (out / "results.json").is_file()
