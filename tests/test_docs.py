"""Citations of the repository's documents resolve, and nothing cites a document outside it.

Comments and docstrings cite ``docs/<file>.md §n`` (a section headed ``## n. …``) or
``docs/<file>.md, '<heading>'`` (a heading of that file, single or double quotes). docs/protocol.md's
table of the search spaces' starting points is checked against ``search_spaces/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SCANNED = ("fairtune", "tests", "benchmarks", "search_spaces", "docs")
SCANNED_FILES = ("README.md", "Makefile")
SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}

SECTION_CITATION = re.compile(r"docs/([\w.-]+\.md) §(\d+)")
# A quoted heading may wrap onto the next comment or docstring line: whitespace, and a leading "#",
# between its words are folded to one space before it is compared.
HEADING_CITATION = re.compile(r"docs/([\w.-]+\.md), (?:'([^'\n]+)'|\"([^\"]{1,200})\")")
# Documents that live outside the repository: a maintainer who clones it cannot follow these.
OUTSIDE_CITATIONS = re.compile(r"\bSPEC\b|RAY-NOTES|PERFORMANCE\.md")


def scanned_files() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES if (REPO / name).is_file()]
    for folder in SCANNED:
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    this = Path(__file__).resolve()
    return sorted(p for p in files if p.resolve() != this and "__pycache__" not in p.parts)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def citations(pattern: re.Pattern) -> list[tuple[str, re.Match]]:
    found = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [(f"{path.relative_to(REPO)}:{line_of(text, m.start())}", m) for m in pattern.finditer(text)]
    return found


def headings(doc: Path) -> list[str]:
    """The document's Markdown headings (outside fenced code blocks), as written after the #s."""
    found, fenced = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} +(.+?) *$", line)):
            found.append(match.group(1))
    return found


def test_section_citations_name_an_existing_file_and_section():
    found = citations(SECTION_CITATION)
    assert len(found) >= 20, "expected the code's docs/protocol.md §n citations; did the pattern rot?"
    broken = []
    for where, match in found:
        doc, number = DOCS / match.group(1), match.group(2)
        if not doc.is_file():
            broken.append(f"{where}: {match.group(0)} (no {doc.relative_to(REPO)})")
        elif not re.search(rf"^## {number}\.\s", doc.read_text(encoding="utf-8"), re.MULTILINE):
            broken.append(f"{where}: {match.group(0)} (no '## {number}.' section)")
    assert not broken, "citations that resolve to nothing:\n" + "\n".join(broken)


def test_heading_citations_name_an_existing_heading():
    found = citations(HEADING_CITATION)
    assert any(m.group(1) == "ray.md" for _, m in found), "expected docs/ray.md, '<heading>' citations"
    broken = []
    for where, match in found:
        doc = DOCS / match.group(1)
        heading = re.sub(r"\s*\n\s*(?:#\s*)?", " ", match.group(2) or match.group(3)).strip()
        if not doc.is_file():
            broken.append(f"{where}: {match.group(0)!r} (no {doc.relative_to(REPO)})")
        elif heading not in headings(doc):
            broken.append(f"{where}: heading {heading!r} is not in {doc.relative_to(REPO)}")
    assert not broken, "citations that resolve to nothing:\n" + "\n".join(broken)


def test_nothing_cites_a_document_outside_the_repository():
    found = [f"{where}: {m.group(0)}" for where, m in citations(OUTSIDE_CITATIONS)]
    assert not found, "cite docs/protocol.md, docs/ray.md or docs/performance.md instead:\n" + "\n".join(found)


def protocol_table_rows() -> dict[str, list[str]]:
    """docs/protocol.md's starting-points table: method -> its cells after the method's name."""
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    start = text.index("Starting points now")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        match = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_protocol_states_the_search_spaces_as_configured():
    from fairtune.hyperparameters import HYPERPARAMETERS
    from fairtune.spaces import load_space

    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    T, lam = HYPERPARAMETERS["T"], HYPERPARAMETERS["lam"]
    assert f"T ∈ {{{', '.join(f'{v:g}' for v in T.values)}}}" in text
    assert (lam.low, lam.high) == (1e-4, 1e2) and "λ log-uniform in [1e-4, 1e2]" in text
    rows = protocol_table_rows()
    shipped = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml") if load_space(p.stem).parameter)
    assert sorted(rows) == shipped
    for method, (parameter, *values) in rows.items():
        space = load_space(method)
        assert parameter == {"T": "T", "lam": "λ"}[space.parameter], method
        *paper, default = values
        for dataset, cell in zip(("cifar10s", "utkface", "celeba"), paper):
            expected = space.paper.get(dataset)
            assert (None if cell == "—" else float(cell)) == (None if expected is None else pytest.approx(expected)), (method, dataset)
        assert float(default) == pytest.approx(space.default), method
