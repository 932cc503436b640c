"""The package is grouped by concern, and each subpackage imports only the
ones below it, so a module's place says what it may depend on.

Bottom to top: the shared modules at the top level (errors, notes, events,
hardware, backends, hookspecs), then models, attention, caching, output,
engine, pipeline, ui (the web UI, a client of the service's HTTP API), then
the public API (framepack.api, a module), then the render service, its
client; the CLI sits above everything."""

from __future__ import annotations

import ast
from pathlib import Path

import framepack

PACKAGE = Path(framepack.__file__).parent
LAYERS = ["models", "attention", "caching", "output", "engine", "pipeline", "ui", "api", "service"]
BASE = {"errors", "notes", "events", "hardware", "backends", "hookspecs", "__init__"}
TOP = {"cli", "__main__"}


def imported_modules(path: Path) -> set[str]:
    """framepack modules a file imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("framepack"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("framepack."))
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "framepack" or len(parts) == 1:
        return -1
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if parts[1] in BASE:
        return -1
    if parts[1] in TOP:
        return len(LAYERS)
    raise AssertionError(f"{module}: not in any layer; add it to tests/test_layout.py")


def test_each_subpackage_imports_only_what_is_below_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        me = ".".join(rel.parts).removesuffix(".__init__")
        mine = rank(me)
        for module in imported_modules(path):
            if module == "framepack":
                continue  # __version__
            theirs = rank(module)
            if theirs > mine or (mine == -1 and theirs >= 0 and me.split(".")[1] != "__init__"):
                upward.append(f"{me} imports {module}")
    assert upward == []


def test_the_top_level_stays_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 11, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} >= set(LAYERS) - {"api"}
