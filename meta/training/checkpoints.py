"""Checkpoints: saved atomically, loaded with ``weights_only=True`` (never code), and the top validation checkpoints
of ``eval.checkpoint=ensemble``."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from meta.data.cache import atomic_torch_save


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not written by this project, or for another model."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint atomically (an interrupted save never leaves a broken file)."""
    atomic_torch_save(state, path)


#: What every checkpoint of a run holds.
CHECKPOINT_KEYS = ("config", "learner", "step")


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``: tensors and plain
    containers only, never code. Anything else raises a one-line :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
        reason = found.group(1).strip()[:160] if found else (str(error).strip().splitlines() or ["?"])[0][:160]
        if "Unsupported global" in str(error):  # a class or function: loading it could run code
            raise CheckpointError(f"{path} is refused: it holds more than tensors and plain values, and loading it "
                                  f"could run code ({reason}); use a checkpoint written by this project") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, empty or another kind of file: "
                              f"{reason}); use another checkpoint, or restart the run with overwrite=true") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, empty or another kind of file: "
                              f"{reason}); use another checkpoint, or restart the run with overwrite=true") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of scripts/train_maml.py (no {', '.join(missing)})")
    return state


def load_learner_state(learner: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``learner.load_state_dict`` that names the file and the likely cause when the shapes or names differ."""
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, KeyError, TypeError) as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{path} does not fit the configured learner (its task.ways, model or inner.rule "
                              f"differ from the config): {detail}") from None


def top_checkpoint_path(out_dir: Path, step: int) -> Path:
    """Where ``eval.checkpoint=ensemble`` keeps the model validated at ``step`` while it is among the top ones."""
    return Path(out_dir) / f"top_step{step:07d}.pt"


def rank_top(top: list[dict[str, Any]], step: int, accuracy: float, size: int) -> list[dict[str, Any]]:
    """The ``size`` best validations (``{"step", "accuracy"}``, best first) once ``step`` scored ``accuracy``.

    Highest accuracy first; between equal accuracies the later step first, which is what MAML++'s
    ``np.argsort(val_acc)[::-1][:top_n_models]`` gives when the sort is stable (experiment_builder.py L251; numpy's
    default sort is stable only for short arrays, so the code's own order of ties is not defined)."""
    entries = [*top, {"step": int(step), "accuracy": float(accuracy)}]
    return sorted(entries, key=lambda e: (-e["accuracy"], -e["step"]))[:size]


def prune_top_checkpoints(out_dir: Path, top: list[dict[str, Any]]) -> list[str]:
    """Delete the ``top_step*.pt`` files of ``out_dir`` that ``top`` does not list; return their names. Called only
    after a checkpoint that lists ``top`` is saved (and on resume), so the files the newest checkpoint lists exist."""
    keep = {top_checkpoint_path(out_dir, e["step"]).name for e in top}
    removed = []
    for path in sorted(Path(out_dir).glob("top_step*.pt")):
        if path.name not in keep:
            path.unlink()
            removed.append(path.name)
    return removed
