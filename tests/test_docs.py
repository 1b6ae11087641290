"""docs/: the generated configuration reference matches the config it is generated from."""

from __future__ import annotations

from pathlib import Path

from meta.training.cli_help import config_keys, config_markdown

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def test_configuration_reference_is_generated_from_the_config():
    text = (DOCS / "configuration.md").read_text()
    assert text == config_markdown(), (
        "docs/configuration.md differs from the config it documents; regenerate it with "
        "`python -m meta.training.cli_help --markdown > docs/configuration.md`")
    for key, _kind, _meaning in config_keys():
        assert f"| `{key}` |" in text
