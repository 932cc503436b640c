"""The section loop of SPEC.md section 3, resumable after every section.

State that later sections need is small: the window of history latents they
read as clean context or decode, the generator's state, and the pixels at
the open edge of the cross-fade. It is checkpointed after each section;
each section's new latents and finished frames are written once, to the job
folder. Memory stays flat however long the video (with glibc's heap kept
from drifting, see framepack.models.heap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from framepack.events import SectionEvent, StepEvent
from framepack.models.heap import fixed_mmap_threshold
from framepack.output.jobdir import Checkpoint, file_digest
from framepack.pipeline.sampling import make_x0_model, sample_unipc, section_sigmas
from framepack.pipeline.sections import (
    HISTORY_SPLIT,
    f1_layout,
    inverted_layout,
    inverted_paddings,
    pixel_frames_per_section,
    total_latent_frames,
)
from framepack.pipeline.transformer import SectionContext, forward_velocity
from framepack.output.timeline import PixelTimeline

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


@dataclass(frozen=True)
class LoopShape:
    """What fixes the loop's bookkeeping: the same for a run, its resume and its replay."""

    sections: int
    lws: int
    h: int  # latent height (pixels / 8)
    w: int
    inverted: bool
    seed: int
    extends: bool = False  # continues a video (framepack.pipeline.extend): its frames come first

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (1, LATENT_CHANNELS, self.lws, self.h, self.w)

    def paddings(self) -> list:
        return inverted_paddings(self.sections) if self.inverted else [None] * self.sections


class LoopState:
    """History window, latent count, noise generator, pixel timeline and the
    files written so far: everything a section changes. One place updates it
    (``advance``), for the loop and for ``replay`` alike."""

    def __init__(self, shape: LoopShape, start_latent: torch.Tensor, end_latent: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, tail: torch.Tensor | None = None) -> None:
        self.shape = shape
        self.head = start_latent.shape[2]  # frames the inverted model's last section carries in front
        # The inverted model's last section decodes 2 * lws + head latents (head > 1 when extending).
        self.keep = max(window_size(shape.lws), 2 * shape.lws + self.head)
        zeros = torch.zeros((1, LATENT_CHANNELS, CONTEXT, shape.h, shape.w), dtype=torch.float32)
        self.history = zeros if shape.inverted else torch.cat([zeros, start_latent], dim=2)
        if end_latent is not None and shape.inverted:  # the end frame: the first section's clean_latents_post
            self.history = torch.cat([end_latent, zeros[:, :, 1:]], dim=2)
        self.generated = 0 if shape.inverted else 1
        self.next_section = 0
        self.segments: list[int] = []
        self.files: dict[str, str] = {}
        self.generator = torch.Generator("cpu").manual_seed(shape.seed)
        self.timeline = PixelTimeline(pixel_frames_per_section(shape.lws), "front" if shape.inverted else "back")
        if context is not None and not shape.inverted:  # F1 extending a video: its latents are the history
            self.history = torch.cat([zeros, context], dim=2)
            self.generated = context.shape[2]
            self.timeline.edge = tail  # the first section's decode fades in from the input's real pixels

    @classmethod
    def from_checkpoint(cls, shape: LoopShape, ck: Checkpoint) -> "LoopState":
        state = cls(shape, ck.start_latent)
        state.history, state.generated, state.next_section = ck.window, ck.generated, ck.next_section
        state.segments, state.files = list(ck.segments), dict(ck.files)
        state.generator.set_state(ck.generator_state)
        state.timeline.edge, state.timeline.final_frames = ck.edge, ck.final_frames
        return state

    def checkpoint(self, start_latent: torch.Tensor) -> Checkpoint:
        return Checkpoint(
            next_section=self.next_section, generated=self.generated, final_frames=self.timeline.final_frames,
            segments=list(self.segments), window=self.history, start_latent=start_latent,
            generator_state=self.generator.get_state(), edge=self.timeline.edge, files=dict(self.files),
        )

    def draw_noise(self) -> torch.Tensor:
        return torch.randn(self.shape.noise_shape, generator=self.generator, device="cpu")

    def context(self, padding, start_latent: torch.Tensor):
        """(index layout, clean 1x latents, 2x, 4x) for the next section (SPEC.md section 3)."""
        lws = self.shape.lws
        if self.shape.inverted:
            layout = inverted_layout(padding, lws, pre=start_latent.shape[2])
            post, clean_2x, clean_4x = self.history[:, :, :CONTEXT].split(HISTORY_SPLIT, dim=2)
            return layout, torch.cat([start_latent, post], dim=2), clean_2x, clean_4x
        layout = f1_layout(lws)
        clean_4x, clean_2x, clean_1x = self.history[:, :, -CONTEXT:].split(HISTORY_SPLIT[::-1], dim=2)
        return layout, torch.cat([start_latent, clean_1x], dim=2), clean_2x, clean_4x

    def advance(self, latents: torch.Tensor, last: bool) -> torch.Tensor:
        """Add a section's latents as saved (the inverted model's last section
        with the start latent in front); return the latents to decode."""
        lws, index = self.shape.lws, self.next_section
        self.generated += latents.shape[2]
        if self.shape.inverted:
            self.history = torch.cat([latents, self.history], dim=2)[:, :, : self.keep]
            real = self.history[:, :, : self.generated]
            decode = real if index == 0 else real[:, :, : 2 * lws + (self.head if last else 0)]
        else:
            self.history = torch.cat([self.history, latents], dim=2)[:, :, -self.keep :]
            real = self.history[:, :, -self.generated :]
            # An extension's first section decodes like a later one: over the input's last latents.
            decode = real if index == 0 and not self.shape.extends else real[:, :, -2 * lws :]
        self.next_section += 1
        return decode


@dataclass
class LoopInputs:
    """What the section loop samples with (built by framepack.pipeline.generate)."""

    settings: Any  # framepack.pipeline.settings.JobSettings
    engine: Any  # framepack.engine.assemble.Engine
    shape: LoopShape
    branches: dict  # CFG branch -> transformer inputs (framepack.pipeline.generate._condition)
    start_latent: torch.Tensor  # (1, 16, 1, h, w) float32, CPU
    vae: Any
    transformer: Any
    policy: Any  # framepack.engine.offload.OffloadPolicy
    cache: Any  # framepack.caching.stepcache.StepCache
    outputs: Any  # framepack.output.outputs.SegmentOutputs
    jobdir: Any  # framepack.output.jobdir.JobDir
    tdtype: torch.dtype
    cancel: Any = None  # a threading.Event: set, the job stops at the next step boundary
    times: Any = None  # framepack.pipeline.warm.StageTimes
    section_branches: list | None = None  # timed prompts: each generation index's positive branch
    section_prompts: list | None = None  # and its {prompt: weight}, for the events
    # Image controls (framepack.pipeline.controls): the end latent in the first 1x history slot,
    # keyframe latents as clean_latents_pre, and per-section image embeddings, by generation index.
    end_latent: torch.Tensor | None = None
    section_pre: dict | None = None
    section_images: list | None = None
    # Set (the container tags): after every finished section the segments so far
    # are joined into the playable partial video, as the original's demo shows it.
    partial_metadata: dict | None = None
    # Extending a video (framepack.pipeline.extend): F1's history from the input's last latents,
    # and the input's last pixel frames, which the new clip's first frames fade in from.
    context_latents: torch.Tensor | None = None
    tail: torch.Tensor | None = None


class CancelRequested(KeyboardInterrupt):
    """Raised at a step boundary once ``cancel`` is set. A KeyboardInterrupt, so
    every path that keeps the checkpoint and joins a partial video for Ctrl-C
    does the same for it."""


def _check_cancel(inp: "LoopInputs") -> None:
    if inp.cancel is not None and inp.cancel.is_set():
        raise CancelRequested()


@fixed_mmap_threshold()  # per-section buffers in their own mmaps: no heap drift (framepack.models.heap)
def run_sections(inp: LoopInputs, state: LoopState) -> LoopResult:
    """Sample sections ``state.next_section`` .. the last, writing each one's
    latents, segments and a checkpoint as it finishes."""
    started = time.perf_counter()
    settings, shape, hook = inp.settings, inp.shape, inp.engine.hook
    device = inp.policy.execution_device
    paddings = shape.paddings()
    sigmas = section_sigmas(settings.steps, shape.lws, shape.h, shape.w).to(device)
    result = LoopResult(latents=torch.empty(0), frames=0, segments=state.segments)

    for index in range(state.next_section, shape.sections):
        padding = paddings[index]
        weights = inp.section_prompts[index] if inp.section_prompts is not None else {settings.prompt: 1.0}
        hook.framepack_on_section(event=SectionEvent(index, shape.sections, "start", time.perf_counter() - started,
                                                     prompts=weights))
        pre = inp.section_pre.get(index, inp.start_latent) if inp.section_pre else inp.start_latent
        layout, clean, clean_2x, clean_4x = state.context(padding, pre)
        context = SectionContext(
            indices_latents=layout.latent.to(device),
            latents_clean=clean.to(device, inp.tdtype),
            indices_latents_clean=layout.clean.to(device),
            latents_history_2x=clean_2x.to(device, inp.tdtype),
            indices_latents_history_2x=layout.clean_2x.to(device),
            latents_history_4x=clean_4x.to(device, inp.tdtype),
            indices_latents_history_4x=layout.clean_4x.to(device),
        ).as_kwargs()

        _check_cancel(inp)
        noise = state.draw_noise().to(device, torch.float32)
        with _timed(inp, "sample"), inp.policy.stage("transformer"):
            latents = _sample_section(inp, context, noise, sigmas, index, started)
        latents = latents.cpu().float()  # (1, 16, lws, h, w)
        result.computed_steps.append(inp.cache.counts.computed)
        result.skipped_steps.append(inp.cache.counts.skipped)

        last = shape.inverted and padding == 0
        if last:
            latents = torch.cat([inp.start_latent, latents], dim=2)
        _finish_section(inp, state, index, latents, last)
        if inp.partial_metadata is not None and state.segments:
            with _timed(inp, "write"):
                inp.outputs.join(list(state.segments), inp.partial_metadata, partial=True)
        hook.framepack_on_section(
            event=SectionEvent(index, shape.sections, "end", time.perf_counter() - started,
                               computed=result.computed_steps[-1], skipped=result.skipped_steps[-1], prompts=weights)
        )

    with _timed(inp, "write"):
        fade_in = inp.tail if shape.extends and shape.inverted else None
        if inp.outputs.add(state.timeline.finish(fade_in), shape.sections):
            state.segments.append(shape.sections)
    result.latents = _final_latents(inp.jobdir, shape.sections, shape.lws, _head_latents(inp), shape.inverted)
    result.frames = state.timeline.final_frames
    return result


def _finish_section(inp: LoopInputs, state: LoopState, index: int, latents: torch.Tensor, last: bool) -> None:
    """Decode, write the segments and the latents, then the checkpoint that lists them."""
    to_decode = state.advance(latents, last)
    with _timed(inp, "decode"), inp.policy.stage("vae"):
        pixels = inp.vae.decode(to_decode)
    with _timed(inp, "write"):
        written = inp.outputs.add(state.timeline.add(pixels), index)
        if written:
            state.segments.append(index)
            state.files.update(written)
        state.files[inp.jobdir.relative(inp.jobdir.section_latents_path(index))] = \
            inp.jobdir.save_section_latents(index, latents)
        inp.jobdir.write_checkpoint(state.checkpoint(inp.start_latent))


def _timed(inp: LoopInputs, stage: str):
    import contextlib

    return inp.times.measure(stage) if inp.times is not None else contextlib.nullcontext()


def replay(inp: LoopInputs, upto: int, rewrite: set[int]) -> LoopState:
    """The loop's state after section ``upto - 1``, rebuilt from the saved
    section latents (already verified) without sampling: the generator draws
    the same noise and the VAE decodes again. Segments in ``rewrite`` are
    written again from the decoded frames; the others are kept as they are.
    A checkpoint for the rebuilt state is written at the end."""
    shape, jobdir = inp.shape, inp.jobdir
    state = LoopState(shape, inp.start_latent, inp.end_latent, inp.context_latents, inp.tail)
    paddings = shape.paddings()
    for index in range(upto):
        state.draw_noise()  # keeps the generator where the loop had it
        latents = jobdir.load_section_latents(index)
        last = shape.inverted and paddings[index] == 0
        to_decode = state.advance(latents, last)
        with inp.policy.stage("vae"):
            frames = state.timeline.add(inp.vae.decode(to_decode))
        rel = jobdir.relative(jobdir.section_latents_path(index))
        state.files[rel] = file_digest(jobdir.section_latents_path(index))
        if not len(frames):
            continue
        state.segments.append(index)
        if index in rewrite:
            state.files.update(inp.outputs.add(frames, index))
        else:
            state.files.update(inp.outputs.digests(index))
    jobdir.write_checkpoint(state.checkpoint(inp.start_latent))
    return state


def _head_latents(inp: LoopInputs) -> torch.Tensor:
    """What comes before the sections' latents: the start latent, or for an
    extension the latents of the input's cross-faded frames (the new clip's
    latents start where its frames do)."""
    if inp.shape.extends and not inp.shape.inverted:
        return inp.context_latents[:, :, -inp.shape.lws :]
    return inp.start_latent


def _final_latents(jobdir, sections, lws, head, inverted) -> torch.Tensor:
    """The video's latents (1, 16, T, h, w) in playback order, filled in from the
    job folder one section at a time: a torch.cat of all sections would hold
    them twice, a term that grows with the length (185 MB for 60 s at 640x640).
    ``head`` comes first: F1 writes it; the inverted model's last section carries it."""
    _, channels, n_head, h, w = head.shape
    out = torch.empty((1, channels, total_latent_frames(sections, lws) - 1 + n_head, h, w), dtype=torch.float32)
    filled = 0
    if not inverted:
        out[:, :, :n_head] = head
        filled = n_head
    # The inverted model generates the end first; its last section carries the start latent.
    for index in reversed(range(sections)) if inverted else range(sections):
        part = jobdir.load_section_latents(index)  # (1, 16, lws or lws + 1, h, w)
        out[:, :, filled : filled + part.shape[2]] = part
        filled += part.shape[2]
    if filled != out.shape[2]:
        raise RuntimeError(f"the job folder holds {filled} latent frames for {sections} sections, "
                           f"expected {out.shape[2]}")
    return out


def _sample_section(inp: LoopInputs, context, noise, sigmas, index, started):
    settings, cache, hook, sections = inp.settings, inp.cache, inp.engine.hook, inp.shape.sections
    steps = settings.steps
    cache.begin_section(steps)
    step_of = {"positive": 0, "negative": 0}

    def forward(**inputs):
        return forward_velocity(inp.transformer, **inputs)

    def transformer_call(hidden_states, timestep, branch):
        step = step_of[branch]
        step_of[branch] += 1
        inputs = inp.branches[branch]
        if branch == "positive" and inp.section_branches is not None:
            inputs = inp.section_branches[index]
        if inp.section_images is not None:  # both branches see the section's image embedding
            inputs = {**inputs, "image_embeds": inp.section_images[index]}
        return cache(forward, branch=branch, step=step, steps=steps, hidden_states=hidden_states, timestep=timestep,
                     **inputs, **context)

    model = make_x0_model(transformer_call, cfg=settings.cfg, rescale=settings.rs, dtype=inp.tdtype)

    def on_step(info):
        hook.framepack_on_step(
            event=StepEvent(index, sections, info["i"], steps, time.perf_counter() - started, denoised=info["denoised"])
        )
        _check_cancel(inp)

    return sample_unipc(model, noise, sigmas, callback=on_step)
