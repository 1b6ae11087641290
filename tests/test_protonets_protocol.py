"""ProtoNets' protocol as jakesnell/prototypical-networks ran it (issue 12): batch norm with running statistics
(``model.norm_stats=running``) updated by training forwards and used at evaluation (non-transductive), early
stopping on the validation loss (``train.early_stop_patience``), and the table runner's two-stage cells (stage 1 with
early stopping, stage 2 retrained on train+val for ``best_epoch + patience`` epochs and tested)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from meta.algorithms import ProtoNet
from meta.experiments.tables import load_table, retrain_args, retrain_iterations, run_status
from meta.models import TaskBatchNorm, build_model
from meta.training.builders import build_learner, build_sampler
from meta.training.checkpoints import load_checkpoint
from meta.training.config import ConfigError, load_config
from meta.training.distributed import DistContext, check_distributable
from meta.training.early_stopping import early_stop_start, early_stop_update

REPO = Path(__file__).resolve().parents[1]
WAYS, SHOTS, QUERIES = 5, 2, 3


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """A script of the checkout: train_maml.py in this process (tests.test_training.run_cli), others in their own."""
    if script == "train_maml.py":
        from tests.test_training import run_cli

        return run_cli(script, *args, check=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


# ---- the norm layer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_running_statistics_equal_batchnorm2d_after_training_forwards_and_in_eval_mode(fused: bool) -> None:
    g = torch.Generator().manual_seed(0)
    ours = TaskBatchNorm(6, stats="running").double()
    ours.use_fused_kernel = fused  # both implementations of the training-mode normalization
    theirs = nn.BatchNorm2d(6).double()  # PyTorch's defaults: momentum 0.1, eps 1e-5, unbiased running variance
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    for batch in (4, 7, 3):  # several training forwards, of different sizes (different n / (n - 1) corrections)
        x = torch.randn(batch, 6, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-13, atol=1e-15)
    assert not torch.allclose(ours.running_var, torch.ones(6, dtype=torch.float64))  # they moved
    ours.eval()
    theirs.eval()
    x = torch.randn(5, 6, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours(x), ours.train()(x))  # eval mode differs from the batch statistics
    assert ours.num_batches_tracked.item() == 4  # (the last train-mode call above counted too)


def test_batch_statistics_layer_has_no_buffers_and_ignores_the_mode() -> None:
    layer = TaskBatchNorm(4).double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert list(layer.buffers()) == []
    torch.testing.assert_close(layer(x), layer.eval()(x), rtol=0, atol=0)


def test_running_statistics_refuse_transforms_drivers_and_other_algorithms() -> None:
    layer = TaskBatchNorm(3, stats="running")
    with pytest.raises(RuntimeError, match="loop_autograd"):
        torch.vmap(layer)(torch.randn(2, 4, 3, 2, 2))  # an in-place update under vmap cannot be exact
    learner = ProtoNet(build_model("conv4_maxpool", WAYS, norm_stats="running", generator=torch.Generator()), WAYS)
    task = episode(torch.Generator().manual_seed(0), torch.float32)
    for driver in ("vmap", "loop", "vmap_autograd", "loop_threads", "auto"):
        with pytest.raises(ValueError, match="running statistics"):
            learner.meta_gradient(task, driver=driver)
    assert learner.supported_drivers() == ("loop_autograd",)
    plain = build_model("conv4_maxpool", WAYS, generator=torch.Generator())
    assert ProtoNet(plain, WAYS).supported_drivers()[-1] == "auto"  # others unchanged
    with pytest.raises(ConfigError, match="driver=loop_autograd"):
        load_config(["preset=protonets_omniglot_5w1s", "driver=auto"])
    with pytest.raises(ConfigError, match="algorithm=protonets"):
        load_config(["model.norm_stats=running"])  # MAML adapts under torch.func transforms
    with pytest.raises(ConfigError, match="model.norm=task_bn"):
        load_config(["preset=protonets_omniglot_5w1s", "model.norm=group"])
    cfg = load_config(["preset=protonets_omniglot_5w1s", "train.meta_batch=2"])
    assert check_distributable(cfg, DistContext()) is None  # one process runs it
    assert "model.norm_stats=running" in check_distributable(cfg, DistContext(rank=0, world=2))


def test_validation_episodes_take_val_ways_and_val_queries() -> None:
    cfg = load_config(["preset=protonets_omniglot_20w1s", "data.dataset=synthetic", "data.synthetic_classes=25"])
    val, test = (build_sampler(cfg, split, torch.device("cpu")) for split in ("val", "test"))
    assert (val.ways, val.shots, val.queries) == (5, 1, 15)  # run_train.py L20 --data.test_way 5, L24 query 15
    assert (test.ways, test.shots, test.queries) == (20, 1, 15)
    batch = val.sample(1, torch.Generator().manual_seed(0))
    assert batch.query_y.shape == (1, 75) and int(batch.support_y.max()) == 4
    assert build_learner(cfg, torch.float32, torch.device("cpu")).outer.ways == 60  # the largest episode
    plain = load_config(["preset=maml_omniglot_5w1s", "task.val_queries=3", "data.dataset=synthetic"])
    assert build_sampler(plain, "val", torch.device("cpu")).queries == 3  # any algorithm: queries only
    with pytest.raises(ConfigError, match="task.val_ways=10 differs from task.ways=5"):
        load_config(["preset=maml_omniglot_5w1s", "task.val_ways=10"])  # MAML adapts a 5-way head


def test_pytorch04_init_draws_what_pytorch_0_4_reset_parameters_drew() -> None:
    model = build_model("conv4_maxpool", WAYS, norm_stats="running", init="pytorch04",
                        generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws by hand, layer by layer in module order
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(module.weight[0].numel())  # 0.4's _ConvNd / Linear: stdv = 1 / sqrt(fan_in)
            expected = torch.empty_like(module.weight).uniform_(-bound, bound, generator=g)
            torch.testing.assert_close(module.weight, expected, rtol=0, atol=0)
            torch.testing.assert_close(module.bias, torch.empty_like(module.bias).uniform_(-bound, bound, generator=g),
                                       rtol=0, atol=0)
            assert module.weight.abs().max() <= bound and module.weight.abs().max() > 0.9 * bound
        elif isinstance(module, TaskBatchNorm):  # 0.4's _BatchNorm: weight.uniform_() (U(0, 1)), bias zero
            torch.testing.assert_close(module.weight, torch.empty(64).uniform_(generator=g), rtol=0, atol=0)
            assert torch.equal(module.bias, torch.zeros(64)) and 0 <= module.weight.min() < module.weight.max() < 1
    xavier = build_model("conv4_maxpool", WAYS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xavier.features[0].norm.weight, torch.ones(64))  # the default scheme is unchanged


# ---- ProtoNets with running statistics against a hand-written nn.BatchNorm2d ProtoNet ------------------------------


def episode(g: torch.Generator, dtype: torch.dtype, ways: int = WAYS) -> tuple[torch.Tensor, ...]:
    """One task, support labels 0..ways-1 with SHOTS each, QUERIES queries each (leading task dimension 1)."""
    sx = torch.randn(1, ways * SHOTS, 1, 28, 28, generator=g, dtype=dtype)
    qx = torch.randn(1, ways * QUERIES, 1, 28, 28, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(SHOTS)[None]
    qy = torch.arange(ways).repeat_interleave(QUERIES)[None]
    return sx, sy, qx, qy


def with_batchnorm2d(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose TaskBatchNorm layers are nn.BatchNorm2d with the same tensors."""
    reference = copy.deepcopy(model)
    for block in reference.features:
        old = block.norm
        new = nn.BatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum).to(old.weight.dtype)
        new.load_state_dict(old.state_dict())
        block.norm = new
    return reference


def reference_loss(encoder: nn.Module, task: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """protonets/models/few_shot.py L24-55: one encoder call on cat([xs, xq]), class means, -squared distances."""
    sx, sy, qx, qy = (t[0] for t in task)
    z = encoder.embed(torch.cat([sx, qx]))
    prototypes = z[: len(sx)].view(WAYS, SHOTS, -1).mean(1)
    dists = ((z[len(sx):, None, :] - prototypes[None]) ** 2).sum(-1)
    log_p = F.log_softmax(-dists, dim=1)
    return -log_p.gather(1, qy[:, None]).mean(), (log_p.argmax(1) == qy).double().mean()


def test_protonets_running_statistics_training_and_evaluation_equal_a_batchnorm2d_protonet() -> None:
    g = torch.Generator().manual_seed(1)
    model = build_model("conv4_maxpool", WAYS, norm_stats="running", generator=torch.Generator().manual_seed(0))
    learner = ProtoNet(model.double(), WAYS)
    reference = with_batchnorm2d(learner.model)
    for _ in range(3):  # training steps: the same gradients and the same running statistics after each
        task = episode(g, torch.float64)
        result = learner.meta_gradient(task, driver="loop_autograd")
        reference.train()
        reference.zero_grad()
        loss, _ = reference_loss(reference, task)
        loss.backward()
        torch.testing.assert_close(result.loss[0], loss.detach(), rtol=1e-12, atol=0)
        for name, p in reference.named_parameters():
            if not name.startswith("head."):
                torch.testing.assert_close(result.grads[name], p.grad, rtol=1e-10, atol=1e-12)
        ours_buffers, their_buffers = dict(learner.model.named_buffers()), dict(reference.named_buffers())
        assert ours_buffers.keys() == their_buffers.keys() and len(ours_buffers) == 12
        for name, value in their_buffers.items():
            # means and variances over every pixel of an episode: their rounding is absolute (a few ulps of the O(1)
            # activations), so near-zero running means are held to atol (at 1e-15: 6e-15 seen, no margin)
            torch.testing.assert_close(ours_buffers[name], value, rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # the same SGD step on both, so the statistics keep meeting new weights
            for (name, p), q in zip(learner.model.named_parameters(), reference.parameters()):
                p -= 0.1 * result.grads[name]
                q -= 0.1 * result.grads[name]
    assert learner.model.features[0].norm.num_batches_tracked.item() == 3  # one update per training episode

    test = episode(g, torch.float64)
    loss, accuracy = learner.evaluate(test)  # validation and test: eval mode, running statistics
    reference.eval()
    with torch.no_grad():
        expected_loss, expected_accuracy = reference_loss(reference, test)
    torch.testing.assert_close(loss[0], expected_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(accuracy[0], expected_accuracy, rtol=0, atol=0)
    assert learner.model.training and learner.model.features[0].norm.num_batches_tracked.item() == 3  # untouched
    # the transductive evaluation (each episode's own statistics) of the same weights differs
    transductive = ProtoNet(build_model("conv4_maxpool", WAYS, generator=torch.Generator()).double(), WAYS)
    transductive.load_state_dict(learner.state_dict(), strict=False)  # the same parameters, no running statistics
    with torch.no_grad():
        reference.train()
        batch_loss, _ = reference_loss(reference, test)
    torch.testing.assert_close(transductive.evaluate(test)[0][0], batch_loss, rtol=1e-12, atol=0)
    assert abs(batch_loss.item() - loss[0].item()) > 1e-3


# ---- early stopping --------------------------------------------------------------------------------------------------


def test_early_stopping_stops_at_the_right_validation_and_the_retraining_length_follows_trainval_py() -> None:
    losses = [5.0, 4.0, 4.5, 4.0, 3.9, 4.0, 4.1, 4.2, 3.0]  # one validation every 10 steps
    record, stopped_at = early_stop_start(), None
    for i, loss in enumerate(losses):
        record = early_stop_update(record, loss, 10 * (i + 1), patience=2)
        if record["stopped"]:
            stopped_at = 10 * (i + 1)
            break
    # 4.0 at step 40 equals the best (no improvement); 3.9 at 50 is the best; 60, 70, 80 wait 1, 2, 3 > 2: stop
    assert stopped_at == 80 and record["best_step"] == 50 and record["best_loss"] == 3.9 and record["wait"] == 3
    # trainval.py L14: best_epoch = argmin of the per-epoch validation losses (from 0), L25: best_epoch + patience
    best_epoch = min(range(8), key=lambda i: (losses[i], i))
    assert best_epoch == 4 and retrain_iterations(50, 2, 10) == (best_epoch + 2) * 10
    assert retrain_iterations(45, 2, 10) == 60  # a best at a run's last, partial epoch is that epoch
    nan = early_stop_update(early_stop_start(), math.nan, 10, patience=0)
    assert nan["stopped"] and nan["best_step"] == 0  # a NaN loss never improves
    with pytest.raises(ValueError, match="0 epochs"):
        retrain_iterations(10, 0, 10)


#: tiny ProtoNets runs with running statistics on synthetic data
TINY = ["preset=protonets_omniglot_5w1s", "data.dataset=synthetic", "data.synthetic_classes=20", "task.train_ways=5",
        "task.queries=2", "task.test_queries=2", "train.val_tasks=4", "eval.tasks=4", "eval.batch_size=4",
        "train.log_every=1", "progress=false", "device=cpu"]


@pytest.mark.slow  # CLI runs in subprocesses
def test_early_stopping_run_stops_where_its_logged_validation_losses_say(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_script("train_maml.py", *TINY, "train.iterations=60", "train.val_every=2", "train.meta_lr=0.02",
                      "train.early_stop_patience=1", "train.checkpoint_every=50", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
    best, wait, stop = math.inf, 0, None  # the rule recomputed from the log
    for step, loss in val:
        if loss < best:
            best, best_step, wait = loss, step, 0
        else:
            wait += 1
            if wait > 1:
                stop = step
                break
    assert stop is not None and stop < 60, val  # it did stop early
    assert val[-1][0] == stop and max(r["step"] for r in records) == stop  # nothing trained after the stop
    record = json.loads((out / "results.json").read_text())["early_stop"]
    assert record == {"best_loss": pytest.approx(best), "best_step": best_step, "wait": 2, "stopped": True,
                      "patience": 1, "steps_trained": stop}
    assert load_checkpoint(out / "checkpoint.pt")["step"] == stop  # saved where it stopped
    again = run_script("train_maml.py", *TINY, "train.iterations=60", "train.val_every=2", "train.meta_lr=0.02",
                       "train.early_stop_patience=1", "train.checkpoint_every=50", f"out_dir={out}", "resume=true")
    assert again.returncode == 0, again.stderr  # a resumed stopped run trains nothing more
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == stop


@pytest.mark.slow  # CLI runs in subprocesses
def test_checkpoints_best_and_resume_keep_the_running_statistics(tmp_path: Path) -> None:
    common = [*TINY, "train.val_every=3", "train.checkpoint_every=3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_script("train_maml.py", *common, "train.iterations=6", f"out_dir={whole}").returncode == 0
    first = run_script("train_maml.py", *common, "train.iterations=3", f"out_dir={parts}")
    assert first.returncode == 0, first.stderr
    (parts / "results.json").unlink()
    second = run_script("train_maml.py", *common, "train.iterations=6", f"out_dir={parts}", "resume=true")
    assert second.returncode == 0, second.stderr
    a, b = (load_checkpoint(d / "checkpoint.pt")["learner"] for d in (whole, parts))
    stats = [k for k in a if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 12 and a.keys() == b.keys()
    assert a["model.features.0.norm.num_batches_tracked"].item() == 6  # six training episodes, one update each
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    best = load_checkpoint(whole / "best.pt")["learner"]
    assert all(k in best for k in stats) and not torch.equal(best["model.features.0.norm.running_var"],
                                                               torch.ones(64))
    results = [json.loads((d / "results.json").read_text())["test"] for d in (whole, parts)]
    assert results[0]["task_accuracies"] == results[1]["task_accuracies"] and results[0]["loss"] == results[1]["loss"]


# ---- the table runner's two-stage cells --------------------------------------------------------------------------


def test_two_stage_protocol_label_judges_both_stages(tmp_path: Path) -> None:
    cell = load_table(REPO / "experiments" / "tables" / "protonets_omniglot.yaml").cells[0]
    first, run = tmp_path / "seed0_stage1", tmp_path / "seed0"

    def write(folder: Path, overrides: list[str], results: dict) -> None:
        folder.mkdir(exist_ok=True)
        cfg = load_config([f"preset={cell.preset}", *overrides])
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (folder / "results.json").write_text(json.dumps(results))

    def stage1(overrides: list[str], stopped: bool, trained: int) -> None:
        write(first, overrides, {"early_stop": {"best_loss": 0.1, "best_step": 3000, "wait": 201, "stopped": stopped,
                                                "patience": 200, "steps_trained": trained}})

    def stage2(iterations: int, *extra: str) -> None:
        write(run, [*cell.retrain, f"train.iterations={iterations}", "train.early_stop_patience=null",
                    f"train.val_every={iterations}", *extra], {})

    stage1([], True, 23100)
    assert retrain_args(cell, first)[-3:] == ["train.iterations=22900", "train.early_stop_patience=null",
                                              "train.val_every=22900"]  # (29 + 200) epochs of 100
    stage2(22900)
    assert run_status(cell, run)["label"] == "as published"
    stage1(["train.iterations=30000"], True, 23100)  # a cap that early stopping never reached
    assert run_status(cell, run)["label"] == "as published"
    stage1(["train.iterations=3000"], False, 3000)  # the cap ended stage 1
    assert run_status(cell, run)["label"] == "reduced schedule (3000 of 1000000 iterations)"
    stage1([], True, 23100)
    stage2(5000)  # a retraining shorter than stage 1 gives
    assert run_status(cell, run)["label"] == ("deviates: train.val_every=5000 (preset: 22900); retraining "
                                              "train.iterations=5000 (stage 1 gives 22900)")
    stage2(22900, "task.val_queries=5")  # and any other key of either stage
    assert run_status(cell, run)["label"] == "deviates: task.val_queries=5 (preset: 15)"


@pytest.mark.slow  # CLI runs in subprocesses
def test_two_stage_cell_end_to_end_on_synthetic_data_with_a_resume(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"title": "tiny", "source": "test", "cells": [{
        "name": "pn", "preset": "protonets_omniglot_5w1s", "paper": {"accuracy": 98.8, "pm": None, "pm_kind": "none"},
        "source": {"paper": "p", "table": "t", "code": "c"}, "requires": {"model.norm_stats": "running"},
        "retrain": ["data.protocol=protonets_vinyals_trainval", "eval.checkpoint=last"]}]}))
    out = tmp_path / "out"
    tiny = [a for a in TINY if not a.startswith("preset=")]
    args = [str(spec), "--iterations", "40", "--out", str(out), *tiny, "train.val_every=2", "train.meta_lr=0.02",
            "train.early_stop_patience=1", "train.checkpoint_every=4"]
    proc = run_script("reproduce.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = out / "pn" / "seed0_stage1", out / "pn" / "seed0"
    val = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in val if r["split"] == "val"]
    best_epoch = min(range(len(losses)), key=lambda i: (losses[i], i))  # trainval.py L14's argmin over the trace
    record = json.loads((first / "results.json").read_text())["early_stop"]
    assert record["stopped"] and record["best_step"] == 2 * (best_epoch + 1)
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["train"]["iterations"] == (best_epoch + 1) * 2  # (best_epoch + patience) epochs of 2 iterations
    assert config["data"]["protocol"] == "protonets_vinyals_trainval" and config["eval"]["checkpoint"] == "last"
    assert config["train"]["early_stop_patience"] is None
    results = json.loads((second / "results.json").read_text())
    assert results["checkpoint"] == f"last (step {config['train']['iterations']})" and "early_stop" not in results
    row = json.loads((out / "table.json").read_text())["rows"][0]
    assert row["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert row["seeds"][0]["stage1"] == {"best_step": record["best_step"], "steps_trained": record["steps_trained"],
                                         "stopped_early": True, "retrain_iterations": config["train"]["iterations"]}
    # the retraining's keys are the protocol, not deviations; the synthetic data and the short schedule are
    assert "data.protocol" not in row["protocol"] and "eval.checkpoint" not in row["protocol"]
    assert "data.dataset=synthetic (preset: omniglot)" in row["protocol"]
    assert "reduced schedule" not in row["protocol"]  # stage 1 stopped early, before the --iterations cap mattered

    (second / "results.json").unlink()  # stage 2 interrupted before its test: the rerun skips stage 1, resumes it
    again = run_script("reproduce.py", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"[skip] {first}" in again.stdout and f"[resume] {second}" in again.stdout
    assert json.loads((second / "results.json").read_text())["test"] == results["test"]
