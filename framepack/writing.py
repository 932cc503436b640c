"""The writer contract and the atomic-file helper every writer uses.

A frame writer gets final uint8 frames in playback order and writes them to
a temporary name beside the target; ``close`` renames it into place,
``abort`` removes it. A crash therefore never leaves a half-written file
under the name the user asked for. The engine opens one per segment (a
section's finished frames) and the backend's ``join`` combines finished
segments into the output without re-encoding (see framepack.backends).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np


class FrameWriter(Protocol):
    path: Path

    def write(self, frames: np.ndarray) -> None:  # (T, H, W, 3) uint8
        ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def partial_path(path: Path) -> Path:
    """Hidden temporary name in the same folder, so the final rename is atomic."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def check_output_path(path: Path) -> Path:
    """Refuse outputs we cannot write before spending minutes on a video."""
    from framepack.errors import UserError

    path = Path(path).expanduser()
    if path.exists() and path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable")
    return path
