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


def check_output_path(path: Path, what: str = "output", folder_ok: bool = False) -> Path:
    """Refuse outputs we cannot write before spending minutes on a video.

    The folder is tried for real (a hidden file created and removed): the
    permission bits say nothing for root, a read-only mount or /proc.
    ``folder_ok``: an existing folder is fine (a png writer's output, which
    framepack.output.outputs checks further)."""
    from framepack.errors import UserError

    path = Path(path).expanduser()
    if path.exists() and path.is_dir() and not folder_ok:
        raise UserError(f"{what} {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{what} folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{what} folder {parent} is not a folder")
    check_writable_folder(parent, what)
    return path


def check_writable_folder(folder: Path, what: str = "output") -> None:
    from framepack.errors import UserError

    probe = folder / f".framepack-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} folder {folder} is not writable ({exc.strerror})") from None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_overlap(outputs: dict[str, Path], inputs: dict[str, Path], folders: dict[str, Path] = {}) -> None:
    """No output of a job may be, or contain, an input of that job, nor lie
    inside one of its folders (the model, the job folder): writing it would
    destroy what the job reads.

    Each dict maps a label for the message (e.g. "--preview", "the image")
    to a path; symlinks are followed."""
    from framepack.errors import UserError

    def real(p) -> Path:
        return Path(p).expanduser().resolve()

    reads = [(label, p, real(p), False) for label, p in inputs.items() if p is not None]
    reads += [(label, p, real(p), True) for label, p in folders.items() if p is not None]
    for out_label, out in outputs.items():
        if out is None:
            continue
        o = real(out)
        for in_label, given, i, tree in reads:
            if _within(i, o) or ((tree or i.is_dir()) and _within(o, i)):
                relation = "is" if o == i else ("contains" if _within(i, o) else "is inside")
                raise UserError(f"{out_label} {out} {relation} {in_label} {given}; "
                                "a job never writes over what it reads: pick another path")
