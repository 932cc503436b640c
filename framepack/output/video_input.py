"""Reading a video the user gives (``--extend``): what it is, its frames as
RGB, and its packets copied into a segment without re-encoding.

Frames are decoded one at a time (a long input never sits in RAM) and
converted to RGB with the matrix and range the file declares (BT.709 or
BT.601, limited or full); an untagged file gets what players guess: BT.709
from 720 lines up, BT.601 below, limited range. The conversion asks swscale
for its bit-exact path, so the same file gives the same pixels on every
machine, which a resumed job relies on.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from framepack.errors import UserError
from framepack.output.segments import BITEXACT, _stream_signature
from framepack.output.writing import partial_path


@dataclass(frozen=True)
class VideoProbe:
    path: Path
    frames: int  # video packets: one per frame for every codec framepack reads
    fps: Fraction
    width: int  # as displayed: the stored size turned by ``rotation``
    height: int
    codec: str
    keyframes: tuple[int, ...]  # presentation indices of the frames that start a GOP
    rotation: int = 0  # degrees counterclockwise the player turns the stored frames (0, 90, 180, 270)
    audio: str | None = None  # the first audio stream's codec, when the file has sound

    @property
    def seconds(self) -> float:
        return float(self.frames / self.fps)


def probe_video(path: Path, flag: str | None = "--extend") -> VideoProbe:
    """Count a video's frames and keyframes from its packets (no decoding).
    Anything that is not a readable video is one line naming ``flag`` and the path.
    A job checks its input more than once (preflight, then the job); the same file
    (path, size, mtime) is demuxed once."""
    path = Path(path).expanduser()
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise UserError(f"{where}: no such file" if not path.exists() else f"{where}: not a file")
    stat = path.stat()
    try:
        return _probe(str(path), stat.st_size, stat.st_mtime_ns)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _probe(path: str, size: int, mtime_ns: int) -> VideoProbe:
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError("the file has no video stream")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate
            packets, rotation = [], None
            for packet in container.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue
                packets.append((packet.pts, packet.is_keyframe))
                if rotation is None:  # the display matrix comes with the frames: decode up to the first
                    rotation = next((quarter_turns(f) * 90 for f in packet.decode()), None)
            codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
            audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
    except UserError:
        raise
    except (OSError, av.FFmpegError, ValueError) as exc:
        raise UserError(f"not a video PyAV can read ({exc})") from None
    if not packets or not width or not height or not fps:
        raise UserError("not a video PyAV can read (no frames, size or frame rate)")
    order = sorted(range(len(packets)), key=lambda i: (packets[i][0] is None, packets[i][0] or 0))
    keyframes = tuple(rank for rank, i in enumerate(order) if packets[i][1])
    rotation = rotation or 0
    if rotation in (90, 270):  # a phone's portrait video is stored landscape
        width, height = height, width
    return VideoProbe(path, len(packets), Fraction(fps), width, height, codec, keyframes, rotation, audio)


def quarter_turns(frame) -> int:
    """How many quarter turns counterclockwise the frame's display matrix asks
    for (0-3), as players and ffmpeg's autorotate show it. Mirrored matrices
    are rare and shown unmirrored."""
    return round((frame.rotation or 0) / 90) % 4


# The frame's colour matrix (FFmpeg's AVColorSpace numbers) -> swscale's name for it.
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


def _rgb_converter(frame):
    """Arguments for VideoFrame.reformat that give RGB by the file's own tags."""
    from av.video.reformatter import ColorRange, Colorspace, Interpolation

    guess = "ITU709" if frame.height >= 720 else "ITU601"
    space = Colorspace[_MATRICES.get(int(frame.colorspace), guess)]
    full = int(frame.color_range) == int(ColorRange.JPEG)
    return dict(format="rgb24", src_colorspace=space, src_color_range=ColorRange.JPEG if full else ColorRange.MPEG,
                dst_color_range=ColorRange.JPEG,
                # Chroma taken per pixel from its 2x2 block (what rgb_to_yuv420p averaged), rounded
                # exactly: a framepack frame comes back within 1-2 levels of the RGB it was made from.
                interpolation=Interpolation.POINT | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
                | Interpolation.BITEXACT)


def decode_rgb(path: Path) -> Iterator[np.ndarray]:
    """The video's frames in presentation order, each (H, W, 3) uint8 RGB, turned
    upright as a player shows them (the display matrix's rotation)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = frame.to_ndarray() if frame.format.name == "rgb24" else \
                frame.reformat(**_rgb_converter(frame)).to_ndarray()
            turns = quarter_turns(frame)
            yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def stream_signature(path: Path) -> dict:
    """What must match for this video's packets to join a segment's (framepack.output.segments)."""
    import av

    with av.open(str(path)) as container:
        return _stream_signature(container.streams.video[0])


def copy_leading_frames(path: Path, out: Path, container_format: str, frames: int) -> None:
    """Write the first ``frames`` frames of ``path`` to ``out`` as a segment,
    their packets copied unchanged.

    ``frames`` must be a keyframe's index in a stream of closed GOPs, so that
    the packets before that keyframe (in decode order) are exactly the
    frames before it; anything else is refused (the caller re-encodes)."""
    import av

    tmp = partial_path(Path(out))
    try:
        with av.open(str(path)) as src, av.open(str(tmp), mode="w", format=container_format,
                                                container_options=BITEXACT) as dst:
            stream = src.streams.video[0]
            out_stream = dst.add_stream_from_template(stream)
            out_stream.codec_context.framerate = stream.average_rate
            copied, last_copied, first_left = 0, None, None
            for packet in src.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue
                if copied < frames:
                    last_copied = packet.pts if last_copied is None else max(last_copied, packet.pts)
                    packet.stream = out_stream
                    dst.mux(packet)
                    copied += 1
                    continue
                if copied == frames and first_left is None and not packet.is_keyframe:
                    raise ValueError(f"frame {frames} of {path} does not start a GOP")
                first_left = packet.pts if first_left is None else min(first_left, packet.pts)
            if copied != frames or (first_left is not None and last_copied is not None and first_left <= last_copied):
                raise ValueError(f"{path}: the packets before frame {frames} are not a closed group of frames")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
