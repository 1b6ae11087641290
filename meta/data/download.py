"""Opt-in downloads with checksum verification (``data.download=true``; tests use ``file://`` URLs, never the
network)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path


class ChecksumError(ValueError):
    """A downloaded or local file's md5 is not the expected one."""


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path``'s md5 equals ``expected``."""
    actual = file_md5(Path(path))
    if actual.lower() != expected.lower():
        raise ChecksumError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}")


def download_file(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (announced on stderr), verifying ``md5`` before the file is moved into place.

    A checksum mismatch raises :class:`ChecksumError` and a failed transfer ``OSError`` (``urllib.error.URLError``
    when there is no network); either way ``dest`` is left untouched and no partial file remains.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"[meta.data] downloading {url} -> {dest}", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            shutil.copyfileobj(response, out, 1 << 20)
        try:
            verify_md5(Path(tmp), md5)
        except ChecksumError as error:
            raise ChecksumError(f"{url}: {error}; nothing was written to {dest}") from None
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
