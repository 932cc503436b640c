"""A job's folder: what it is, what each finished section produced, and the
checkpoint that lets a killed job continue where it stopped.

Layout (``OUTPUT.job/`` by default):

    job.json                   settings, profile, backends, model fingerprint
    checkpoint.safetensors     state after the last finished section (atomic)
    latents/0003.safetensors   each section's new latents, written once
    segments/<writer>/...      each section's finished frames, per writer

Only the history window the next sections read is checkpointed; everything
else is written once, so checkpoint I/O stays linear in the video's length.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from framepack.errors import UserError

JOB_FORMAT = "framepack-job/1"
CHECKPOINT_FORMAT = "framepack-checkpoint/1"


@dataclass
class Checkpoint:
    next_section: int  # generation index of the next section to run
    generated: int  # latent frames of the video so far
    final_frames: int  # pixel frames already written to segments
    segments: list[str]  # segment ids written so far, in generation order
    window: torch.Tensor  # (1, 16, W, h, w) the history frames later sections read
    start_latent: torch.Tensor  # (1, 16, 1, h, w)
    generator_state: torch.Tensor  # uint8, torch.Generator.get_state()
    edge: torch.Tensor | None  # (1, 3, <=33, H, W) float pixels not final yet


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class JobDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def for_output(cls, output: Path) -> "JobDir":
        return cls(Path(str(output) + ".job"))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.safetensors"

    def segment_dir(self, writer: str) -> Path:
        return self.path / "segments" / writer

    # --- the job -----------------------------------------------------------

    def create(self, job: dict) -> None:
        if self.checkpoint_path.exists():
            raise UserError(
                f"{self.path} holds an unfinished job: continue it with `framepack resume {self.path}` "
                "or delete the folder to start over"
            )
        if self.path.exists():
            shutil.rmtree(self.path)  # a job that never finished its first section
        (self.path / "latents").mkdir(parents=True)
        _atomic_json(self.path / "job.json", {"format": JOB_FORMAT, **job})

    def read_job(self) -> dict:
        path = self.path / "job.json"
        try:
            job = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a framepack job folder (no job.json)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is damaged: {exc}") from exc
        if job.get("format") != JOB_FORMAT:
            raise UserError(f"{path} is not a job of this engine (format {job.get('format')!r}, expected {JOB_FORMAT})")
        return job

    def job_id(self) -> str:
        return hashlib.sha256((self.path / "job.json").read_bytes()).hexdigest()[:16]

    # --- per-section results --------------------------------------------------

    def save_section_latents(self, index: int, latents: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path / "latents" / f"{index:04d}.safetensors"
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        save_file({"latents": latents.contiguous()}, str(tmp))
        os.replace(tmp, path)

    def load_section_latents(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path / "latents" / f"{index:04d}.safetensors"))["latents"]

    # --- the checkpoint -------------------------------------------------------

    def write_checkpoint(self, ck: Checkpoint) -> None:
        from safetensors.torch import save_file

        tensors = {"window": ck.window, "start_latent": ck.start_latent, "generator_state": ck.generator_state}
        if ck.edge is not None:
            tensors["edge"] = ck.edge
        meta = {
            "format": CHECKPOINT_FORMAT,
            "job_id": self.job_id(),
            "state": json.dumps({"next_section": ck.next_section, "generated": ck.generated,
                                 "final_frames": ck.final_frames, "segments": ck.segments}),
        }
        tmp = self.checkpoint_path.with_name(f".checkpoint.partial-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, self.checkpoint_path)

    def read_checkpoint(self) -> Checkpoint:
        from safetensors import safe_open

        path = self.checkpoint_path
        if not path.exists():
            raise UserError(f"{self.path} has no checkpoint: the job stopped before its first section finished")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            state = json.loads(meta["state"])
        except Exception as exc:  # any damage reads as one clear line
            raise UserError(f"checkpoint {path} is damaged or not a framepack checkpoint: {exc}") from exc
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a checkpoint of this engine (format {meta.get('format')!r})")
        if meta.get("job_id") != self.job_id():
            raise UserError(f"{path} belongs to another job (its job.json differs); refusing to mix them")
        return Checkpoint(
            next_section=state["next_section"], generated=state["generated"], final_frames=state["final_frames"],
            segments=list(state["segments"]), window=tensors["window"], start_latent=tensors["start_latent"],
            generator_state=tensors["generator_state"], edge=tensors.get("edge"),
        )

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
