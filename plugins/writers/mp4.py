"""Writer `mp4`: H.264 in MP4 via PyAV (yuv420p, constant quality CRF, 30 fps)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from framepack.backends import WriterBackend
from framepack.hookspecs import hookimpl
from framepack.writing import partial_path


@dataclass(frozen=True)
class Mp4Options:
    crf: int = 16  # the original's default; lower is better quality, 0 is lossless
    preset: str = "medium"  # x264 speed/size trade-off


class Mp4Writer:
    def __init__(self, path: Path, fps: int, width: int, height: int, options: Mp4Options) -> None:
        import av  # lazily: only jobs that write video need FFmpeg

        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self._tmp = partial_path(self.path)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(options.crf), "preset": options.preset}
        self._av = av
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        # frames: (T, H, W, 3) uint8
        for frame in frames:
            video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        for packet in self._stream.encode():  # flush the encoder
            self._container.mux(packet)
        self._container.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # closing a broken container may fail; the file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)


@hookimpl
def framepack_register_writers(register):
    register(
        WriterBackend(
            name="mp4",
            suffix=".mp4",
            open=lambda path, fps, width, height, options: Mp4Writer(path, fps, width, height, options),
            options=Mp4Options,
            description="H.264 MP4 (yuv420p, CRF), playable everywhere",
        )
    )
