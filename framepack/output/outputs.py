"""The job's outputs: what each writer's file is called, and how they are made.

Names: every writer's file, the sidecar and the partial video share one
base name (which writer an extension picks is the engine's choice,
framepack.engine.assemble.writers_for_output). An existing
output is replaced only with ``overwrite``; otherwise the job takes the
first free name ``base-1``, ``base-2``, ... and says so.

Writing: finished frames go to segment files in the job folder as each
section completes; at the end each writer joins its segments in playback
order into the output without re-encoding. Segment ids are generation
indices (the cross-fade edge left at the end gets the id one past the last
section). The inverted model generates the end of the video first, so its
playback order is the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack.errors import UserError
from framepack.output.jobdir import file_digest

@dataclass(frozen=True)
class OutputNames:
    base: Path  # the name without any writer's suffix
    writers: tuple  # the frame and latent writer choices, main one first
    renamed_from: Path | None = None  # the name asked for, when it was taken

    def path(self, choice, partial: bool = False) -> Path:
        return self.base.with_name(self.base.name + (".partial" if partial else "") + choice.backend.suffix)

    @property
    def main(self) -> Path:
        """The main output (the first frame writer's file); the job folder goes beside it."""
        frame = [c for c in self.writers if c.backend.accepts == "frames"]
        return self.path(frame[0] if frame else self.writers[0])

    @property
    def sidecar(self) -> Path:
        return self.base.with_name(self.base.name + ".json")

    def final_paths(self) -> list[Path]:
        return [self.path(c) for c in self.writers] + [self.sidecar]

    def partial_paths(self) -> list[Path]:
        return [self.path(c, partial=True) for c in self.writers if c.backend.accepts == "frames"]


def name_outputs(base: Path, writers, overwrite: bool) -> OutputNames:
    """The outputs' names for ``base`` (see framepack.engine.assemble.writers_for_output):
    as given, or the first free ``base-N`` when one is taken and not ``overwrite``."""
    names = OutputNames(base, tuple(writers))
    if overwrite or not _taken(names):
        return names
    for n in range(1, 10_000):
        candidate = OutputNames(base.with_name(f"{base.name}-{n}"), tuple(writers), renamed_from=names.main)
        if not _taken(candidate):
            return candidate
    raise UserError(f"--output {base}: every name up to {base.name}-9999 is taken; pass --overwrite or another name")


def _taken(names: OutputNames) -> bool:
    return any(p.exists() for p in names.final_paths())


class SegmentOutputs:
    def __init__(self, names: OutputNames, jobdir, width: int, height: int, inverted: bool, fps: int) -> None:
        self.names = names
        self.frame_writers = [c for c in names.writers if c.backend.accepts == "frames"]
        self.latent_writers = [c for c in names.writers if c.backend.accepts == "latents"]
        self.jobdir = jobdir
        self.width, self.height, self.inverted, self.fps = width, height, inverted, fps

    def segment_path(self, choice, seg_id: int) -> Path:
        return self.jobdir.segment_dir(choice.name) / f"{seg_id:04d}{choice.backend.suffix}"

    def lead_path(self, choice, part: int) -> Path:
        """An extended video's leading segments (framepack.pipeline.extend): part 0
        and 1 come before every generated segment."""
        return self.jobdir.segment_dir(choice.name) / f"lead-{part}{choice.backend.suffix}"

    def lead_files(self, choice) -> list[Path]:
        return [p for p in (self.lead_path(choice, 0), self.lead_path(choice, 1)) if p.exists()]

    def add(self, frames: np.ndarray, seg_id: int) -> dict[str, str]:
        """Write one chunk of final frames (T, H, W, 3) uint8 as a segment of every
        frame writer; returns {path in the job folder: sha256} of what was
        written (empty when there was nothing to write)."""
        if not len(frames):
            return {}
        written = {}
        for choice in self.frame_writers:
            path = self.segment_path(choice, seg_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            rel = self.jobdir.relative(path)
            if path.exists():  # left by a job killed before its checkpoint listed it
                self.jobdir.discard([rel])
            writer = choice.backend.open(path, self.fps, self.width, self.height, choice.options)
            try:
                writer.write(frames)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            written[rel] = file_digest(path)
        return written

    def digests(self, seg_id: int) -> dict[str, str]:
        """{path: sha256} of the segments already on disk for ``seg_id``."""
        return {self.jobdir.relative(p): file_digest(p)
                for p in (self.segment_path(c, seg_id) for c in self.frame_writers)}

    def segment_files(self, seg_ids) -> list[str]:
        return [self.jobdir.relative(self.segment_path(c, i)) for i in seg_ids for c in self.frame_writers]

    def join(self, seg_ids: list[int], metadata: dict[str, str], partial: bool = False) -> list[Path]:
        ordered = sorted(seg_ids, reverse=self.inverted)
        paths = []
        for choice in self.frame_writers:
            out = self.names.path(choice, partial)
            segments = self.lead_files(choice) + [self.segment_path(choice, i) for i in ordered]
            if out.is_dir():  # a frame folder: joins do not replace a full one in place
                _replace_folder(out, lambda: choice.backend.join(segments, out, choice.options, metadata))
            else:
                choice.backend.join(segments, out, choice.options, metadata)
            paths.append(out)
        return paths

    def save_latents(self, latents: torch.Tensor, metadata: dict[str, str]) -> list[Path]:
        paths = []
        for choice in self.latent_writers:
            out = self.names.path(choice)
            choice.backend.save(out, latents, metadata, choice.options)
            paths.append(out)
        return paths


def is_frame_folder(path: Path) -> bool:
    """A png writer's output: numbered frames and metadata.json, nothing else."""
    import re

    return path.is_dir() and (path / "metadata.json").is_file() and all(
        p.name == "metadata.json" or re.fullmatch(r"\d{6}\.png", p.name) for p in path.iterdir())


def _replace_folder(out: Path, join) -> None:
    """Replace an earlier frame folder of framepack's (an older partial video,
    or an output the user asked to overwrite); anything else is refused."""
    import os
    import shutil

    from framepack.output.writing import partial_path

    if any(out.iterdir()) and not is_frame_folder(out):
        raise UserError(f"{out} is a folder framepack did not write; it will not replace it: move it or pick "
                        "another --output")
    aside = partial_path(out.with_name(out.name + ".old"))
    os.replace(out, aside)
    try:
        join()
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside)
