"""The run folder: the files a run writes there, whether a folder can hold a run, and atomic text writes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from meta.data.cache import atomic_write
from meta.training.lock import LOCK_FILE

#: where ``log.tensorboard=true`` writes its event files, inside the run folder
TENSORBOARD_DIR = "tensorboard"


#: The files a run writes into its folder (``overwrite=true`` replaces exactly these).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "curves.png", "results.json",
             "results_*.json", "top_step*.pt")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace`` (mode 0o644 minus the umask)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def check_out_dir(out_dir: Path) -> str | None:
    """Why ``out_dir`` cannot hold a run (a file, or under a file or a read-only folder), or ``None``.

    Creates nothing: probes the nearest existing folder with a temporary file (which also holds for root).
    """

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
