"""Run the numerical tests under every CPU kernel path this machine has, and measure their tolerance margins.

A kernel path is the instruction set every CPU library in PyTorch is held to at once: ATen's vectorized kernels
(``ATEN_CPU_CAPABILITY``), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's BLAS
(``MKL_ENABLE_INSTRUCTIONS``); each picks its own by default, so a path sets all three.

    python scripts/kernel_paths.py list                  # the paths this CPU supports
    python scripts/kernel_paths.py test [pytest args]    # the equivalence tests under each path (make test-kernels)
    python scripts/kernel_paths.py measure --paths avx2 --offsets 0 1 2   # record errors (tests/numerics_record.py)
    python scripts/kernel_paths.py table                 # the margin table from the recorded runs

``measure`` writes one ``raw/<path>-seed<offset>-<tag>.jsonl`` per run under ``--out`` and skips runs already there, so
it can be done in chunks; ``table`` writes ``results.json`` and ``results.md`` beside them."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "benchmarks" / "cpu-tolerances"

#: path -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS); "default" is ATen's scalar kernels
PATHS = {
    "default": ("default", "SSE41", "SSE4_2"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE", "AVX512"),
}

#: the test files whose tests compare two computations against a tolerance (tests/numerics_record.py records them)
NUMERIC_TESTS = [
    "tests/test_core.py", "tests/test_rules.py", "tests/test_algorithms.py", "tests/test_baselines.py",
    "tests/test_per_sample.py", "tests/test_example.py", "tests/test_imaml_protocol.py",
    "tests/test_reptile_protocol.py", "tests/test_maml_protocol.py", "tests/test_mamlpp_protocol.py",
    "tests/test_protonets_protocol.py", "tests/test_training.py", "tests/test_distributed.py",
    "tests/test_reproduce.py", "tests/test_sweep.py", "tests/test_tensorboard.py",
]

#: the in-process equivalence tests `make test-kernels` runs under every path (the CLI ones start subprocesses
#: that inherit the path, but take minutes each; `measure` covers them)
EQUIVALENCE_TESTS = NUMERIC_TESTS[:11]


def supported_paths() -> list[str]:
    """The kernel paths this CPU runs: ``default`` always, then ``avx2`` and ``avx512`` as far as torch detects."""
    import torch

    best = torch.backends.cpu.get_cpu_capability().lower()  # DEFAULT, AVX2, AVX512 (x86) or e.g. SVE256 (arm)
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best in order else ["default"]


def path_env(path: str) -> dict[str, str]:
    """The environment variables that hold every CPU library to ``path``."""
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; known: {', '.join(PATHS)}")
    aten, onednn, mkl = PATHS[path]
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl,
            "META_KERNEL_PATH": path}


def run_tests(paths: list[str], pytest_args: list[str]) -> int:
    """Run pytest once per path; the exit status is the first failing run's, or 0."""
    status = 0
    for path in paths:
        print(f"== kernel path {path}: {' '.join(f'{k}={v}' for k, v in path_env(path).items())}", flush=True)
        code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO,
                               env={**os.environ, **path_env(path)})
        status = status or code
    return status


def measure(out: Path, paths: list[str], offsets: list[int], tests: list[str], extra: list[str], tag: str) -> None:
    """One recorded pytest run per (path, seed offset) not yet in ``out/raw`` (named with ``tag``, the group of
    tests); its failures and summary line go to a ``.log`` beside it."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for offset in offsets:
            target = raw / f"{path}-seed{offset}-{tag}.jsonl"
            if target.exists():
                print(f"skip {target.name} (exists)", flush=True)
                continue
            partial = target.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            env = {**os.environ, **path_env(path), "META_RECORD_TOLERANCES": str(partial),
                   "META_TEST_SEED_OFFSET": str(offset)}
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                   *extra, *tests], cwd=REPO, env=env, capture_output=True, text=True)
            summary = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
            summary.append(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
            target.with_suffix(".log").write_text("\n".join(summary) + "\n")
            partial.touch()
            partial.rename(target)
            print(f"{target.name}: {summary[-1]}", flush=True)


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, best capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"


def table(out: Path) -> dict:
    """Worst ``used`` (error / tolerance) per test function and comparison site over every recorded run (every
    parametrization and path and seed); writes results.json and results.md."""
    rows = [json.loads(line) for f in sorted((out / "raw").glob("*.jsonl")) for line in f.read_text().splitlines()]
    sites: dict[tuple[str, ...], dict] = {}
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for r in rows:
        key = (r["test"].split("[")[0], r["site"], r["kind"], r["check"])
        counts[key] += 1
        if key not in sites or r["used"] > sites[key]["used"]:
            sites[key] = r
    runs = sorted({(r["path"], r["seed_offset"]) for r in rows})
    failures = {f.stem: f.read_text().strip().splitlines() for f in sorted((out / "raw").glob("*.log"))}
    result = {"machine": _machine(), "runs": [f"{p}-seed{o}" for p, o in runs], "outcomes": failures,
              "sites": [{**sites[k], "comparisons": counts[k],
                         "margin": (1 / sites[k]["used"]) if sites[k]["used"] > 0 else None}
                        for k in sorted(sites, key=lambda k: (-sites[k]["used"], k))]}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(result))
    return result


def _fmt(x: float | None) -> str:
    return "exact" if x is None else f"{x:.1e}" if x < 1e4 else ">1e4" if x < float("inf") else "inf"


def _rows(sites: list[dict]) -> list[str]:
    rows = ["| test | site | check | tolerance | worst error | used | margin | path | seed | comparisons |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sites:
        name = s["test"].split("::", 1)[-1].split("[")[0]
        rows.append(f"| `{name}` | {s['site']} | {s['check']} | {s['tolerance']} | "
                    f"{s['error']:.2e} | {s['used']:.1e} | {_fmt(s['margin'])} | {s['path']} | {s['seed_offset']} | "
                    f"{s['comparisons']} |")
    return rows


def _markdown(result: dict) -> str:
    within = [s for s in result["sites"] if s["kind"] in ("tolerance", "exact")]
    apart = [s for s in result["sites"] if s["kind"] == "separation"]
    thin = [s for s in within if s["used"] > 1e-2]
    lines = ["# Tolerance margins of the numerical tests, across CPU kernel paths and seeds\n",
             f"Machine: {result['machine']}.\n",
             f"Runs (kernel path - seed offset - tests): {', '.join(result['outcomes'])}. Outcomes:\n",
             *[f"- {k}: {'; '.join(v) if v else '?'}" for k, v in result["outcomes"].items()],
             "",
             "Written by `python scripts/kernel_paths.py table` from the records in `raw/` (`measure`, "
             "tests/numerics_record.py; see docs/numerics.md). One row per test function and comparison line, "
             "the worst over its parametrizations, kernel paths and seeds; `used` = error / tolerance (elementwise "
             "checks: the largest `|a - b| / (atol + rtol |b|)`; errors are absolute there and relative for "
             "`relative_error`), `margin` = 1 / used, `path` and `seed` the run of the worst.\n",
             f"## Within a tolerance: {len(within)} comparison lines, {len(thin)} with a margin under 100\n",
             *_rows(within),
             "",
             f"## Must differ by more than a bound: {len(apart)} comparison lines\n",
             "`used` = bound / difference: these assert that a switch changes the result by far more than "
             "rounding could, so their margin is against the bound, while rounding is ~1e-15.\n",
             *_rows(apart)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the kernel paths this CPU supports")
    test = sub.add_parser("test", help="run the equivalence tests (or the given pytest arguments) under each path")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    m = sub.add_parser("measure", help="recorded runs, one per path and seed offset")
    m.add_argument("--paths", nargs="+", default=None)
    m.add_argument("--offsets", nargs="+", type=int, default=[0])
    m.add_argument("--tests", nargs="+", default=NUMERIC_TESTS)
    m.add_argument("--tag", default="numeric", help="names the group of tests in the raw files' names")
    m.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[])
    m.add_argument("--out", type=Path, default=DEFAULT_OUT)
    t = sub.add_parser("table", help="write results.json and results.md from the recorded runs")
    t.add_argument("--out", type=Path, default=DEFAULT_OUT)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"] and not {"-h", "--help"} & set(argv[1:2]):  # everything after "test" goes to pytest
        return run_tests(supported_paths(), argv[1:] or ["-q", "-x", "-m", "not slow", *EQUIVALENCE_TESTS])
    args = parser.parse_args(argv)
    if args.command == "list":
        print(" ".join(supported_paths()))
    elif args.command == "measure":
        measure(args.out, args.paths or supported_paths(), args.offsets, args.tests, args.pytest_args, args.tag)
    else:
        result = table(args.out)
        print(f"{len(result['sites'])} comparison sites; worst: {result['sites'][0] if result['sites'] else None}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
