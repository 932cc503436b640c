"""Payloads of the event hooks (see framepack.hookspecs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class JobStart:
    settings: Any  # framepack.pipeline.settings.JobSettings
    profile: str
    backends: dict[str, str]  # family -> backend name
    sections: int
    frames: int
    width: int
    height: int
    plan: str = ""  # the memory estimate, e.g. "about 5.3 GB VRAM, 15.1 GB RAM with offload ..."


@dataclass(frozen=True)
class SectionEvent:
    index: int  # 0-based, in generation order
    count: int
    phase: str  # "start" or "end"
    elapsed_s: float
    computed: int = 0  # transformer calls the step cache let run (on "end")
    skipped: int = 0  # transformer calls it skipped (on "end")
    prompts: dict = field(default_factory=dict)  # {prompt text: weight} this section uses (timed prompts blend)


@dataclass(frozen=True)
class StepEvent:
    section: int
    sections: int
    step: int  # 0-based
    steps: int
    elapsed_s: float
    denoised: torch.Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class JobEnd:
    status: str  # "done", "failed" or "interrupted"
    outputs: tuple[str, ...]
    elapsed_s: float
    error: str | None = None
