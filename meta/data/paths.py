"""Where data sets are read from and where preprocessed caches are written."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "META_DATA_ROOT"
CACHE_DIR_ENV = "META_CACHE_DIR"
DEFAULT_DATA_ROOT = Path("~/.cache/meta/data")
DEFAULT_CACHE_DIR = Path("~/.cache/meta/cache")


def _resolve(override: str | os.PathLike[str] | None, env: str, default: Path) -> Path:
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    value = os.environ.get(env, "")
    if value:
        return Path(value).expanduser()
    return default.expanduser()


def resolve_data_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root: ``override`` (config ``data.root``), else ``$META_DATA_ROOT``,
    else ``~/.cache/meta/data``.

    The root may be read-only; nothing is ever written there except by an explicit
    ``download=True``.
    """
    return _resolve(override, DATA_ROOT_ENV, DEFAULT_DATA_ROOT)


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the writable cache directory for preprocessed tensors: ``override``,
    else ``$META_CACHE_DIR``, else ``~/.cache/meta/cache``. Not created here."""
    return _resolve(override, CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
