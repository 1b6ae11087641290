"""Console entry points (``meta-train``, ``meta-evaluate``, ``meta-reproduce``): each runs its script, the same
file as ``python scripts/<name>.py``, with the command line it was given.

The scripts are shipped inside the wheel (``meta/_scripts/``, see :mod:`meta.package_files`), so an installed
package runs exactly the checkout's code.
"""

from __future__ import annotations

import runpy
import sys

from meta.package_files import shipped_path


def run_script(name: str, argv: list[str] | None = None) -> None:
    """Run ``scripts/<name>.py`` as ``__main__`` with ``argv`` (default: this process's arguments)."""
    path = shipped_path("scripts") / f"{name}.py"
    sys.argv = [str(path), *(sys.argv[1:] if argv is None else argv)]
    runpy.run_path(str(path), run_name="__main__")


def train() -> None:
    """``meta-train key=value ...``: scripts/train_maml.py (``--help`` lists every key and preset)."""
    run_script("train_maml")


def evaluate() -> None:
    """``meta-evaluate CHECKPOINT key=value ...``: scripts/evaluate.py."""
    run_script("evaluate")


def reproduce() -> None:
    """``meta-reproduce TABLE [--seeds N] ...``: scripts/reproduce.py."""
    run_script("reproduce")
