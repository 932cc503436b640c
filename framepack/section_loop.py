"""The section loop of SPEC.md section 3, resumable after every section.

State that later sections need is small: the window of history latents they
read as clean context or decode, the generator's state, and the pixels at
the open edge of the cross-fade. It is checkpointed after each section;
each section's new latents and finished frames are written once, to the job
folder. Memory stays flat however long the video (with glibc's heap kept
from drifting, see framepack.heap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from framepack.events import SectionEvent, StepEvent
from framepack.heap import fixed_mmap_threshold
from framepack.jobdir import Checkpoint
from framepack.sampling import make_x0_model, sample_unipc, section_sigmas
from framepack.sections import (
    HISTORY_SPLIT,
    f1_layout,
    inverted_layout,
    inverted_paddings,
    pixel_frames_per_section,
    total_latent_frames,
)
from framepack.transformer import SectionContext, forward_velocity
from framepack.video import PixelTimeline

LATENT_CHANNELS = 16
CONTEXT = sum(HISTORY_SPLIT)  # 19 history frames read as clean context


@dataclass
class LoopResult:
    latents: torch.Tensor  # (1, 16, T, h, w) float32, playback order
    frames: int
    segments: list[int]
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)


def window_size(lws: int) -> int:
    """History frames worth keeping: the clean context, or what a later
    section decodes (2*lws, +1 on the inverted model's last section)."""
    return max(CONTEXT + 1, 2 * lws + 1)


@fixed_mmap_threshold()  # per-section buffers in their own mmaps: no heap drift (framepack.heap)
def run_sections(settings, engine, sections, height, width, branches, start_latent, vae, transformer,
                 policy, cache, outputs, jobdir, checkpoint: Checkpoint | None, tdtype) -> LoopResult:
    started = time.perf_counter()
    hook = engine.hook
    device = policy.execution_device
    lws = settings.latent_window_size
    h, w = height // 8, width // 8
    keep = window_size(lws)
    inverted = settings.variant == "original"

    generator = torch.Generator("cpu").manual_seed(settings.seed)
    timeline = PixelTimeline(pixel_frames_per_section(lws), "front" if inverted else "back")
    paddings = inverted_paddings(sections) if inverted else [None] * sections
    if checkpoint is None:
        zeros = torch.zeros((1, LATENT_CHANNELS, CONTEXT, h, w), dtype=torch.float32)
        history = zeros if inverted else torch.cat([zeros, start_latent], dim=2)
        generated, first, segments = (0 if inverted else 1), 0, []
    else:
        history, generated, first = checkpoint.window, checkpoint.generated, checkpoint.next_section
        segments = list(checkpoint.segments)
        generator.set_state(checkpoint.generator_state)
        timeline.edge, timeline.final_frames = checkpoint.edge, checkpoint.final_frames
    sigmas = section_sigmas(settings.steps, lws, h, w).to(device)
    result = LoopResult(latents=torch.empty(0), frames=0, segments=segments)

    for index in range(first, sections):
        padding = paddings[index]
        hook.framepack_on_section(event=SectionEvent(index, sections, "start", time.perf_counter() - started))
        if inverted:
            layout = inverted_layout(padding, lws)
            post, clean_2x, clean_4x = history[:, :, :CONTEXT].split(HISTORY_SPLIT, dim=2)
            clean = torch.cat([start_latent, post], dim=2)
        else:
            layout = f1_layout(lws)
            clean_4x, clean_2x, clean_1x = history[:, :, -CONTEXT:].split(HISTORY_SPLIT[::-1], dim=2)
            clean = torch.cat([start_latent, clean_1x], dim=2)
        context = SectionContext(
            indices_latents=layout.latent.to(device),
            latents_clean=clean.to(device, tdtype),
            indices_latents_clean=layout.clean.to(device),
            latents_history_2x=clean_2x.to(device, tdtype),
            indices_latents_history_2x=layout.clean_2x.to(device),
            latents_history_4x=clean_4x.to(device, tdtype),
            indices_latents_history_4x=layout.clean_4x.to(device),
        ).as_kwargs()

        noise = torch.randn((1, LATENT_CHANNELS, lws, h, w), generator=generator, device="cpu").to(device, torch.float32)
        with policy.stage("transformer"):
            latents = _sample_section(settings, transformer, cache, branches, context, noise, sigmas, tdtype,
                                      hook, index, sections, started)
        latents = latents.cpu().float()  # (1, 16, lws, h, w)
        result.computed_steps.append(cache.counts.computed)
        result.skipped_steps.append(cache.counts.skipped)

        if inverted:
            last = padding == 0
            if last:
                latents = torch.cat([start_latent, latents], dim=2)
            generated += latents.shape[2]
            history = torch.cat([latents, history], dim=2)[:, :, :keep]
            real = history[:, :, :generated]
            to_decode = real if index == 0 else real[:, :, : 2 * lws + (1 if last else 0)]
        else:
            generated += latents.shape[2]
            history = torch.cat([history, latents], dim=2)[:, :, -keep:]
            real = history[:, :, -generated:]
            to_decode = real if index == 0 else real[:, :, -2 * lws :]
        with policy.stage("vae"):
            pixels = vae.decode(to_decode)
        if outputs.add(timeline.add(pixels), index):
            segments.append(index)
        jobdir.save_section_latents(index, latents)
        jobdir.write_checkpoint(Checkpoint(
            next_section=index + 1, generated=generated, final_frames=timeline.final_frames, segments=segments,
            window=history, start_latent=start_latent, generator_state=generator.get_state(), edge=timeline.edge,
        ))
        hook.framepack_on_section(
            event=SectionEvent(index, sections, "end", time.perf_counter() - started,
                               computed=result.computed_steps[-1], skipped=result.skipped_steps[-1])
        )

    if outputs.add(timeline.finish(), sections):
        segments.append(sections)
    result.latents = _final_latents(jobdir, sections, lws, start_latent, inverted)
    result.frames = timeline.final_frames
    return result


def _final_latents(jobdir, sections, lws, start_latent, inverted) -> torch.Tensor:
    """The video's latents (1, 16, T, h, w) in playback order, filled in from the
    job folder one section at a time: a torch.cat of all sections would hold
    them twice, a term that grows with the length (185 MB for 60 s at 640x640)."""
    _, channels, _, h, w = start_latent.shape
    out = torch.empty((1, channels, total_latent_frames(sections, lws), h, w), dtype=torch.float32)
    filled = 0
    if not inverted:
        out[:, :, :1] = start_latent
        filled = 1
    # The inverted model generates the end first; its last section carries the start latent.
    for index in reversed(range(sections)) if inverted else range(sections):
        part = jobdir.load_section_latents(index)  # (1, 16, lws or lws + 1, h, w)
        out[:, :, filled : filled + part.shape[2]] = part
        filled += part.shape[2]
    if filled != out.shape[2]:
        raise RuntimeError(f"the job folder holds {filled} latent frames for {sections} sections, "
                           f"expected {out.shape[2]}")
    return out


def _sample_section(settings, transformer, cache, branches, context, noise, sigmas, tdtype, hook, index, sections, started):
    steps = settings.steps
    cache.begin_section(steps)
    step_of = {"positive": 0, "negative": 0}

    def forward(**inputs):
        return forward_velocity(transformer, **inputs)

    def transformer_call(hidden_states, timestep, branch):
        step = step_of[branch]
        step_of[branch] += 1
        return cache(forward, branch=branch, step=step, steps=steps, hidden_states=hidden_states, timestep=timestep,
                     **branches[branch], **context)

    model = make_x0_model(transformer_call, cfg=settings.cfg, rescale=settings.rs, dtype=tdtype)

    def on_step(info):
        hook.framepack_on_step(
            event=StepEvent(index, sections, info["i"], steps, time.perf_counter() - started, denoised=info["denoised"])
        )

    return sample_unipc(model, noise, sigmas, callback=on_step)
