"""Atomic, keyed tensor caches in the writable cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


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
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_build(
    cache_dir: Path, stem: str, spec: dict[str, Any], build: Any
) -> tuple[dict[str, Any], bool]:
    """Return ``(content, rebuilt)``: the cached dict for ``spec`` or ``build()``'s result.

    The file is ``<cache_dir>/<stem>-<key>.pt``; after a rebuild, stale files of the same
    stem are removed. A cache that cannot be read is rebuilt. Returns whether it rebuilt.
    """
    key = cache_key(spec)
    path = cache_dir / f"{stem}-{key}.pt"
    if path.is_file():
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            if content.get("spec") == json.loads(json.dumps(spec)):
                return content, False
        except Exception:  # noqa: BLE001 - a damaged cache is simply rebuilt
            pass
    content = dict(build())
    content["spec"] = json.loads(json.dumps(spec))
    atomic_torch_save(content, path)
    for old in cache_dir.glob(f"{stem}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return content, True
