"""Every ``docs/*.md`` page that the engine's or the plugins' code names (in an
error message, a docstring, a comment) exists, so a pointer in a message never
leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = re.compile(r"\bdocs/[\w./-]+?\.md\b")


def doc_mentions() -> dict[str, list[str]]:
    """-> docs path -> the 'file:line' places that name it."""
    found: dict[str, list[str]] = {}
    for folder in ("framepack", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for doc in DOC_PATH.findall(line):
                    found.setdefault(doc, []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_the_scan_finds_the_pages_the_code_names():
    mentions = doc_mentions()
    assert "docs/models.md" in mentions  # the incomplete-model-folder error (framepack/models/sources.py)
    assert any(place.startswith("framepack/models/sources.py:") for place in mentions["docs/models.md"])


def test_every_docs_page_named_in_the_code_exists():
    missing = {doc: places for doc, places in doc_mentions().items() if not (ROOT / doc).is_file()}
    assert not missing, f"pages named in the code but not in docs/: {missing}"
