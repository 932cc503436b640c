"""Image controls: end frame, keyframes and the image embedding each section sees.

The inverted ("original") model generates the video's end first; each of its
sections reads a start-side clean latent (``clean_latents_pre``, normally the
start image's) and an end-side one (``clean_latents_post``, the newest
history frame; zeros before anything is generated). Hence, SPEC.md section 3:

* **End frame** (``end_image``, ``end_strength`` S): the end image's latent
  times S fills the 1x history slot before the first section, so the first
  generated section (the video's end) reads it as ``clean_latents_post``;
  later sections see it in their 2x/4x context as the history moves, the way
  the forks that add an end frame do. It is conditioning only: it is never
  decoded. S = 0 leaves the zeros the slot holds anyway.
* **Keyframes** (``TIME=IMAGE``): the section covering TIME (playback section
  ``floor(TIME / L)``, ``L = 4 * window / 30`` s) reads the keyframe's latent
  as its ``clean_latents_pre`` in place of the start image's (as
  FramePack-eichi does). Section 0 belongs to the start image.
* **Image embedding per section** (``image_embeds``): each playback section
  ``p`` of ``S`` has an anchor (the keyframe in its section, else the start
  image) and, with an end image, a weight ``e_p`` for the end image's SigLIP
  embedding: ``start`` 0, ``mean`` 1/2, ``linear`` ``p / (S - 1)`` (1/2 for a
  single section), so the end section sees the end image's embedding and the
  first the start image's. The embedding is ``(1 - e_p) * anchor + e_p *
  end``. Without an end image every section sees its anchor.

F1 generates forward from its start frame with nothing after the section in
progress, so neither an end latent nor a start-side keyframe has a slot in
its context: both are refused for ``variant="f1"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from framepack.errors import UserError
from framepack.pipeline.prompts import section_seconds

IMAGE_EMBEDS = ("start", "linear", "mean")
BLANKS = ("gray", "black", "white", "noise")


@dataclass(frozen=True)
class Keyframe:
    time: float  # seconds of the output video
    path: Path
    given: str  # as the user wrote it, for messages


def parse_keyframe(text: str) -> Keyframe:
    """``"2.5=pose.png"`` -> Keyframe(2.5, Path("pose.png"))."""
    time_text, sep, path = str(text).partition("=")
    try:
        time = float(time_text.strip().removesuffix("s"))
    except ValueError:
        time = None
    if not sep or not path or time is None:
        raise UserError(f"--keyframe {text!r}: expected TIME=IMAGE with TIME in seconds, e.g. 2.5=pose.png")
    if not math.isfinite(time) or time < 0:
        raise UserError(f"--keyframe {text!r}: the time must be a number of seconds, 0 or more")
    return Keyframe(time, Path(path), str(text))


def embed_rule(settings) -> str:
    """The --image-embeds rule in force: as given, else linear with an end image, else start."""
    if settings.image_embeds is not None:
        return settings.image_embeds
    return "linear" if settings.end_image is not None else "start"


def validate_controls(settings) -> None:
    """Checks that need no section count and no file (JobSettings.validate)."""
    s = settings.end_strength
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 1:
        raise UserError(f"--end-strength {s!r}: must be a number from 0 to 1")
    if settings.image_embeds is not None and settings.image_embeds not in IMAGE_EMBEDS:
        raise UserError(f"--image-embeds {settings.image_embeds!r}: must be one of {', '.join(IMAGE_EMBEDS)}")
    if settings.blank not in BLANKS:
        raise UserError(f"--blank {settings.blank!r}: must be one of {', '.join(BLANKS)}")
    keyframes = [parse_keyframe(k) for k in settings.keyframes]
    if settings.variant == "f1":
        if settings.end_image is not None:
            raise UserError("--end-image: the f1 variant generates forward from the start frame and has no slot "
                            "for an end frame; use --variant original")
        if keyframes:
            raise UserError(f"--keyframe {keyframes[0].given}: the f1 variant cannot condition a section on a "
                            "keyframe (its context holds only frames already generated); use --variant original")


def keyframe_sections(settings, sections: int) -> dict[int, Keyframe]:
    """Playback section -> its keyframe; a time past the end, in section 0 or
    sharing a section with another is refused naming them."""
    length = section_seconds(settings.latent_window_size)
    video = sections * length
    placed: dict[int, Keyframe] = {}
    for kf in (parse_keyframe(k) for k in settings.keyframes):
        if kf.time >= video - 1e-9:
            raise UserError(f"--keyframe {kf.given}: {kf.time:g} s is past the end of the {video:g} s video")
        p = math.floor(kf.time / length + 1e-9)
        span = f"section {p}, {p * length:g}-{(p + 1) * length:g} s"
        if p == 0:
            raise UserError(f"--keyframe {kf.given}: lands in {span}, which starts from the start image; "
                            f"give a time of {length:g} s or later")
        if p in placed:
            raise UserError(f"--keyframe {placed[p].given} and --keyframe {kf.given} fall in the same section "
                            f"({span}); one keyframe per section")
        placed[p] = kf
    return placed


def check_controls(settings, sections: int) -> None:
    """preflight: placement and every control image readable, one line each."""
    from framepack.pipeline.inputs import load_image

    placed = keyframe_sections(settings, sections)
    if settings.end_image is not None:
        _load(load_image, settings.end_image, "--end-image")
    for kf in placed.values():
        _load(load_image, kf.path, f"--keyframe {kf.given}")


def _load(load_image, path, flag: str) -> np.ndarray:
    try:
        return load_image(path)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None


def embedding_weights(rule: str, sections: int, has_end: bool, keyframed: set[int]) -> list[dict[str, float]]:
    """Per playback section, {"start" | "keyframe" | "end": weight} of the image
    embeddings it mixes (the module docstring's rule); weights sum to 1."""
    out = []
    for p in range(sections):
        anchor = "keyframe" if p in keyframed else "start"
        e = 0.0
        if has_end:
            e = {"start": 0.0, "mean": 0.5}.get(rule, p / (sections - 1) if sections > 1 else 0.5)
        out.append({anchor: 1.0} if e == 0 else ({"end": 1.0} if e == 1 else {anchor: 1.0 - e, "end": e}))
    return out


@dataclass
class ImageConditioning:
    """What the section loop reads besides the start latent (framepack.pipeline.loop.LoopInputs)."""

    end_latent: torch.Tensor | None = None  # (1, 16, 1, h, w) float32 CPU, already times the strength
    section_pre: dict[int, torch.Tensor] | None = None  # generation index -> clean_latents_pre
    section_images: list[torch.Tensor] | None = None  # generation index -> image_embeds (device, dtype)
    weights: list[dict[str, float]] | None = None  # generation index -> embedding weights


def build_image_conditioning(settings, sections: int, start_embeds: torch.Tensor,
                             prepare: Callable[[Path], np.ndarray], encode_latent: Callable, encode_embeds: Callable,
                             device, tdtype) -> ImageConditioning:
    """Encode the end image and keyframes and lay them out per generation index.

    ``prepare`` reads an image and crops it like the start image; ``encode_latent``
    and ``encode_embeds`` are the VAE and SigLIP encoders. A job without
    controls gets an empty result, so its sampling is untouched."""
    out = ImageConditioning()
    if settings.variant != "original":
        return out
    placed = keyframe_sections(settings, sections)
    end_embeds = None
    if settings.end_image is not None:
        end = prepare(settings.end_image)
        if settings.end_strength > 0:  # 0: the slot keeps its zeros, exactly as without an end image
            latent = encode_latent(end)
            out.end_latent = latent if settings.end_strength == 1 else latent * settings.end_strength
        end_embeds = encode_embeds(end)
    kf_latents, kf_embeds = {}, {}
    for p, kf in placed.items():
        image = prepare(kf.path)
        kf_latents[p], kf_embeds[p] = encode_latent(image), encode_embeds(image)
    if kf_latents:
        out.section_pre = {sections - 1 - p: latent for p, latent in kf_latents.items()}
    playback = embedding_weights(embed_rule(settings), sections, end_embeds is not None, set(placed))
    if all(w == {"start": 1.0} for w in playback):
        return out  # every section sees the start image's embedding: the branches already hold it
    made = []
    for p, weights in enumerate(playback):
        parts = {"start": start_embeds, "end": end_embeds, "keyframe": kf_embeds.get(p)}
        if len(weights) == 1:
            mixed = parts[next(iter(weights))]
        else:
            mixed = sum(w * parts[name].float() for name, w in weights.items())
        made.append(mixed.to(device, tdtype))
    out.section_images = made[::-1]  # generation order: the end first
    out.weights = playback[::-1]
    return out


def check_inputs_unchanged(recorded: dict, current: dict) -> None:
    """resume: refuse when an image the job read is not the file it was (sha256
    of the start image, end image and keyframes in the job record)."""
    before, now = recorded.get("inputs", {}), current.get("inputs", {})
    changed = []
    for role in sorted((set(before) | set(now)) - {"loras"}):  # LoRAs: check_loras_unchanged, with their names
        old, new = before.get(role), now.get(role)
        olds = old if isinstance(old, list) else [old]
        news = new if isinstance(new, list) else [new]
        if len(olds) != len(news):
            changed.append(role)
            continue
        for o, n in zip(olds, news):
            if not isinstance(o, dict) or not isinstance(n, dict) or o.get("sha256") != n.get("sha256"):
                where = (n or o or {}).get("path", role) if isinstance(n or o, dict) else role
                changed.append(f"{role} {where}")
    if changed:
        raise UserError(f"input changed since this job started ({', '.join(changed)}); its checkpoint cannot "
                        "continue with other images: put the originals back, or start over")
