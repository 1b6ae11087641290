"""README.md and docs/: the generated configuration reference matches the config, and every fenced block runs.

Python blocks are executed (the README's two, with their data and lengths, in tests/test_readme.py). Every shell
command is run in the form that does its work without training: a training command line resolves to a config
(sweeps expanded, as ``scripts/train_maml.py`` does before the first run), an evaluation's keys are keys that apply
to a saved run, a table command's cells and overrides pass the runner's own checks, every ``--flag`` of a script
is one its parser defines, ``make`` targets run as ``make -n``, shell scripts parse (``bash -n``), and every file a
command names exists. ``pip install`` is what tests/test_packaging.py does to a built wheel in a fresh venv.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import meta
from meta.experiments.sweep import expand_sweep
from meta.experiments.tables import check_cells, load_table, select_cells
from meta.training.cli_help import DEFAULT_PRESET, config_keys, config_markdown, info_text
from meta.training.config import check_eval_overrides, load_config
from tests.helpers import has_omniglot, random_tasks

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: pages written by others, with their own tests
NOT_HERE = {"protocols.md", "numerics.md"}
DOC_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md") if p.name not in NOT_HERE)]
#: python and yaml blocks run by the named test elsewhere (file, first line of the block)
RUN_ELSEWHERE = {
    ("README.md", "import torch, meta"): "tests/test_readme.py::test_readme_api_example_runs",
    ("README.md", "import time"): "tests/test_readme.py::test_readme_first_experiment_runs",
    ("README.md", "import meta"): "tests/test_readme.py::test_readme_train_api_runs",
    ("README.md", "# My variant: MAML 5-way 1-shot with two inner steps."):
        "tests/test_readme.py::test_readme_first_experiment_runs",
    ("docs/rules.md", '"""SGD with momentum: the complete example of docs/rules.md (keep the two in sync; a test '
                      'checks it)."""'): "tests/test_rules.py::test_docs_example_is_the_registered_momentum_rule",
}
SCRIPTS = {"meta-train": "scripts/train_maml.py", "meta-evaluate": "scripts/evaluate.py",
           "meta-reproduce": "scripts/reproduce.py"}


def code_blocks(name: str) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of a Markdown file, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", (REPO / name).read_text(), flags=re.S | re.M)


BLOCKS = [(name, i, lang, text) for name in DOC_FILES for i, (lang, text) in enumerate(code_blocks(name))]
SHELL = [(name, i, text) for name, i, lang, text in BLOCKS if lang in ("bash", "sh")]


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, split as the shell does."""
    joined = text.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def parser_flags(path: Path) -> set[str]:
    """The ``--flags`` an argparse script or module defines."""
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))


def check_train_args(args: list[str]) -> None:
    """What scripts/train_maml.py does with a command line before it trains."""
    if info_text("", args) is not None:
        return
    args = [a for a in args if a != "--show-config"]
    assert not [a for a in args if a.startswith("-")], f"unknown flags {args}"
    runs = expand_sweep(args, "runs/sweep") or [("", args)]
    for _, run_args in runs:
        load_config([a for a in run_args if not a.startswith("out_dir=")], preset=DEFAULT_PRESET)


def check_script(script: str, args: list[str]) -> None:
    """One command line of a script in scripts/, checked as described in the module docstring."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    if script == "scripts/train_maml.py":
        check_train_args(args)
    elif script == "scripts/evaluate.py":
        assert args and "=" not in args[0], "evaluate.py takes a run folder or a checkpoint first"
        check_eval_overrides(args[1:])
    elif script == "scripts/reproduce.py":
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        only = args[args.index("--only") + 1:] if "--only" in args else None
        only = None if only is None else [c for c in only[:1] if not c.startswith("-")]
        spec = load_table(REPO / "experiments" / "tables" / f"{args[0]}.yaml")
        check_cells(spec, select_cells(spec, only), overrides)
        runner = REPO / "meta" / "cli.py"  # the script is a wrapper; its parser lives in meta/cli.py
        assert {a.split("=")[0] for a in args if a.startswith("--")} <= parser_flags(runner), args
    else:
        assert {a.split("=")[0] for a in args if a.startswith("--")} <= parser_flags(path), args


def check_command(words: list[str]) -> None:
    """One shell command of a block."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
        words = words[1:]
    program, args = words[0], words[1:]
    if program == "export":
        assert all(re.fullmatch(r"[A-Z_]+=\S+", a) for a in args), words
    elif program == "make":
        targets = [a for a in args if "=" not in a]
        proc = subprocess.run(["make", "-n", *targets], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    elif program == "bash":
        assert subprocess.run(["bash", "-n", str(REPO / args[0])]).returncode == 0, args[0]
    elif program == "pip":
        for i, arg in enumerate(args):  # the constraints file exists; the install itself: tests/test_packaging.py
            if arg == "-c":
                assert (REPO / args[i + 1]).is_file(), args[i + 1]
    elif program in SCRIPTS:
        check_script(SCRIPTS[program], args)
    elif program == "torchrun" or args[:2] == ["-m", "torch.distributed.run"]:
        script = next(i for i, a in enumerate(args) if a.endswith(".py"))
        check_script(args[script], args[script + 1:])
    elif program.endswith(("python", "python3")) and args[0] == "-m":
        module, rest = args[1], args[2:]
        if module == "pytest":
            assert all((REPO / a).exists() for a in rest if not a.startswith("-")), rest
        elif module == "meta.training.cli_help":
            from meta.training import cli_help

            with contextlib.redirect_stdout(io.StringIO()) as out:
                cli_help.main(rest)
            assert out.getvalue()
        else:
            path = REPO / (module.replace(".", "/") + ".py")
            assert path.is_file() and {a for a in rest if a.startswith("--")} <= parser_flags(path), words
    elif program.endswith(("python", "python3")):
        check_script(args[0], args[1:])
    else:
        raise AssertionError(f"no check for the command {' '.join(words)!r}: add one to tests/test_docs.py")


def test_configuration_reference_is_generated_from_the_config():
    text = (DOCS / "configuration.md").read_text()
    assert text == config_markdown(), (
        "docs/configuration.md differs from the config it documents; regenerate it with "
        "`python -m meta.training.cli_help --markdown > docs/configuration.md`")
    for key, _kind, _meaning in config_keys():
        assert f"| `{key}` |" in text


def test_every_block_is_run_somewhere():
    for name, i, lang, text in BLOCKS:
        where = f"{name}, block {i}"
        assert lang in ("bash", "sh", "python", "yaml", "text"), f"{where}: name the block's language"
        first = text.splitlines()[0]
        if lang in ("python", "yaml") and (name, first) not in RUN_ELSEWHERE:
            assert (name, i) in PYTHON_BLOCKS, f"{where}: no test runs this block ({first!r})"
    for (name, first), test in RUN_ELSEWHERE.items():
        assert any(n == name and t.splitlines()[0] == first for n, _, _, t in BLOCKS), f"{name}: {first!r} is gone"
        path, function = test.split("::")
        assert f"def {function}(" in (REPO / path).read_text(), test


@pytest.mark.parametrize(("name", "index", "text"), SHELL, ids=[f"{n}:{i}" for n, i, _ in SHELL])
def test_every_shell_command_is_valid(name, index, text):
    found = commands(text)
    assert found, f"{name}, block {index}: no command"
    for words in found:
        check_command(words)


# ---- the python blocks of docs/ (the README's are in tests/test_readme.py) -------------------------------------

def _data_tasks_block(text: str) -> None:
    if not has_omniglot():
        pytest.skip("Omniglot is not under the data root (set META_DATA_ROOT)")
    namespace: dict = {}
    exec(compile(text, "docs/data.md", "exec"), namespace)
    assert namespace["batch"].support_x.shape == (32, 5, 1, 28, 28)


def _rules_use_block(text: str) -> None:
    model = meta.build_model("conv4", ways=5, generator=torch.Generator().manual_seed(0)).double()
    tasks = random_tasks(4, 5, 1, 1)
    namespace: dict = {"model": model, "tasks": tasks}
    exec(compile(text, "docs/rules.md", "exec"), namespace)
    assert set(namespace["result"].rule_grads) == {"lr"}


PYTHON_BLOCKS = {}
for _name, _i, _lang, _text in BLOCKS:
    if _lang == "python" and _name == "docs/data.md" and "TaskSampler(pool" in _text:
        PYTHON_BLOCKS[_name, _i] = (_data_tasks_block, _text)
    elif _lang == "python" and _name == "docs/rules.md" and 'meta.build_rule("momentum"' in _text:
        PYTHON_BLOCKS[_name, _i] = (_rules_use_block, _text)


@pytest.mark.parametrize("key", sorted(PYTHON_BLOCKS), ids=[f"{n}:{i}" for n, i in sorted(PYTHON_BLOCKS)])
def test_docs_python_blocks_run(key):
    run, text = PYTHON_BLOCKS[key]
    run(text)


def test_relative_links_point_at_files_that_exist():
    missing = []
    for name in DOC_FILES:
        text = re.sub(r"^```.*?^```", "", (REPO / name).read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            path = ((REPO / name).parent / target).resolve()
            if "://" not in target and not path.exists() and path.name not in NOT_HERE:
                missing.append(f"{name}: {target}")
    assert not missing, missing
