"""The job's outputs: finished frames go to segment files in the job folder
as each section completes; at the end each writer joins its segments in
playback order into the output without re-encoding.

Segment ids are generation indices (the cross-fade edge left at the end gets
the id one past the last section). The inverted model generates the end of
the video first, so its playback order is the reverse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from framepack.sections import FPS


class SegmentOutputs:
    def __init__(self, engine, jobdir, output: Path, width: int, height: int, inverted: bool) -> None:
        self.frame_writers = [c for c in engine.writers if c.backend.accepts == "frames"]
        self.latent_writers = [c for c in engine.writers if c.backend.accepts == "latents"]
        self.jobdir, self.output = jobdir, output
        self.width, self.height, self.inverted = width, height, inverted

    def segment_path(self, choice, seg_id: int) -> Path:
        return self.jobdir.segment_dir(choice.name) / f"{seg_id:04d}{choice.backend.suffix}"

    def add(self, frames: np.ndarray, seg_id: int) -> bool:
        """Write one chunk of final frames (T, H, W, 3) uint8 as a segment of every
        frame writer; False when there was nothing to write."""
        if not len(frames):
            return False
        for choice in self.frame_writers:
            path = self.segment_path(choice, seg_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = choice.backend.open(path, FPS, self.width, self.height, choice.options)
            try:
                writer.write(frames)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        return True

    def output_path(self, choice, partial: bool = False) -> Path:
        stem = self.output.with_suffix("")
        name = stem.name + (".partial" if partial else "") + choice.backend.suffix
        return stem.with_name(name)

    def join(self, seg_ids: list[int], metadata: dict[str, str], partial: bool = False) -> list[Path]:
        ordered = sorted(seg_ids, reverse=self.inverted)
        paths = []
        for choice in self.frame_writers:
            out = self.output_path(choice, partial)
            choice.backend.join([self.segment_path(choice, i) for i in ordered], out, choice.options, metadata)
            paths.append(out)
        return paths

    def save_latents(self, latents: torch.Tensor, metadata: dict[str, str]) -> list[Path]:
        paths = []
        for choice in self.latent_writers:
            out = self.output_path(choice)
            choice.backend.save(out, latents, metadata, choice.options)
            paths.append(out)
        return paths
