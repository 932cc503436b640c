"""Output as segments: each section's finished frames become a small file of
their own, and the job's output is their join, made without re-encoding.

Why: encoding the whole video again after every section makes output time
grow with the square of the length, and holding every frame until the end
makes RAM grow with it. Here a section's frames are encoded once, straight
to a segment in the job folder (a file that plays on its own), and then
dropped. The inverted model makes the end of the video first; its segments
are simply joined in reverse, so nothing waits in RAM for the beginning.
At the end, ``WriterBackend.join`` puts the segments together in playback
order: for video containers a stream copy (``remux_join``), for a PNG
folder a link of each frame. The engine's side (which segment is which,
the job folder) is framepack.output.outputs and framepack.output.jobdir.

A stream copy is only valid when every segment starts with a keyframe and
all were encoded with the same codec parameters. Each segment is a fresh
encoder run with the same settings, so both hold; ``remux_join`` checks
them and refuses, naming the segment, rather than writing a file that plays
garbage after the first segment.

The same frames and settings give the same bytes, in any process on any
machine, so a resumed job (its segments written by two processes, maybe on
two machines) gives exactly the file of an uninterrupted one. Three things
used to vary and are pinned here or by the writers:

- the RGB -> YUV conversion: ``rgb_to_yuv420p`` below, exact integer
  arithmetic, instead of swscale (whose result depends on its SIMD path
  and whose chroma is a filter of its own, not the 2x2 mean);
- the encoder's threads: PyAV asks for slice threads, one slice per CPU,
  so x264's bitstream followed the core count (the writers fix it);
- the muxer: Matroska writes a random SegmentUID and both containers the
  FFmpeg version unless told ``fflags=+bitexact``, which every file here
  is. The MP4 header's creation time is 0 unless the caller's metadata
  carries ``creation_time``.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from framepack.errors import FramepackError
from framepack.output.writing import partial_path

# BT.709, limited ("TV") range, written into every file: without tags,
# players guess from the frame size (BT.601 below 720p, which most FramePack
# sizes are: shifted colours) and some guess full range (crushed or lifted
# blacks).
COLOR_TAGS = {"colorspace": "ITU709", "color_range": "MPEG", "color_primaries": "BT709", "color_trc": "BT709"}
# No run-to-run or version-dependent bytes from the muxer (see the module docstring).
BITEXACT = {"fflags": "+bitexact"}

# BT.709 luma weights Kr, Kg, Kb in units of 1/10000 (Kr = 0.2126, Kb = 0.0722).
_KR, _KG, _KB = 2126, 7152, 722
_K = 10000


def _round_div(num: np.ndarray, den: int) -> np.ndarray:
    """num / den rounded to the nearest integer, halves up, exactly (floor
    division of integers: no float rounding that could differ anywhere)."""
    return (2 * num + den) // (2 * den)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """One RGB frame -> yuv420p, BT.709 limited range: (H, W, 3) uint8 ->
    (H * 3 // 2, W) uint8 holding the Y plane (H, W), then Cb (H/2, W/2),
    then Cr, back to back: the layout ``VideoFrame.from_ndarray(...,
    format="yuv420p")`` takes.

    With R, G, B in 0..255 and E = (Kr R + Kg G + Kb B) / 255:

        Y  =  16 + 219 E
        Cb = 128 + 224 (B / 255 - E) / (2 (1 - Kb))
        Cr = 128 + 224 (R / 255 - E) / (2 (1 - Kr))

    Cb and Cr are taken over the mean of each 2x2 block of pixels (chroma
    sited at the block's centre), and every value is rounded to the nearest
    integer, halves up. All of it is integer arithmetic on exact fractions,
    so the result is the same on every machine; it needs no clipping (Y
    stays in 16..235, Cb and Cr in 16..240).
    """
    h, w, _ = frame.shape
    # (3, H, W) planar int32: every numerator below stays under 2**31.
    r, g, b = np.moveaxis(frame, -1, 0).astype(np.int32)
    # Y = 16 + 219 (Kr R + Kg G + Kb B) / (255 K); numerator <= 219 * K * 255.
    y = 16 + _round_div(219 * (_KR * r + _KG * g + _KB * b), 255 * _K)
    # (H/2, W/2): sums over 2x2 blocks; the mean's /4 goes into the divisor.
    sr, sg, sb = (c[0::2, 0::2] + c[0::2, 1::2] + c[1::2, 0::2] + c[1::2, 1::2] for c in (r, g, b))
    # B/255 - E = ((K - Kb) B - Kr R - Kg G) / (255 K) and 2 (1 - Kb) = 2 (K - Kb) / K,
    # so Cb = 128 + 224 ((K - Kb) B - Kr R - Kg G) / (255 * 2 (K - Kb)), and over a
    # block's sums 224 / (4 * 2 * 255) = 28 / 255. Likewise Cr with R and Kr.
    cb = 128 + _round_div(28 * ((_K - _KB) * sb - _KR * sr - _KG * sg), 255 * (_K - _KB))
    cr = 128 + _round_div(28 * ((_K - _KR) * sr - _KG * sg - _KB * sb), 255 * (_K - _KR))
    # PyAV reads the array as one flat buffer (Y, Cb, Cr planes back to back),
    # so the chroma planes need not split into whole rows of W.
    planes = np.concatenate([y.ravel(), cb.ravel(), cr.ravel()])
    return planes.astype(np.uint8).reshape(h * 3 // 2, w)


def check_frames(frames: np.ndarray, width: int, height: int) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ValueError(f"expected uint8 frames (T, {height}, {width}, 3), got {frames.dtype} {tuple(frames.shape)}")


class VideoSegmentWriter:
    """One segment of a video: RGB frames -> yuv420p (BT.709, limited range,
    ``rgb_to_yuv420p``) -> encoder -> container, under a hidden name until
    ``close``.

    Every segment is a complete encoder run, so it starts with a keyframe and
    plays on its own. ``codec_options`` must not vary between the segments of
    one job (``remux_join`` checks that the codec parameters match), and must
    make the encoder's output independent of the machine (a fixed thread
    count; see the writers) for a resumed job to match an uninterrupted one.
    """

    def __init__(
        self,
        path: Path,
        container_format: str,
        codec: str,
        fps: int,
        width: int,
        height: int,
        codec_options: dict[str, str],
    ) -> None:
        import av  # lazily: only jobs that write video need FFmpeg
        from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace

        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.frames_written = 0
        self._av = av
        self._time_base = Fraction(1, fps)
        self._tmp = partial_path(self.path)
        self._container = av.open(str(self._tmp), mode="w", format=container_format, container_options=BITEXACT)
        try:
            stream = self._container.add_stream(codec, rate=Fraction(fps, 1), options=dict(codec_options))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            cc = stream.codec_context
            cc.colorspace = Colorspace[COLOR_TAGS["colorspace"]]
            cc.color_range = ColorRange[COLOR_TAGS["color_range"]]
            cc.color_primaries = ColorPrimaries[COLOR_TAGS["color_primaries"]]
            cc.color_trc = ColorTrc[COLOR_TAGS["color_trc"]]
            self._stream = stream
        except BaseException:
            self.abort()
            raise

    def write(self, frames: np.ndarray) -> None:
        # frames: (T, H, W, 3) uint8, playback order
        check_frames(frames, self.width, self.height)
        for frame in frames:
            # The conversion uses the coefficients the tags announce.
            yuv = self._av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            yuv.pts, yuv.time_base = self.frames_written, self._time_base
            for packet in self._stream.encode(yuv):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"segment {self.path} has no frames")
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


def _stream_signature(stream) -> dict[str, Any]:
    """What must match for packets of two segments to share one stream."""
    cc = stream.codec_context
    return {
        "codec": cc.name,
        "size": (cc.width, cc.height),
        "pix_fmt": cc.pix_fmt,
        "fps": stream.average_rate or stream.guessed_rate,
        # H.264: the avcC box with SPS/PPS; VP9 in WebM: none (all in-band).
        "extradata": bytes(cc.extradata or b""),
    }


def remux_join(
    segments: Sequence[Path],
    out: Path,
    container_format: str,
    metadata: dict[str, str],
    mux_options: dict[str, str] | None = None,
) -> None:
    """Concatenate video segments into ``out`` by stream copy.

    ``segments`` are in playback order. Packets are copied unchanged; their
    timestamps are shifted by the duration of the segments before them
    (frames / fps, exact, so 30 fps in millisecond WebM timestamps does not
    drift). ``metadata`` becomes the container's tags. Written to a hidden
    name and renamed into place.

    Decode timestamps: an encoder with B-frames starts a segment's decode
    clock a few frames early (x264: two frames, but none for a one-frame
    segment), so segments can disagree on that delay. Every segment's DTS is
    moved back to the largest delay of them all, which keeps DTS <= PTS and
    makes DTS rise strictly across the joins; PTS, the display times, are
    only shifted by the running duration.
    """
    import av

    if not segments:
        raise ValueError(f"nothing to join into {out}: no segments")
    out = Path(out)
    reference, delays = None, []
    for path in segments:  # check everything before writing anything
        with _open_segment(av, path) as src:
            stream = src.streams.video[0]
            signature = _stream_signature(stream)
            if reference is None:
                reference = signature
            elif signature != reference:
                changed = ", ".join(k for k in reference if signature[k] != reference[k])
                raise FramepackError(
                    f"cannot join {path} to {segments[0]} without re-encoding: they differ in {changed} "
                    "(segments of one job must be written with the same writer options)"
                )
            first = next((p for p in src.demux(stream) if p.dts is not None), None)
            if first is None:
                raise FramepackError(f"cannot join {path}: it holds no video frames")
            if not first.is_keyframe:
                raise FramepackError(f"cannot join {path}: it does not start with a keyframe")
            delays.append((first.pts - first.dts) * stream.time_base)  # seconds
    delay = max(delays)
    fps = Fraction(reference["fps"])

    tmp = partial_path(out)
    try:
        with av.open(str(tmp), mode="w", format=container_format, options=dict(mux_options or {}),
                     container_options=BITEXACT) as dst:
            for key, value in metadata.items():
                dst.metadata[key] = value  # before the first packet: the header carries them
            out_stream = None
            offset = Fraction(0)  # seconds of video already copied
            last_dts = None  # seconds
            for path, own_delay in zip(segments, delays):
                with _open_segment(av, path) as src:
                    stream = src.streams.video[0]
                    if out_stream is None:
                        out_stream = dst.add_stream_from_template(stream)
                        # Not part of the template; without it Matroska writes no
                        # DefaultDuration and readers guess 29.97 from ms timestamps.
                        out_stream.codec_context.framerate = fps
                    pts_shift = round(offset / stream.time_base)
                    dts_shift = round((offset - (delay - own_delay)) / stream.time_base)
                    frames = 0
                    for packet in src.demux(stream):
                        if packet.dts is None:  # the demuxer's end-of-stream marker
                            continue
                        packet.pts += pts_shift
                        packet.dts += dts_shift
                        dts = packet.dts * stream.time_base
                        if last_dts is not None and dts <= last_dts:
                            raise FramepackError(f"cannot join {path}: its timestamps overlap the segment before it")
                        last_dts = dts
                        packet.stream = out_stream
                        dst.mux(packet)
                        frames += 1
                    offset += frames / fps
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_segment(av, path: Path):
    try:
        container = av.open(str(path))
    except (OSError, av.FFmpegError) as exc:
        raise FramepackError(f"cannot read segment {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise FramepackError(f"cannot join {path}: it has no video stream")
    return container


def count_frames(path: Path) -> int:
    """Video frames in a file, counted from its packets (no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.dts is not None)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = partial_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
