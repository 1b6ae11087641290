"""The explicit TF32 switch (config key ``tf32``): a run sets PyTorch's process-wide TF32 flags as its config says
while it runs, and puts them back afterwards, so that nothing about a run's numerics depends on a flag that some
other code left behind (PyTorch itself allows TF32 in cuDNN convolutions by default)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import meta
import meta.training.run as run_module
from meta.training.builders import tf32_allowed
from tests.test_training import TINY


def flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("before", [(True, False), (False, True)])
@pytest.mark.parametrize("allowed", [True, False])
def test_tf32_allowed_sets_both_flags_and_restores_them(before, allowed):
    saved = flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        with tf32_allowed(allowed):
            assert flags() == (allowed, allowed)
        assert flags() == before
        with pytest.raises(RuntimeError), tf32_allowed(allowed):
            raise RuntimeError("a run that fails")
        assert flags() == before  # restored on the way out of an error too
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("tf32", [False, True])
def test_train_and_evaluate_run_under_the_configured_tf32(tmp_path, monkeypatch, tf32):
    seen: list[tuple[bool, bool]] = []

    @contextlib.contextmanager
    def recording(allowed: bool):
        with tf32_allowed(allowed):
            yield
            seen.append(flags())  # what the run's training or test computed under

    monkeypatch.setattr(run_module, "tf32_allowed", recording)
    before = flags()
    out = tmp_path / "run"
    meta.train(meta.load_config(overrides=[*TINY, "train.iterations=2", f"tf32={str(tf32).lower()}",
                                           f"out_dir={out}", "progress=false"]))
    assert seen == [(tf32, tf32)]
    meta.evaluate(out, ["eval.tasks=4", f"tf32={str(not tf32).lower()}"])  # an evaluation may choose its own
    assert seen == [(tf32, tf32), (not tf32, not tf32)]
    assert flags() == before
