"""One process per run folder: an exclusive OS lock (``flock``) on ``<folder>/.lock`` while a run or an evaluation
writes there.

The operating system releases the lock when its holder exits in any way (a crash or ``kill -9`` included), so a
killed run can be resumed at once; no stale lock is ever left to delete. The file holds the holder's PID, which a
refused process names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from meta.training.errors import RunError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None  # type: ignore[assignment]

#: the lock file inside a run folder (not a run file: ``overwrite=true`` keeps it, a folder with only it is empty)
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(folder: Path, advice: str = "wait for it to finish or stop it, or choose another out_dir"
                    ) -> Iterator[Path | None]:
    """Hold the exclusive lock of ``folder`` (an existing folder) while inside; yields the lock file's path.

    Raises :class:`RunError` naming the holder's PID (and ``advice``) when another process holds it. A folder
    where the lock file cannot be created (read-only) or a platform without ``flock`` is not locked (yields None):
    nothing can be written there by anyone, or locking is not available."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"{folder} is in use by another process (PID {holder}, holding {path}): two processes "
                           f"writing one run folder would mix their files; {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # no PID of a process that no longer holds it
    finally:
        os.close(fd)  # releases the lock
