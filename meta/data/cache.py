"""Atomic, keyed, content-hashed tensor caches in the writable cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from meta.data.errors import DataError

#: Mode of the files the project writes (before the umask), so collaborators on a shared machine can read them.
FILE_MODE = 0o644


def source_fingerprint(path: Path) -> list[list[Any]]:
    """Identify a source file or folder by its files' relative paths, sizes and mtimes.

    Cheap (stat only) yet changes whenever a file is replaced, edited, added or removed.
    """
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out: list[list[Any]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            st = full.stat()
            out.append([full.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def cache_key(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serializable description of the cached content."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file in the same folder, then ``os.replace``.

    An interrupted write never leaves a broken ``path``; a killed process may leave ``<name>.*.tmp``
    (see :func:`remove_stale_temporaries`). The file gets mode 0o644 minus the umask (``mkstemp`` gives 0o600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, FILE_MODE & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``*.tmp`` files an interrupted :func:`atomic_write` left in ``folder``; return them."""
    stale = sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def content_hash(content: dict[str, Any]) -> str:
    """SHA-256 of a cache's content: every tensor's dtype, shape and bytes, and every other value as JSON."""
    digest = hashlib.sha256()
    for key in sorted(content):
        value = content[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        else:
            digest.update(json.dumps(value, sort_keys=True, allow_nan=False, default=str).encode())
    return digest.hexdigest()


def check_writable(folder: Path, what: str) -> None:
    """Raise a one-line :class:`DataError` unless ``folder`` can be created (if missing) and written to.

    Probes with a real temporary file, so it also holds for root and read-only mounts.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DataError(f"{what} {folder} is not writable ({error.strerror or error}); point it at a writable "
                        f"folder") from None


def load_or_build(
    cache_dir: Path, stem: str, spec: dict[str, Any], build: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Return ``(content, rebuilt)``: the cached dict for ``spec`` or ``build()``'s result.

    The file is ``<cache_dir>/<stem>-<key>.pt`` and stores a SHA-256 of its content, checked on every load: a
    damaged or unreadable cache is rebuilt, with a one-line notice on stderr. After a rebuild, stale files of the
    same stem are removed. The cache folder's writability is checked before ``build()`` runs.
    """
    key = cache_key(spec)
    path = cache_dir / f"{stem}-{key}.pt"
    expected_spec = json.loads(json.dumps(spec))
    if path.is_file():
        problem = None
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            stored = content.pop("sha256", None)
            if content.get("spec") != expected_spec:
                problem = "it was built for other settings"
            elif stored != content_hash(content):
                problem = "its content hash does not match (the file is damaged)"
            else:
                return content, False
        except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt
            problem = f"it cannot be read ({type(error).__name__})"
        print(f"notice: rebuilding the cache {path}: {problem}", file=sys.stderr)
    check_writable(cache_dir, "the preprocessing cache folder (data.cache_dir or META_CACHE_DIR)")
    content = dict(build())
    content["spec"] = expected_spec
    try:
        atomic_torch_save({**content, "sha256": content_hash(content)}, path)
    except OSError as error:
        raise DataError(f"cannot write the cache {path} ({error.strerror or error}); point data.cache_dir or "
                        f"META_CACHE_DIR at a writable folder") from None
    for old in cache_dir.glob(f"{stem}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return content, True
