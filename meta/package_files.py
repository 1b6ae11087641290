"""Where the project's non-Python files are: the checkout's folders, or their copies inside an installed wheel.

A checkout (a source tree, an editable install or ``PYTHONPATH`` pointing at it) reads ``configs/``,
``experiments/tables/`` and ``scripts/`` where they are, so edits apply at once. A wheel has no checkout:
``setup.py`` copies those folders into the package (:data:`SHIPPED`) and they are read through
``importlib.resources``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: checkout folder -> the folder inside the installed ``meta`` package that holds its shipped files (setup.py
#: copies the same files; tests/test_packaging.py checks the wheel)
SHIPPED = {"configs": "configs", "experiments/tables": "tables", "scripts": "_scripts"}


def checkout_root() -> Path | None:
    """The repository this package was imported from, or ``None`` for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.cfg").is_file() and (root / "configs" / "base.yaml").is_file() else None


def shipped_path(folder: str) -> Path:
    """``folder`` (a key of :data:`SHIPPED`, e.g. ``"configs"``) of the checkout, else its copy in the wheel."""
    if folder not in SHIPPED:
        raise KeyError(f"{folder!r} is not shipped with the package; shipped: {', '.join(SHIPPED)}")
    root = checkout_root()
    if root is not None:
        return root / folder
    return Path(str(resources.files("meta") / SHIPPED[folder]))
