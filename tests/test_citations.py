"""Citations a user can follow: no reference to the project's internal paper files or design notes.

Users of the package see docstrings, option help texts, recipe comments and the docs, never the text
extractions of the papers (``papers/00N``) or the design document (``DESIGN §n``). A paper is cited by its short
title, first author and arXiv id or venue (docs/papers.md lists them), e.g. ``LoRe (Bose et al., arXiv
2504.14439) eq. 10``; a design fact is stated plainly or points at README / CONTRIBUTING.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = re.compile(r"papers/0\d\d|DESIGN §")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".rst", ".cfg"}
SKIPPED_DIRS = {"build", "dist", "__pycache__", ".pytest_cache"}


def _files(path: Path, suffixes: set[str]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes
                  and not any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in p.relative_to(path).parts))


def scanned_files() -> list[Path]:
    return [*_files(ROOT / "plrm", {".py", ".yaml"}), *_files(ROOT / "README.md", TEXT_SUFFIXES),
            *_files(ROOT / "CONTRIBUTING.md", TEXT_SUFFIXES), *_files(ROOT / "docs", TEXT_SUFFIXES),
            *_files(ROOT / "plugins", TEXT_SUFFIXES)]


def test_the_scan_covers_the_package_and_the_docs():
    files = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    assert {"README.md", "CONTRIBUTING.md", "docs/papers.md", "plrm/methods/lore.py",
            "plrm/recipes/quickstart.yaml"} <= files


def test_no_internal_paper_or_design_references():
    offending = [f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}"
                 for path in scanned_files()
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if FORBIDDEN.search(line)]
    assert not offending, (
        f"{len(offending)} line(s) cite papers/00N or DESIGN §n, which users cannot read; cite the paper by short "
        "title, first author and arXiv id (docs/papers.md), or state the design fact plainly:\n" + "\n".join(offending))
