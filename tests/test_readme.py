"""The README's ten-line API example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import has_omniglot

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not has_omniglot(), reason="Omniglot is not under the data root (set META_DATA_ROOT)")
def test_readme_api_example_runs(capsys):
    example = re.search(r"## Ten lines of API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len([line for line in example.splitlines() if line.strip()]) <= 11
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.loss.shape == (32,) and result.accuracy.shape == (32,)
    assert set(result.grads) == set(dict(namespace["model"].named_parameters()))
    assert "tensor" in capsys.readouterr().out
