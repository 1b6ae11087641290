"""Packaging beyond setup.cfg: copy the checkout's presets, table specs and entry-point scripts into the wheel.

They stay at the repository's top level (configs/, experiments/tables/, scripts/) and are found there in a
checkout; an installed package reads these copies through importlib.resources (meta/package_files.py, whose
SHIPPED names the same folders).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# checkout folder -> (folder inside the meta package, the files shipped)
SHIPPED = {
    "configs": ("configs", ["*.yaml"]),
    "experiments/tables": ("tables", ["*.yaml"]),
    "scripts": ("_scripts", ["train_maml.py", "evaluate.py", "reproduce.py"]),
}


class BuildPyWithShippedFiles(build_py):
    """build_py, then the SHIPPED files into build_lib/meta/<folder>/."""

    def run(self) -> None:
        super().run()
        root = Path(__file__).resolve().parent
        for source, (target, patterns) in SHIPPED.items():
            dest = Path(self.build_lib) / "meta" / target
            dest.mkdir(parents=True, exist_ok=True)
            for pattern in patterns:
                files = sorted((root / source).glob(pattern))
                if not files:
                    raise FileNotFoundError(f"setup.py: nothing matches {source}/{pattern}")
                for path in files:
                    shutil.copyfile(path, dest / path.name)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
