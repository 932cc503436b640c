"""Writer `mp4`: H.264 in MP4 via PyAV (yuv420p, constant quality CRF, 30 fps).

Each section is its own segment file; ``join`` copies their packets into
one MP4 without re-encoding (framepack.output.segments).

Every x264 setting but ``crf`` and ``preset`` is fixed, so all segments of
a job (and of a resumed job) share one set of codec parameters. The fixed
ones are chosen to play everywhere, dark scenes included:

- ``profile=high``, ``yuv420p``: what every hardware decoder plays. The
  original first shipped ``crf = 0``; x264 can only write lossless as the
  High 4:4:4 Predictive profile, which Windows Media Player, QuickTime and
  Firefox show as a black clip (lllyasviel/FramePack pull 49). ``crf = 0``
  is therefore refused; the ``png`` writer is the lossless output.
- ``aq-mode=3``: adaptive quantisation biased towards dark scenes, so
  near-black gradients keep their bits instead of turning into blocks.
- BT.709 limited-range colour tags, and the RGB -> YUV conversion done with
  those coefficients (framepack.output.segments), so players neither crush nor
  lift the blacks.
- ``+faststart`` on the joined file: the index goes first, so playback
  starts before a download ends.
- The same frames give the same bytes on any machine, so a resumed job's
  video is exactly an uninterrupted one's. x264's output depends on its
  thread setup, and PyAV's default (slice threads, one per CPU, capped by
  the height) made it follow the core count: 640x608 on 1 vs 2 CPUs
  decoded to pixels up to 130 levels apart. So ``threads=4`` frame threads,
  a fixed count (for a given count, frame threads give the same output on
  every run, x264's ``deterministic`` default; slices would cost ~4% in
  size at the same crf), and ``cpu-independent=1``, which turns off the
  intra search x264 has only for some CPUs (SSSE3 and up encoded other
  bytes than SSE2 or plain C).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from framepack.backends import WriterBackend
from framepack.errors import ConfigError
from framepack.hookspecs import hookimpl
from framepack.output.segments import VideoSegmentWriter, remux_join

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
FIXED = {"profile": "high", "x264-params": "aq-mode=3:threads=4:sliced-threads=0:cpu-independent=1"}


@dataclass(frozen=True)
class Mp4Options:
    crf: int = 16  # the original's final default; 1 (best) to 51
    preset: str = "medium"  # x264 speed/size trade-off

    def __post_init__(self) -> None:
        where = "writer mp4 options"
        if self.crf == 0:
            raise ConfigError(
                f"{where}: crf 0 is lossless, which x264 writes only as High 4:4:4 Predictive, a profile many "
                "players (Windows Media Player, QuickTime, Firefox) show as a black clip; use crf 1 or more, "
                "or the png writer for lossless frames"
            )
        if not 1 <= self.crf <= 51:
            raise ConfigError(f"{where}: crf {self.crf} must be between 1 (best) and 51")
        if self.preset not in PRESETS:
            raise ConfigError(f"{where}: preset '{self.preset}' is not one of {', '.join(PRESETS)}")


def codec_options(options: Mp4Options) -> dict[str, str]:
    """The libx264 settings; identical for every segment of a job."""
    return {"crf": str(options.crf), "preset": options.preset, **FIXED}


def open_segment(path: Path, fps: int, width: int, height: int, options: Mp4Options) -> VideoSegmentWriter:
    return VideoSegmentWriter(path, "mp4", "libx264", fps, width, height, codec_options(options))


def join(segments: list[Path], out: Path, options: Mp4Options, metadata: dict[str, str]) -> None:
    remux_join(segments, out, "mp4", metadata, {"movflags": "+faststart"})


@hookimpl
def framepack_register_writers(register):
    register(
        WriterBackend(
            name="mp4",
            suffix=".mp4",
            open=open_segment,
            join=join,
            options=Mp4Options,
            description="H.264 MP4 (yuv420p, CRF), playable everywhere",
        )
    )
