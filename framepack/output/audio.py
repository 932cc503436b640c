"""An extended video's sound: the input's audio track copied into the output.

The frames before the seam are the input's, at its own times (framepack
resamples them to 30 fps by the nearest frame, which keeps every time), so its
audio packets are copied unchanged, without decoding, and play over them; the
new part after the input ends is silent. Done after the writer's join, as one
more stream copy of the joined file, so writer plugins need not know of audio.
A container that cannot hold the codec (AAC in WebM) gets none, with a note.
"""

from __future__ import annotations

import heapq
import os
from fractions import Fraction
from pathlib import Path

from framepack.output.segments import BITEXACT
from framepack.output.writing import partial_path

# Output suffix -> (FFmpeg muxer, its options as the writers use them).
CONTAINERS = {".mp4": ("mp4", {"movflags": "+faststart"}), ".mov": ("mov", {"movflags": "+faststart"}),
              ".webm": ("webm", {}), ".mkv": ("matroska", {})}


def carry_audio(source: Path, video: Path, tags: dict[str, str]) -> str | None:
    """Copy ``source``'s first audio track into ``video``, replaced in place: its
    video packets are kept, and ``tags`` (the ones its join wrote) become the
    container's again. -> None when done, else why it was not."""
    import av

    video = Path(video)
    if video.suffix.lower() not in CONTAINERS:
        return f"{video.suffix or 'this'} output has no known container for audio"
    muxer, options = CONTAINERS[video.suffix.lower()]
    tmp = partial_path(video)
    try:
        with av.open(str(video)) as picture, av.open(str(source)) as sound, \
                av.open(str(tmp), mode="w", format=muxer, options=dict(options), container_options=BITEXACT) as dst:
            for key, value in tags.items():
                dst.metadata[key] = value  # before the first packet: the header carries them
            vin, ain = picture.streams.video[0], sound.streams.audio[0]
            vout = dst.add_stream_from_template(vin)
            vout.codec_context.framerate = vin.average_rate
            aout = dst.add_stream_from_template(ain)
            # The input's video starts at time 0 of the output; its audio keeps its offset from it.
            start = _start_seconds(sound.streams.video[0]) if sound.streams.video else Fraction(0)
            shift = round(start / ain.time_base)
            for packet in _by_time(_packets(picture, vin, vout, 0), _packets(sound, ain, aout, shift)):
                dst.mux(packet)
        os.replace(tmp, video)
    except (av.FFmpegError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        return str(exc)  # FFmpeg's words: "'webm' format does not support 'aac' codec"
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return None


def _start_seconds(stream) -> Fraction:
    return Fraction(stream.start_time or 0) * stream.time_base


def _packets(container, stream, out_stream, shift: int):
    """(decode time in seconds, packet) of one stream, moved ``shift`` ticks earlier."""
    for packet in container.demux(stream):
        if packet.dts is None:  # the demuxer's end-of-stream marker
            continue
        packet.dts -= shift
        if packet.pts is not None:
            packet.pts -= shift
        packet.stream = out_stream
        yield packet.dts * stream.time_base, packet


def _by_time(*streams):
    """The packets of several streams in one decode-time order, as a muxer wants
    them, holding one packet per stream (memory stays flat in the length)."""
    for _, packet in heapq.merge(*streams, key=lambda item: item[0]):
        yield packet
