"""Every protocol citation points at something a user of the repository has: each ``docs/protocols.md#anchor`` in
the presets, table specs, experiment notes, code and tests names a section of docs/protocols.md, and nothing cites
the notes file the presets used to cite (not in the repository)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = REPO / "docs" / "protocols.md"
CITATION = re.compile(r"docs/protocols\.md#([A-Za-z0-9_-]+)")
#: the files that cite protocols: presets, table specs, experiment notes, docs, code and tests. Run records
#: (results.json, the config.yaml a run saved, metrics) are left as written: they record what a run was given.
CITING_GLOBS = ("configs/*.yaml", "experiments/tables/*.yaml", "experiments/*/README.md", "docs/*.md", "README.md",
                "meta/**/*.py", "scripts/*.py", "tests/*.py")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file: explicit ``<a id="...">`` ones and GitHub's heading slugs."""
    explicit = set(re.findall(r'<a id="([^"]+)"></a>', text))
    slugs = {re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
             for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    return explicit | slugs


def citing_files() -> list[Path]:
    files = {p for pattern in CITING_GLOBS for p in REPO.glob(pattern) if p.is_file()}
    return sorted(p for p in files if p.name != Path(__file__).name)


def test_anchors_reads_explicit_ids_and_heading_slugs():
    assert anchors('<a id="maml-task-pool"></a>\n## MAML (Finn et al.)\n') == {"maml-task-pool", "maml-finn-et-al"}


def test_the_protocol_reference_has_a_section_per_paper():
    found = anchors(PROTOCOLS.read_text())
    papers = {"maml", "fomaml", "reptile", "meta-sgd", "anil", "mamlpp", "imaml", "protonets", "meta-curvature",
              "mnist"}
    assert papers <= found, sorted(papers - found)


@pytest.mark.parametrize("path", citing_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_cited_protocol_anchor_exists(path: Path):
    found = anchors(PROTOCOLS.read_text())
    cited = set(CITATION.findall(path.read_text()))
    assert cited <= found, f"{path.relative_to(REPO)} cites docs/protocols.md#{sorted(cited - found)}, not a section"


@pytest.mark.parametrize("path", citing_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_cites_a_notes_file_outside_the_repository(path: Path):
    text = path.read_text()
    assert "papers.md" not in text, f"{path.relative_to(REPO)} cites papers.md, which is not in the repository"
    assert "shared/reference" not in text, f"{path.relative_to(REPO)} cites a path outside the repository"


def test_the_presets_and_specs_cite_the_protocol_reference():
    cited = set()
    for path in [*REPO.glob("configs/*.yaml"), *REPO.glob("experiments/tables/*.yaml")]:
        cited |= set(CITATION.findall(path.read_text()))
    assert {"maml", "fomaml", "reptile", "meta-sgd", "anil", "mamlpp", "imaml", "protonets", "mnist"} <= cited
