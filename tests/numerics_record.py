"""Opt-in record of every numerical comparison the tests make, for the tolerance-margin table.

With ``META_RECORD_TOLERANCES=<file>``, each comparison a test makes against a tolerance appends one JSON line to
``<file>``: the test id, the comparison's site (``tests/file.py:line``), its kind, the tolerance, the error seen and
``used`` = error / tolerance (its margin is ``1 / used``). Recorded: ``relative_error(...) < tol`` (and ``> bound``,
``== 0``) for every test module's ``relative_error``, ``torch.allclose``, ``torch.testing.assert_close``,
``numpy.testing.assert_allclose`` and ``pytest.approx``, when called from a file under ``tests/``.
Kinds: ``tolerance`` (must be within), ``exact`` (tolerance zero), ``separation`` (must differ by more than a bound:
``used`` = bound / difference). ``META_TEST_SEED_OFFSET=<n>`` adds ``n`` to every seed the tests give
``torch.Generator.manual_seed`` and ``torch.manual_seed``, to measure the same comparisons on other draws.
``experiments/benchmarks/tolerances.py`` runs the tests this way under each kernel path and writes the table.
Nothing here changes a result: with neither variable set, ``install`` is never called."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

RECORD_ENV = "META_RECORD_TOLERANCES"
SEED_ENV = "META_TEST_SEED_OFFSET"
PATH_ENV = "META_KERNEL_PATH"  # the label the runner gives the kernel path (else torch's CPU capability)
TESTS = Path(__file__).resolve().parent
_HERE = str(Path(__file__).resolve())


def _site() -> str | None:
    """``tests/<file>:<line>`` of the innermost caller frame in a test file, or None outside tests."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != _HERE and name.startswith(str(TESTS)):
            return f"tests/{Path(name).relative_to(TESTS)}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _write(check: str, kind: str, tolerance: str, error: float, used: float, site: str | None) -> None:
    if site is None:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    row = {"test": test, "site": site, "check": check, "kind": kind, "tolerance": tolerance, "error": error,
           "used": used, "path": os.environ.get(PATH_ENV) or torch.backends.cpu.get_cpu_capability().lower(),
           "seed_offset": int(os.environ.get(SEED_ENV, "0"))}
    with open(os.environ[RECORD_ENV], "a") as f:
        f.write(json.dumps(row) + "\n")


class Measured(float):
    """A ``relative_error`` value that records the comparison it takes part in."""

    def _record(self, kind: str, bound: float) -> None:
        err, bound = float(self), float(bound)
        if kind == "separation":
            used = bound / err if err > 0 else float("inf")
        else:
            used = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        _write("relative_error", kind, f"{bound:g}", err, used, _site())

    def __lt__(self, other):
        self._record("tolerance", other)
        return float(self) < other

    def __le__(self, other):
        self._record("tolerance" if other else "exact", other)
        return float(self) <= other

    def __gt__(self, other):
        self._record("separation", other)
        return float(self) > other

    def __ge__(self, other):
        self._record("separation", other)
        return float(self) >= other

    def __eq__(self, other):
        if other == 0:
            self._record("exact", 0.0)
        return float(self) == other

    __hash__ = float.__hash__


def _measured(fn: Callable[..., float]) -> Callable[..., float]:
    def wrapper(*args, **kwargs):
        return Measured(fn(*args, **kwargs))

    wrapper.__wrapped__ = fn
    return wrapper


def _elementwise_used(actual, expected, rtol: float, atol: float) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / (atol + rtol |b|)) over the entries, in float64."""
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).detach()
    b = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected).detach()
    a, b = a.cpu().double(), b.cpu().double()
    a, b = torch.broadcast_tensors(a, b)
    diff = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan | (a == b), torch.zeros_like(diff), diff)
    if diff.numel() == 0:
        return 0.0, 0.0
    bound = atol + rtol * b.abs()
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / bound)
    return float(diff.max()), float(ratio.max())


def _record_close(check: str, actual, expected, rtol: float, atol: float, passed: bool, site: str | None) -> None:
    if site is None:
        return
    try:
        error, ratio = _elementwise_used(actual, expected, rtol, atol)
    except (TypeError, ValueError, RuntimeError):
        return
    tolerance = f"rtol={rtol:g} atol={atol:g}"
    if passed:
        kind = "tolerance" if rtol or atol else "exact"
        _write(check, kind, tolerance, error, ratio, site)
    else:  # a False allclose in a test that passes is an assertion that two things differ
        _write(check, "separation", tolerance, error, 1 / ratio if ratio > 0 else float("inf"), site)


def _install_close_wrappers() -> None:
    allclose = torch.allclose

    def recording_allclose(input, other, rtol=1e-05, atol=1e-08, equal_nan=False):
        result = allclose(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)
        _record_close("torch.allclose", input, other, rtol, atol, result, _site())
        return result

    assert_close = torch.testing.assert_close

    def recording_assert_close(actual, expected, *args, rtol=None, atol=None, **kwargs):
        site = _site()
        if rtol is None and atol is None and isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
            from torch.testing._comparison import default_tolerances

            rtol, atol = default_tolerances(actual, expected)
        try:
            assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)
        except AssertionError:
            _record_close("assert_close", actual, expected, rtol or 0.0, atol or 0.0, True, site)
            raise
        _record_close("assert_close", actual, expected, rtol or 0.0, atol or 0.0, True, site)

    np_assert_allclose = np.testing.assert_allclose

    def recording_np_allclose(actual, desired, rtol=1e-07, atol=0, *args, **kwargs):
        site = _site()
        np_assert_allclose(actual, desired, rtol, atol, *args, **kwargs)
        _record_close("np.assert_allclose", actual, desired, rtol, atol, True, site)

    torch.allclose = recording_allclose
    torch.testing.assert_close = recording_assert_close
    np.testing.assert_allclose = recording_np_allclose


def _install_approx_wrapper() -> None:
    scalar = pytest.approx(1.0).__class__
    original_eq = scalar.__eq__

    def recording_eq(self, actual: Any) -> bool:
        result = original_eq(self, actual)
        if result:  # a False match is often a search (``x in list``), not an assertion
            try:
                error, tolerance = float(abs(self.expected - actual)), float(self.tolerance)
            except (TypeError, ValueError):
                return result
            used = error / tolerance if tolerance > 0 else 0.0
            _write("pytest.approx", "tolerance", f"{tolerance:g}", error, used, _site())
        return result

    scalar.__eq__ = recording_eq


def _install_seed_offset(offset: int) -> None:
    base = torch.Generator

    class OffsetGenerator(base):
        """torch.Generator whose manual_seed adds the measurement's seed offset."""

        def manual_seed(self, seed):
            return super().manual_seed(int(seed) + offset)

    manual_seed = torch.manual_seed
    torch.Generator = OffsetGenerator
    torch.manual_seed = lambda seed: manual_seed(int(seed) + offset)


def wrap_module(module: Any) -> None:
    """Make ``module.relative_error`` (imported or its own) return values that record their comparisons."""
    fn = getattr(module, "relative_error", None)
    if callable(fn) and not hasattr(fn, "__wrapped__"):
        module.relative_error = _measured(fn)


def install() -> None:
    """Patch the comparison functions (``META_RECORD_TOLERANCES``) and the seeds (``META_TEST_SEED_OFFSET``)."""
    if os.environ.get(RECORD_ENV):
        _install_close_wrappers()
        _install_approx_wrapper()
    offset = int(os.environ.get(SEED_ENV, "0"))
    if offset:
        _install_seed_offset(offset)
