"""Writer `webm`: VP9 in WebM via PyAV (libvpx-vp9, yuv420p, constant quality).

Each section is its own segment file; ``join`` copies their packets into
one WebM without re-encoding (framepack.output.segments). Colour is tagged and
converted as BT.709 limited range, like the mp4 writer.

The same frames give the same bytes on any machine, as with the mp4
writer. libvpx-vp9 encoded identical packets with 1, 2, 8 or 16 threads,
row-mt on or off (it turns off the speed features that would differ);
``threads`` is fixed anyway, so nothing rests on the core count. What
used to differ run to run was the muxer's random SegmentUID, now gone
(``fflags=+bitexact``, framepack.output.segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from framepack.backends import WriterBackend
from framepack.errors import ConfigError
from framepack.hookspecs import hookimpl
from framepack.output.segments import VideoSegmentWriter, remux_join

DEADLINES = ("good", "best", "realtime")


@dataclass(frozen=True)
class WebmOptions:
    crf: int = 30  # constant quality, 0 (best) to 63; libvpx's own suggestion for 480p-720p is 31-33
    deadline: str = "good"  # libvpx speed class: "good", "best" (very slow) or "realtime"
    cpu_used: int = 4  # speed within the deadline: 0 is slowest and best, 8 fastest
    row_mt: bool = True  # encode rows of tiles in parallel

    def __post_init__(self) -> None:
        where = "writer webm options"
        if not 0 <= self.crf <= 63:
            raise ConfigError(f"{where}: crf {self.crf} must be between 0 and 63")
        if self.deadline not in DEADLINES:
            raise ConfigError(f"{where}: deadline '{self.deadline}' is not one of {', '.join(DEADLINES)}")
        if not 0 <= self.cpu_used <= 8:
            raise ConfigError(f"{where}: cpu_used {self.cpu_used} must be between 0 (best) and 8 (fastest)")


def codec_options(options: WebmOptions) -> dict[str, str]:
    """The libvpx-vp9 settings; identical for every segment of a job."""
    return {
        "crf": str(options.crf),
        "b": "0",  # no bitrate target: crf alone sets the quality
        "deadline": options.deadline,
        "cpu-used": str(options.cpu_used),
        "row-mt": "1" if options.row_mt else "0",
        "threads": "8",  # fixed, not one per CPU: see the module docstring
    }


def open_segment(path: Path, fps: int, width: int, height: int, options: WebmOptions) -> VideoSegmentWriter:
    return VideoSegmentWriter(path, "webm", "libvpx-vp9", fps, width, height, codec_options(options))


def join(segments: list[Path], out: Path, options: WebmOptions, metadata: dict[str, str]) -> None:
    remux_join(segments, out, "webm", metadata)


def unavailable_reason(hardware) -> str | None:
    import av

    if "libvpx-vp9" not in av.codecs_available:
        return "this PyAV's FFmpeg has no libvpx-vp9 encoder (the PyPI wheels of av include it)"
    return None


@hookimpl
def framepack_register_writers(register):
    register(
        WriterBackend(
            name="webm",
            suffix=".webm",
            open=open_segment,
            join=join,
            unavailable_reason=unavailable_reason,
            options=WebmOptions,
            description="VP9 WebM (yuv420p, constant quality), smaller files for the web",
        )
    )
