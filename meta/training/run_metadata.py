"""What identifies a result: the config hash, the commit, the device and the versions (``results.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from meta.package_files import checkout_root
from meta.training.config import config_hash

#: version of the results.json layout: 2 added the seed, the torch and Python versions and test.task_accuracies
RESULTS_SCHEMA_VERSION = 2


def run_metadata(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What identifies a result: preset, config hash, commit, device, and the paper's number to compare with."""
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "config_hash": config_hash(cfg),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "device": device_name(device),
        "reference": OmegaConf.to_container(cfg.reference),
    }


def git_commit() -> str:
    """The current commit of the repository, with ``-dirty`` if it has uncommitted changes (``unknown`` for an
    installed wheel, which has none)."""
    repo = checkout_root()
    if repo is None:
        return "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (GPU model, or CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
