"""Writer `png`: a folder of numbered PNG frames (``000000.png`` ...) and a
``metadata.json``, lossless, for editing tools and frame-exact work.

Each section's frames go to a segment folder; ``join`` links them under
playback numbers into a new folder and renames that into place, so the
output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framepack.backends import WriterBackend
from framepack.errors import ConfigError, FramepackError
from framepack.hookspecs import hookimpl
from framepack.output.segments import check_frames, write_json_atomic
from framepack.output.writing import partial_path

FRAME_NAME = "{:06d}.png"


@dataclass(frozen=True)
class PngOptions:
    compress_level: int = 4  # zlib level: 0 none, 1 fastest, 9 smallest; pixels are lossless at any level

    def __post_init__(self) -> None:
        if not 0 <= self.compress_level <= 9:
            raise ConfigError(f"writer png options: compress_level {self.compress_level} must be between 0 and 9")


class PngSegmentWriter:
    """One segment: a folder of PNGs, built under a hidden name."""

    def __init__(self, path: Path, fps: int, width: int, height: int, options: PngOptions) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        self.options = options
        self.frames_written = 0
        self._tmp = partial_path(self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()

    def write(self, frames: np.ndarray) -> None:
        # frames: (T, H, W, 3) uint8, playback order
        from PIL import Image

        check_frames(frames, self.width, self.height)
        for frame in frames:
            name = self._tmp / FRAME_NAME.format(self.frames_written)
            Image.fromarray(np.ascontiguousarray(frame), "RGB").save(name, compress_level=self.options.compress_level)
            self.frames_written += 1

    def close(self) -> None:
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def join(segments: list[Path], out: Path, options: PngOptions, metadata: dict[str, str]) -> None:
    """Number the segments' frames in playback order into the folder ``out``.

    Frames are hard-linked (copied where the file system cannot link), so
    the segments stay intact until the engine removes them and a failed
    join can simply run again.
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FramepackError(f"cannot write the frame folder {out}: it already exists; move it away or pick another output")
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n = 0
        for segment in segments:
            for frame in sorted(Path(segment).glob("*.png")):
                _link_or_copy(frame, tmp / FRAME_NAME.format(n))
                n += 1
        write_json_atomic(tmp / "metadata.json", _record(metadata))
        os.replace(tmp, out)  # an empty folder already at out is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _record(metadata: dict[str, str]) -> dict:
    """The job's record when the tags carry it (framepack.output.metadata), else the tags themselves."""
    from framepack.output.metadata import JSON_TAG

    try:
        return json.loads(metadata[JSON_TAG])
    except (KeyError, json.JSONDecodeError):
        return dict(metadata)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@hookimpl
def framepack_register_writers(register):
    register(
        WriterBackend(
            name="png",
            suffix="",
            open=lambda path, fps, width, height, options: PngSegmentWriter(path, fps, width, height, options),
            join=join,
            options=PngOptions,
            description="folder of numbered PNG frames plus metadata.json (lossless)",
        )
    )
