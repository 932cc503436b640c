"""Video extension (``--extend VIDEO``): continue a video by ``--seconds`` more.

The output is the input followed by the new frames. Let N be the input's
frame count (at 30 fps) and ``O = 4 * window - 3`` (33) the cross-fade every
FramePack join uses. The new clip starts O frames before the input ends and
is decoded from latents that encode those O frames, so its first O frames
are the input's own last frames passed through the VAE; the join fades from
the input's real pixels to them over those O frames (the weights of
framepack.output.timeline), then the new frames follow. Frames before the
fade are the input's, untouched.

Conditioning, by variant (SPEC.md section 8, as FramePack-Studio's video
modes; docs/controls.md):

* **F1** (forward): the input's last ``C = 4 * (m - 1) + 1`` frames (m up to
  19 latents, 73 frames) are VAE-encoded and become the history, so the
  first new section reads them as its 4x/2x/1x context exactly as if it had
  generated them. The start latent (the anchor F1 keeps at index 0) and the
  SigLIP image embedding are the input's first frame's.
* **Original** (inverted): its context after a section holds frames still to
  come, so the input can only go before it. The input's last O frames are
  encoded to ``window`` latents that replace the one-frame start latent:
  every section reads them as ``clean_latents_pre`` (at consecutive indices
  before the section's, so the index layout grows by ``window - 1``), and the
  last generated section, which ends the new clip at the seam, is decoded
  with them in front. The SigLIP embedding is the input's last frame's.

Output segments: the input's frames before the fade are the job's leading
segment. When the input was written with the job's own writer settings (a
framepack video of the same size and codec options), its packets are copied
up to its last keyframe before the fade and only the few frames after that
keyframe are encoded again; otherwise every frame is encoded once. Inputs of
another size are resized and cropped like a start image; other frame rates
are resampled to 30 fps by the nearest frame. Both are said on stderr.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from framepack.errors import UserError
from framepack.notes import note
from framepack.output.video_input import VideoProbe, copy_leading_frames, decode_rgb, probe_video, stream_signature
from framepack.pipeline.buckets import resize_and_center_crop
from framepack.pipeline.sections import FPS, pixel_frames_per_section

HISTORY_LATENTS = 19  # what F1 reads as clean context: 1 + 2 + 16
PROBE_PART = 9  # lead-9: a one-frame segment that shows a writer's stream settings, deleted at once
MAX_INPUT_SECONDS = 3600.0  # an hour of input: longer is a mistake (it is all decoded and copied)


def overlap(lws: int) -> int:
    return pixel_frames_per_section(lws)


def min_input_frames(lws: int) -> int:
    """At least a second, and enough frames for the cross-fade."""
    return max(FPS, overlap(lws))


def frames_at_30(probe: VideoProbe) -> int:
    """Frames the input has once resampled to the output's 30 fps."""
    if probe.fps == FPS:
        return probe.frames
    return max(1, round(probe.frames * FPS / probe.fps))


def check_extension(settings) -> VideoProbe | None:
    """preflight: a readable video, long enough and not absurdly long, and no
    control that has no meaning for an extension."""
    if settings.extend is None:
        return None
    if settings.image is not None:
        raise UserError(f"--extend {settings.extend} and --image {settings.image}: an extension starts from the "
                        "video's own frames; leave out --image")
    if settings.keyframes:
        raise UserError(f"--extend with --keyframe {settings.keyframes[0]}: keyframes are not supported when "
                        "extending a video; extend first, then generate from a frame")
    probe = probe_video(settings.extend)
    if probe.seconds > MAX_INPUT_SECONDS:
        raise UserError(f"--extend {probe.path}: {probe.seconds:.0f} s is longer than the {MAX_INPUT_SECONDS:.0f} s "
                        "an extension reads; cut the part you want to continue first")
    needed = min_input_frames(settings.latent_window_size)
    n = frames_at_30(probe)
    if n < needed:
        raise UserError(f"--extend {probe.path}: {n} frames ({n / FPS:.2f} s at 30 fps) is too short; extending "
                        f"needs at least {needed} frames ({needed / FPS:.2f} s) for the cross-fade")
    return probe


def context_frames(frames: int, lws: int, inverted: bool) -> int:
    """Input frames VAE-encoded as context: the cross-fade's (inverted) or up to
    19 latents' worth (F1), always 4 * (latents - 1) + 1."""
    if inverted:
        return overlap(lws)
    latents = min(HISTORY_LATENTS, (frames - 1) // 4 + 1)
    return 4 * (latents - 1) + 1


@dataclass
class ExtensionInput:
    """What the job reads from the input video."""

    frames: int  # at 30 fps, after resampling
    first: np.ndarray  # (H, W, 3) uint8, sized like the output
    last: np.ndarray
    context: np.ndarray  # (C, H, W, 3) uint8: the last C frames, encoded as context
    lead_frames: int  # frames before the cross-fade: the leading segment

    def tail_pixels(self, lws: int) -> torch.Tensor:
        """The last O frames as (1, 3, O, H, W) float in [-1, 1]: where the cross-fade starts from."""
        tail = torch.from_numpy(self.context[-overlap(lws):]).float() / 127.5 - 1
        return tail.permute(3, 0, 1, 2)[None]

    def context_pixels(self) -> torch.Tensor:
        return (torch.from_numpy(self.context).float() / 127.5 - 1).permute(3, 0, 1, 2)[None]


def read_extension(settings, probe: VideoProbe, height: int, width: int, outputs=None) -> ExtensionInput:
    """Decode the input once, keeping only its first and last frames and the
    context; with ``outputs`` (framepack.output.outputs.SegmentOutputs), also
    write the leading segment of every frame writer."""
    lws = settings.latent_window_size
    n = frames_at_30(probe)
    lead = n - overlap(lws)
    keep = context_frames(n, lws, settings.variant == "original")
    resize = (probe.height, probe.width) != (height, width)
    if resize:
        note(f"--extend {probe.path}: {probe.width}x{probe.height} resized and cropped to {width}x{height}")
    if probe.fps != FPS:
        note(f"--extend {probe.path}: {float(probe.fps):g} fps resampled to {FPS} fps (nearest frame): "
             f"{probe.frames} frames become {n}")
    # A turned video's packets would show sideways without their display matrix: encoded upright instead.
    writers = _LeadWriters(probe, outputs, lead, copyable=not resize and probe.fps == FPS and not probe.rotation) \
        if outputs is not None else None
    first, window = None, deque(maxlen=keep)
    index = 0
    try:
        for frame in _resampled(decode_rgb(probe.path), probe, n):
            if resize:
                frame = resize_and_center_crop(frame, height, width)
            if first is None:
                first = frame
            if writers is not None and index < lead:
                writers.write(index, frame)
            window.append(frame)
            index += 1
        if index != n:  # the lead was cut for n frames: a damaged file, or one whose packets are not frames
            raise UserError(f"--extend {probe.path}: {index} frames decoded where its packets promise {n}; "
                            "the file is damaged or unusual: encode it again (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
        result = ExtensionInput(frames=index, first=first, last=window[-1], context=np.stack(window),
                                lead_frames=index - overlap(lws))
        if writers is not None:
            writers.close()
    except BaseException:
        if writers is not None:
            writers.abort()
        raise
    return result


def carry_input_audio(probe: VideoProbe, outputs: list[Path], tags: dict[str, str]) -> None:
    """The input's sound into each finished video file (framepack.output.audio);
    a frame folder has none. Said on stderr either way."""
    from framepack.output.audio import carry_audio

    if probe.audio is None:
        return
    for path in outputs:
        if path.is_dir():
            note(f"--extend {probe.path}: its {probe.audio} audio is not in {path.name} (a frame folder)")
            continue
        why = carry_audio(probe.path, path, tags)
        note(f"--extend {probe.path}: " + (f"its {probe.audio} audio copied into {path.name}" if why is None
                                           else f"its {probe.audio} audio is not in {path.name}: {why}"))


def _resampled(frames, probe: VideoProbe, n: int):
    """Frames on a 30 fps grid: output frame k is input frame floor((k + 1/2) * fps / 30),
    the one nearest its time."""
    if probe.fps == FPS:
        yield from frames
        return
    ratio = Fraction(probe.fps) / FPS
    k = 0
    for i, frame in enumerate(frames):
        while k < n and min(probe.frames - 1, math.floor((k + Fraction(1, 2)) * ratio)) <= i:
            yield frame
            k += 1


class _LeadWriters:
    """The leading segment of each frame writer: packets copied where the input
    matches the writer's own stream, frames encoded otherwise."""

    def __init__(self, probe: VideoProbe, outputs, lead: int, copyable: bool) -> None:
        self.outputs, self.probe, self.lead = outputs, probe, lead
        self.encoders: list[tuple[int, object, object]] = []  # (first frame index, writer, choice)
        self.copy: dict[str, int] = {}
        for choice in outputs.frame_writers:
            start = self._copyable_frames(choice) if copyable else 0
            if start:
                try:
                    copy_leading_frames(probe.path, self._path(choice, 0), choice.backend.suffix.lstrip("."), start)
                    self.copy[choice.name] = start
                except ValueError as exc:  # not closed GOPs after all: every frame is encoded
                    note(f"--extend {probe.path}: its packets cannot be copied ({exc}); encoding its frames again")
                    start = 0
            if start < lead:
                self.encoders.append((start, self._open(choice, 1 if start else 0), choice))
        copied = ", ".join(f"{k}: {v} frames" for k, v in self.copy.items())
        if copied:
            note(f"--extend {probe.path}: packets copied without re-encoding ({copied}), "
                 f"{lead} frames before the cross-fade")

    def _path(self, choice, part: int) -> Path:
        path = self.outputs.lead_path(choice, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # left by a job killed before its checkpoint listed it
            self.outputs.jobdir.discard([self.outputs.jobdir.relative(path)])
        return path

    def _open(self, choice, part: int):
        o = self.outputs
        return choice.backend.open(self._path(choice, part), o.fps, o.width, o.height, choice.options)

    def _copyable_frames(self, choice) -> int:
        """The input's last keyframe at or before the cross-fade, when its packets
        can join this writer's segments (same codec, size, rate and extradata:
        checked against a one-frame segment written now); else 0."""
        keyframes = [k for k in self.probe.keyframes if 0 < k <= self.lead]
        if not keyframes or self.probe.codec not in ("h264", "vp9", "vp8", "av1", "hevc"):
            return 0
        probe_path = self.outputs.lead_path(choice, PROBE_PART)
        probe_path.parent.mkdir(parents=True, exist_ok=True)
        o = self.outputs
        writer = choice.backend.open(probe_path, o.fps, o.width, o.height, choice.options)
        try:
            writer.write(np.zeros((1, o.height, o.width, 3), dtype=np.uint8))
            writer.close()
            same = probe_path.is_file() and stream_signature(probe_path) == stream_signature(self.probe.path)
        except Exception:  # a writer whose output PyAV cannot read (a folder): never copied
            same = False
        finally:
            self.outputs.jobdir.discard([self.outputs.jobdir.relative(probe_path)])
        return max(keyframes) if same else 0

    def write(self, index: int, frame: np.ndarray) -> None:
        for start, writer, _ in self.encoders:
            if index >= start:
                writer.write(frame[None])

    def close(self) -> None:
        for _, writer, _ in self.encoders:
            writer.close()
        self.encoders = []

    def abort(self) -> None:
        for _, writer, _ in self.encoders:
            writer.abort()
        self.encoders = []
