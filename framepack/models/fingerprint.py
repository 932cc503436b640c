"""Identify model files cheaply: what changed weights must change.

Local folders: each file's relative name, size and modification time (stat
only: hashing 30 GB per run would cost more than it protects). Hub repos:
the snapshot commit of the locally cached files. A part whose files are not
available locally yet has no fingerprint (None).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def folder_identity(folder: Path) -> list:
    return sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )


def part_identity(source, part: str):
    where, sub = source.location(part)
    if source.root is not None:
        folder = Path(where) / (sub or "")
        return [part, folder_identity(folder)] if folder.is_dir() else None
    from huggingface_hub import try_to_load_from_cache

    probe = "tokenizer_config.json" if part.startswith("tokenizer") else (
        "preprocessor_config.json" if part == "feature_extractor" else "config.json")
    cached = try_to_load_from_cache(where, f"{sub}/{probe}" if sub else probe)
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached).parent.parent if sub else Path(cached).parent  # .../snapshots/<commit>
    return [part, where, snapshot.name]


def fingerprint(source, parts, *extra) -> str | None:
    """sha256 over the parts' identities and anything else that matters
    (dtypes, weight formats, recipe versions); None if a part is unknown."""
    identities = []
    for part in parts:
        identity = part_identity(source, part)
        if identity is None:
            return None
        identities.append(identity)
    blob = json.dumps([identities, [str(e) for e in extra]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
