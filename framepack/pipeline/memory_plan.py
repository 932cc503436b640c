"""The memory plan of a job before anything runs: what a web UI shows next to
the settings, and what ``framepack generate`` checks before it loads a model.

Nothing is loaded: the profile is chosen (or taken), the plugins are assembled
and the planner (framepack.engine.planning) estimates the peaks from the
model's configs, exactly as a job's own plan does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from framepack.errors import UserError


@dataclass(frozen=True)
class PlanView:
    profile: str
    why: str  # why that profile: the rules this machine matched, or that it was asked for
    height: int
    width: int
    sections: int
    frames: int
    vram_gb: float
    ram_gb: float
    offload: str
    fits: bool
    message: str  # one line for a person: the peaks and whether they fit, or what would

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_for(*, model: str | None = None, variant: str = "original", seconds: float = 5.0, window: int = 9,
             resolution: int = 640, size: tuple[int, int] | None = None,
             image_size: tuple[int, int] | None = None, profile: str | None = None,
             overrides: Iterable[str] = (), hardware=None, extend: str | Path | None = None) -> PlanView:
    """The plan for these settings on this machine (or ``hardware``).

    ``image_size`` (height, width) picks the resolution bucket as a job does;
    without it and without ``size`` the square bucket is assumed. ``extend``:
    the video an extension continues, whose size picks the bucket and whose
    frames come before the new ones, as in the job's own plan."""
    from framepack.engine.assemble import assemble
    from framepack.engine.planning import check_fits, plan_with_alternatives
    from framepack.models.sources import ModelSource
    from framepack.pipeline.buckets import nearest_bucket
    from framepack.output.video_input import probe_video
    from framepack.pipeline.extend import frames_at_30
    from framepack.pipeline.sections import section_count, total_pixel_frames

    engine = assemble(profile, list(overrides), hardware=hardware)
    video = probe_video(Path(extend)) if extend is not None else None
    if size is not None:
        height, width = size
    else:
        h, w = (video.height, video.width) if video is not None else image_size or (resolution, resolution)
        height, width = nearest_bucket(h, w, resolution)
    source = ModelSource.from_arg(model, variant)
    sections = section_count(seconds, window)
    frames = total_pixel_frames(sections, window) if video is None else frames_at_30(video) + 4 * window * sections
    hw = engine.hardware
    plan, alternatives = plan_with_alternatives(engine, source, height, width, frames, window, variant == "original",
                                                head=window if video is not None else 1)
    try:
        check_fits(plan, hw, alternatives)
        fits, message = True, f"{plan.summary()}: fits this machine ({hw.summary()})"
    except UserError as exc:
        fits, message = False, str(exc)
    return PlanView(profile=engine.profile.name, why=engine.selection.why, height=height, width=width,
                    sections=sections, frames=frames, vram_gb=plan.vram_gb, ram_gb=plan.ram_gb,
                    offload=plan.offload, fits=fits, message=message)
