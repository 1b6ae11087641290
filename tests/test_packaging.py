"""The wheel: presets, table specs, entry-point scripts, py.typed, LICENSE and console entry points ship inside it,
and an installed wheel (no checkout, no PYTHONPATH) runs ``meta-train --help`` and resolves presets that inherit."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import meta
from meta.package_files import SHIPPED

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".cache", "*.pt")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the checkout (a copy: no stale build/ folder can leak into it)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(root / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Warning" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]  # the build is quiet
    (path,) = (root / "dist").glob("*.whl")
    return path


def test_wheel_holds_presets_tables_scripts_license_and_entry_points(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for source, target in SHIPPED.items():
        wanted = {"scripts": ["train_maml.py", "evaluate.py", "reproduce.py"]}.get(
            source, [p.name for p in (REPO / source).glob("*.yaml")])
        missing = [name for name in wanted if f"meta/{target}/{name}" not in names]
        assert wanted and not missing, f"{source}: not in the wheel: {missing}"
    assert "meta/configs/base.yaml" in names and "meta/py.typed" in names
    assert "meta/data/splits/omniglot_maml_random.json" in names
    assert not [n for n in names if n.startswith("meta/benchmarks/")], "benchmark code is not library API"
    info = wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"
    assert f"{info}/licenses/LICENSE" in names or f"{info}/LICENSE" in names
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {
        "meta-train": "meta.cli:train", "meta-evaluate": "meta.cli:evaluate", "meta-reproduce": "meta.cli:reproduce"}
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "Name: meta-vmap\n" in metadata and f"Version: {meta.__version__}\n" in metadata  # one version, here


@pytest.mark.slow
def test_installed_wheel_runs_its_entry_points(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / "bin"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(bin_dir / "python"), "-c", purelib], capture_output=True, text=True,
                               check=True).stdout.strip())
    # torch and the other dependencies from this interpreter's site-packages (a plain path: its .pth files,
    # among them any editable install of meta, are not processed), so nothing is downloaded
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr[-2000:]

    def run(*args: str) -> str:
        proc = subprocess.run([*args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert run(str(bin_dir / "python"), "-c", "import meta; print(meta.__file__)").startswith(str(venv))
    help_text = run(str(bin_dir / "meta-train"), "--help")
    assert "fomaml_omniglot_5w1s: First-order MAML" in help_text and "inner.first_order (bool" in help_text
    shown = run(str(bin_dir / "meta-train"), "--show-config", "preset=fomaml_omniglot_5w1s")
    assert "first_order: true" in shown and "loss_reduction: sum_over_shots" in shown  # inherited from the wheel
    assert "keys that apply to a saved run" in run(str(bin_dir / "meta-evaluate"), "--help").lower()
    assert "--seeds" in run(str(bin_dir / "meta-reproduce"), "--help")
    spec = subprocess.run([str(bin_dir / "meta-reproduce"), "maml_omniglot", "--only", "nope"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert "not cells of maml_omniglot; its cells: ['conv_5w1s'" in spec.stderr  # the table spec ships too


def test_install_requires_is_a_range_and_constraints_pin_versions_inside_it() -> None:
    from packaging.requirements import Requirement

    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(REPO / "setup.cfg")
    lines = setup_cfg["options"]["install_requires"].split("\n")
    required = {r.name: r for r in map(Requirement, filter(None, lines))}
    pinned = {r.name: r for line in (REPO / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#") for r in [Requirement(line)]}
    assert set(pinned) == {"torch", "torchvision"}
    for name, pin in pinned.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"constraints.txt: {name} is not an exact version"
        assert not any(s.operator == "==" for s in required[name].specifier), f"setup.cfg pins {name} exactly"
        assert required[name].specifier.contains(spec.version), f"{name}=={spec.version} is outside setup.cfg's range"
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "make test" in (REPO / ".ci" / "run").read_text()


def _import_graph() -> dict[str, set[str]]:
    """meta's modules and the meta modules each imports anywhere in its body (names imported from a package that
    are modules count as those modules)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "meta").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meta"):
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        # a package importing its own submodules (a registry's __init__) and a module reading its own package are
        # how packages work, not a cycle between two modules
        graph[name] = {t for t in targets & set(modules) if t != name and not name.startswith(t + ".")
                       and not t.startswith(name + ".")}
    return graph


def test_no_import_cycle_between_modules() -> None:
    graph = _import_graph()
    assert "meta.data.splits" in graph["meta.data.omniglot"]  # the graph sees real imports
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in graph[node]:
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif len(path) < 12:
                visit(target, [*path, target])

    for start in graph:
        visit(start, [start])
    assert not cycles, f"import cycles: {sorted(set(cycles))[:5]}"
