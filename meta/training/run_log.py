"""Run outputs: the metrics log (JSON lines), checkpoints, learning-curve plots and run metadata."""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from meta.data.cache import atomic_torch_save, atomic_write
from meta.package_files import checkout_root
from meta.training.config import ConfigError, config_hash
from meta.training.lock import LOCK_FILE


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not written by this project, or for another model."""


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON (``allow_nan=False``): non-finite numbers become ``null``."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


#: where ``log.tensorboard=true`` writes its event files, inside the run folder
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step.

    With ``tensorboard=True`` every record's numbers also go to TensorBoard (``<split>/<name>`` at the record's
    step, in ``TENSORBOARD_DIR`` beside the log), and so does ``learning_rate`` when :meth:`append` is given one.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.tensorboard = tensorboard
        self._writer: Any = None
        self._purge_step: int | None = None
        if tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard (or "
                                  "pip install 'meta-vmap[tensorboard]'), or leave log.tensorboard=false") from None

    def append(self, record: dict[str, Any], learning_rate: float | None = None) -> None:
        """Write one record and flush it to disk (and to TensorBoard, with the learning rate, when enabled)."""
        with self.path.open("a") as f:
            f.write(to_json(record) + "\n")
        if self.tensorboard:
            scalars = {name: value for name, value in record.items() if name not in ("step", "split")
                       and isinstance(value, int | float) and not isinstance(value, bool)}
            if learning_rate is not None:
                scalars["learning_rate"] = float(learning_rate)
            writer = self._tensorboard_writer()
            for name, value in scalars.items():
                writer.add_scalar(f"{record['split']}/{name}", value, record["step"])
            writer.flush()

    def _tensorboard_writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint, as truncate_after drops the records
            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self) -> list[dict[str, Any]]:
        """All complete records so far (a half-written last line, left by a kill, is not one)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]
        records = []
        for number, line in enumerate(complete.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise CheckpointError(f"{self.path} line {number} is not JSON; the metrics log is damaged "
                                          f"(delete the line, or restart the run with overwrite=true)") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Keep the complete records up to ``step`` (later ones were written after the checkpoint a run resumes
        from; a half-written last line is dropped)."""
        kept = [r for r in self.read() if r["step"] <= step]
        self._purge_step = step + 1
        atomic_write_text(self.path, "".join(to_json(r) + "\n" for r in kept))


def early_stop_start() -> dict[str, Any]:
    """The early-stopping record before the first validation (kept in checkpoints, so a resumed run goes on)."""
    return {"best_loss": math.inf, "best_step": 0, "wait": 0, "stopped": False}


def early_stop_update(record: dict[str, Any], val_loss: float, step: int, patience: int) -> dict[str, Any]:
    """The record after a validation at ``step`` with loss ``val_loss`` (``train.early_stop_patience``).

    jakesnell/prototypical-networks scripts/train/few_shot/train.py L98-114, once per validation (an epoch there):
    a loss below the best so far (strictly; a NaN never is) becomes the best and resets the wait; otherwise the
    wait grows, and training stops once it exceeds ``patience`` (``wait > patience``, L112), that is after
    ``patience + 1`` validations in a row without improvement."""
    if val_loss < record["best_loss"]:
        return {**record, "best_loss": float(val_loss), "best_step": step, "wait": 0}
    wait = record["wait"] + 1
    return {**record, "wait": wait, "stopped": wait > patience}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace`` (mode 0o644 minus the umask)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint atomically (an interrupted save never leaves a broken file)."""
    atomic_torch_save(state, path)


#: What every checkpoint of scripts/train_maml.py holds.
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


def plot_curves(
    records: list[dict[str, Any]],
    path: Path,
    title: str = "",
    test: dict[str, Any] | None = None,
    reference: dict[str, Any] | None = None,
) -> None:
    """Training loss/accuracy and validation accuracy (with its 95% CI band) against the step, saved as a PNG;
    ``test`` (``step``, ``accuracy``, ``ci95``) adds the final test point with its CI, and ``reference``
    (``accuracy``, ``ci95``, ``source``) the paper's number as a line, when the protocol has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and r.get("accuracy") is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train query loss")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val query loss")
    ax_loss.set_xlabel("meta-iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train accuracy (%)", alpha=0.6)
    steps, accuracy = [r["step"] for r in val], [r["accuracy"] for r in val]
    ax_acc.plot(steps, accuracy, "o-", label="val accuracy (%)")
    ci = [r.get("ci95") or 0.0 for r in val]
    ax_acc.fill_between(steps, [a - c for a, c in zip(accuracy, ci)], [a + c for a, c in zip(accuracy, ci)],
                        alpha=0.25, label="val 95% CI")
    if test is not None and test.get("accuracy") is not None:
        ax_acc.errorbar([test["step"]], [test["accuracy"]], yerr=[test.get("ci95") or 0.0], fmt="s", capsize=4,
                        color="black", label=f"test {test['accuracy']:.2f} ± {test.get('ci95') or 0.0:.2f}%")
    if reference is not None and reference.get("accuracy") is not None:
        paper = reference["accuracy"]
        ax_acc.axhline(paper, color="gray", linestyle="--", label=f"paper {paper}%")
        if reference.get("ci95") is not None:
            ax_acc.axhspan(paper - reference["ci95"], paper + reference["ci95"], color="gray", alpha=0.15)
    ax_acc.set_xlabel("meta-iteration")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


#: The files scripts/train_maml.py writes into a run folder (``overwrite=true`` replaces exactly these).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "curves.png", "results.json",
             "results_*.json", "top_step*.pt")


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


def check_out_dir(out_dir: Path) -> str | None:
    """Why ``out_dir`` cannot hold a run (a file, or under a file or a read-only folder), or ``None``.

    Creates nothing: probes the nearest existing folder with a temporary file (which also holds for root).
    """
    import tempfile

    if out_dir.exists() and not out_dir.is_dir():
        return f"out_dir {out_dir} is a file, not a folder; choose another out_dir"
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"out_dir {out_dir} cannot be created: {existing} is a file; choose another out_dir"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return (f"out_dir {out_dir} cannot be written: {existing} is not writable ({error.strerror}); "
                f"choose another out_dir")
    return None


def existing_run_files(out_dir: Path) -> list[str]:
    """Names of the entries in ``out_dir`` other than leftover temporary files and the lock file (empty if it does
    not exist)."""
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".tmp") and p.name != LOCK_FILE)


def remove_run_files(out_dir: Path) -> list[str]:
    """Delete the files of a previous run in ``out_dir`` (:data:`RUN_FILES`); return their names."""
    removed = []
    for pattern in RUN_FILES:
        for path in sorted(out_dir.glob(pattern)):
            path.unlink()
            removed.append(path.name)
    if (out_dir / TENSORBOARD_DIR).is_dir():  # log.tensorboard=true's event files
        shutil.rmtree(out_dir / TENSORBOARD_DIR)
        removed.append(TENSORBOARD_DIR + "/")
    return removed
