"""The section loop: image + prompt -> latents -> frames -> files.

Follows SPEC.md sections 2-4 step by step for both variants. The only
randomness is one CPU generator seeded once per job, from which each section
draws its noise in order, so a seed gives the same latents on every run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framepack.assemble import Engine
from framepack.attention import build_attention
from framepack.buckets import nearest_bucket, resize_and_center_crop
from framepack.config import torch_dtype
from framepack.errors import UserError
from framepack.events import JobEnd, JobStart, SectionEvent, StepEvent
from framepack.hardware import device_present
from framepack.inputs import load_image
from framepack.job import JobSettings
from framepack.models import ModelSource
from framepack.planning import plan_job
from framepack.prompt_cache import PromptCache, encoder_fingerprint
from framepack.sampling import make_x0_model, sample_unipc, section_sigmas
from framepack.sections import (
    FPS,
    HISTORY_SPLIT,
    f1_layout,
    inverted_layout,
    inverted_paddings,
    pixel_frames_per_section,
    section_count,
    total_pixel_frames,
)
from framepack.transformer import SectionContext, forward_velocity, load_transformer
from framepack.video import PixelTimeline
from framepack.writing import check_output_path, partial_path

TEXT_TOKENS = 512  # text embeddings are cropped or zero-padded to this, with a mask
LATENT_CHANNELS = 16


@dataclass
class GenerationResult:
    latents: torch.Tensor  # (1, 16, T, h, w) float32, playback order
    frames: int
    height: int
    width: int
    sections: int
    outputs: list[Path] = field(default_factory=list)
    computed_steps: list[int] = field(default_factory=list)  # transformer calls computed per section
    skipped_steps: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


def crop_or_pad(x: torch.Tensor, length: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, C) -> (1, length, C) zero-padded or cropped, and a bool mask (1, length)."""
    b, n, c = x.shape
    if n >= length:
        return x[:, :length], torch.ones((b, length), dtype=torch.bool, device=x.device)
    y = torch.zeros((b, length, c), dtype=x.dtype, device=x.device)
    mask = torch.zeros((b, length), dtype=torch.bool, device=x.device)
    y[:, :n], mask[:, :n] = x, True
    return y, mask


def image_to_pixels(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) float32 in [-1, 1]."""
    return (torch.from_numpy(image).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]


def target_size(settings: JobSettings, image: np.ndarray) -> tuple[int, int]:
    if settings.size is not None:
        return settings.size
    return nearest_bucket(image.shape[0], image.shape[1], settings.resolution)


def execution_device(engine: Engine) -> torch.device:
    hw = engine.hardware
    if not device_present(hw.device):
        raise UserError(f"FRAMEPACK_HARDWARE simulates a {hw.device} device, which this machine does not have")
    return torch.device(hw.device)


class Writers:
    """All of the job's writers; frames arrive as final chunks, possibly front-first."""

    def __init__(self, engine: Engine, output: Path, width: int, height: int) -> None:
        self.items = []
        self.front_chunks: list[np.ndarray] = []
        try:
            for choice in engine.writers:
                path = output.with_suffix(choice.backend.suffix)
                self.items.append(choice.backend.open(path, FPS, width, height, choice.options))
        except BaseException:
            self.abort()
            raise

    def add(self, frames: np.ndarray, at_front: bool) -> None:
        if not len(frames):
            return
        if at_front:
            # Inverted model: these frames precede everything held so far.
            self.front_chunks.insert(0, frames)
        else:
            for writer in self.items:
                writer.write(frames)

    def close(self) -> list[Path]:
        for chunk in self.front_chunks:
            for writer in self.items:
                writer.write(chunk)
        for writer in self.items:
            writer.close()
        return [w.path for w in self.items]

    def abort(self) -> None:
        for writer in self.items:
            writer.abort()


def save_latents(path: Path, latents: torch.Tensor, settings: JobSettings) -> None:
    from safetensors.torch import save_file

    tmp = partial_path(path)
    meta = {k: str(v) for k, v in settings.to_dict().items()}
    save_file({"latents": latents.float().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def preflight(settings: JobSettings) -> np.ndarray:
    """Check everything the user gave before any model loads; return the image.

    The CLI runs this before it prints the engine report, so a typo in a path
    is the only line the user sees."""
    settings.validate()
    image = load_image(settings.image)
    check_output_path(settings.output)
    if settings.latents_out is not None:
        check_output_path(settings.latents_out)
    ModelSource.from_arg(settings.model, settings.variant)
    return image


@torch.inference_mode()
def generate(settings: JobSettings, engine: Engine, image: np.ndarray | None = None) -> GenerationResult:
    """Run a job. ``image`` is the result of ``preflight(settings)`` when the
    caller already ran it; otherwise the checks run here."""
    started = time.perf_counter()
    if image is None:
        image = preflight(settings)
    height, width = target_size(settings, image)
    output = Path(settings.output).expanduser()
    source = ModelSource.from_arg(settings.model, settings.variant)
    ch = engine.choices
    parts = ("transformer",) + ch["text_encoder"].backend.parts + ch["image_encoder"].backend.parts + ch["vae"].backend.parts
    source.check_parts(parts)
    lws = settings.latent_window_size
    sections = section_count(settings.seconds, lws)
    plan = plan_job(engine, source, height, width, total_pixel_frames(sections, lws), lws, settings.variant == "original")
    device = execution_device(engine)
    dtype = {part: torch_dtype(name) for part, name in engine.profile.dtype.items()}
    hook = engine.hook
    hook.framepack_on_job_start(
        event=JobStart(
            settings=settings,
            profile=engine.profile.name,
            backends={f: c.name for f, c in ch.items()} | {"writers": ",".join(c.name for c in engine.writers)},
            sections=sections,
            frames=total_pixel_frames(sections, lws),
            width=width,
            height=height,
            plan=plan.summary(),
        )
    )

    # Load everything to CPU RAM; the offload policy places it.
    attention = build_attention(ch["attention"].backend, ch["attention"].options)
    quantize = engine.profile.quantize
    prompts = list(dict.fromkeys([settings.prompt] + ([settings.negative_prompt] if settings.cfg != 1 else [])))
    cached, store = _cached_prompts(settings, engine, source, prompts, dtype["text_encoder"])
    missing = [p for p in prompts if p not in cached]
    text = None
    if missing:  # the 16 GB Llama loads only when a prompt is not in the cache
        text = ch["text_encoder"].backend.load(source, ch["text_encoder"].options, dtype["text_encoder"], quantize["text_encoder"])
    vision = ch["image_encoder"].backend.load(source, ch["image_encoder"].options, dtype["image_encoder"], "none")
    vae = ch["vae"].backend.load(source, ch["vae"].options, dtype["vae"], "none")
    vae.set_tiling(engine.profile.vae_tiling)
    transformer = load_transformer(source, dtype["transformer"], attention, quantize["transformer"], device)
    policy = ch["offload"].backend.make_policy(ch["offload"].options, device)
    policy.prepare({**(text.modules if text else {}), **vision.modules, **vae.modules, "transformer": transformer})
    cache = ch["cache"].backend.make_cache(ch["cache"].options)
    cache.bind(transformer)

    cropped = resize_and_center_crop(image, height, width)
    embeddings = dict(cached)
    if text is not None:
        with policy.stage("text_encoder", "text_encoder_2"):
            for prompt in missing:
                embeddings[prompt] = text.encode(prompt)
        store({p: embeddings[p] for p in missing})
        policy.release(*text.modules)  # done with it: its memory goes (16 GB for the real Llama)
        del text
    branches, start_latent = _condition(settings, embeddings, vision, vae, policy, cropped, dtype["transformer"])
    policy.release(*vision.modules)
    del vision

    writers = None
    status, error = "failed", None
    try:
        writers = Writers(engine, output, width, height)
        result = _run_sections(settings, engine, height, width, sections, branches, start_latent, vae, transformer, policy, cache, writers, dtype["transformer"])
        result.outputs = writers.close()
        if settings.latents_out is not None:
            save_latents(Path(settings.latents_out), result.latents, settings)
            result.outputs.append(Path(settings.latents_out))
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        if writers is not None:
            writers.abort()
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if writers is not None:
            writers.abort()
        raise
    finally:
        outputs = tuple(str(p) for p in (result.outputs if status == "done" else []))
        hook.framepack_on_job_end(event=JobEnd(status=status, outputs=outputs, elapsed_s=time.perf_counter() - started, error=error))
    result.elapsed_s = time.perf_counter() - started
    return result


def _cached_prompts(settings, engine, source, prompts, text_dtype):
    """-> (embeddings found in the disk cache, a function that stores new ones)."""
    if not settings.prompt_cache:
        return {}, lambda new: None
    choice = engine.choices["text_encoder"]
    quantize = engine.profile.quantize["text_encoder"]
    cache = PromptCache()

    def fingerprint():
        return encoder_fingerprint(source, choice.name, text_dtype, quantize)

    found = {}
    known = fingerprint()
    if known is not None:
        for prompt in prompts:
            hit = cache.get(PromptCache.key(prompt, known))
            if hit is not None:
                found[prompt] = hit

    def store(new):
        # Hub files are only local after the first load, so ask again now.
        key_base = known or fingerprint()
        if key_base is not None:
            for prompt, (llama, pooler) in new.items():
                cache.put(PromptCache.key(prompt, key_base), llama, pooler, prompt)

    return found, store


def _condition(settings, embeddings, vision, vae, policy, cropped, tdtype):
    """Start latent and image embedding, plus the prompt embeddings already
    computed (SPEC section 2).

    Returns the transformer inputs of each CFG branch and the start latent
    (1, 16, 1, h, w) float32 on the CPU."""
    device = policy.execution_device
    llama, pooler = embeddings[settings.prompt]
    if settings.cfg == 1:
        # No negative pass runs; zeros keep the shapes the original passes.
        llama_n, pooler_n = torch.zeros_like(llama), torch.zeros_like(pooler)
    else:
        llama_n, pooler_n = embeddings[settings.negative_prompt]
    with policy.stage("vae"):
        start_latent = vae.encode(image_to_pixels(cropped)).cpu()
    with policy.stage("image_encoder"):
        image_embeds = vision.encode(cropped)  # (1, N, C)

    def branch(vec, pool):
        vec, mask = crop_or_pad(vec)
        return dict(
            encoder_hidden_states=vec.to(device, tdtype),
            encoder_attention_mask=mask.to(device),
            pooled_projections=pool.to(device, tdtype),
            image_embeds=image_embeds.to(device, tdtype),
            guidance=torch.tensor([settings.gs * 1000.0], device=device).to(tdtype),
        )

    return {"positive": branch(llama, pooler), "negative": branch(llama_n, pooler_n)}, start_latent


def _run_sections(settings, engine, height, width, sections, branches, start_latent, vae, transformer, policy, cache, writers, tdtype):
    started = time.perf_counter()
    hook = engine.hook
    device = policy.execution_device
    lws = settings.latent_window_size
    h, w = height // 8, width // 8

    # --- sections (SPEC section 3) ---
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    sigmas = section_sigmas(settings.steps, lws, h, w).to(device)
    inverted = settings.variant == "original"
    timeline = PixelTimeline(pixel_frames_per_section(lws), "front" if inverted else "back")
    zeros = torch.zeros((1, LATENT_CHANNELS, sum(HISTORY_SPLIT), h, w), dtype=torch.float32)
    history = zeros if inverted else torch.cat([zeros, start_latent], dim=2)
    generated = 0 if inverted else 1
    paddings = inverted_paddings(sections) if inverted else [None] * sections
    result = GenerationResult(latents=torch.empty(0), frames=0, height=height, width=width, sections=sections)

    for index, padding in enumerate(paddings):
        hook.framepack_on_section(event=SectionEvent(index, sections, "start", time.perf_counter() - started))
        if inverted:
            layout = inverted_layout(padding, lws)
            post, clean_2x, clean_4x = history[:, :, : sum(HISTORY_SPLIT)].split(HISTORY_SPLIT, dim=2)
            clean = torch.cat([start_latent, post], dim=2)
        else:
            layout = f1_layout(lws)
            clean_4x, clean_2x, clean_1x = history[:, :, -sum(HISTORY_SPLIT) :].split(HISTORY_SPLIT[::-1], dim=2)
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
            latents = _sample_section(settings, transformer, cache, branches, context, noise, sigmas, tdtype, hook, index, sections, started)
        latents = latents.cpu().float()  # (1, 16, lws, h, w)
        result.computed_steps.append(cache.counts.computed)
        result.skipped_steps.append(cache.counts.skipped)

        if inverted:
            last = padding == 0
            if last:
                latents = torch.cat([start_latent, latents], dim=2)
            generated += latents.shape[2]
            history = torch.cat([latents, history], dim=2)
            real = history[:, :, :generated]
            to_decode = real if index == 0 else real[:, :, : 2 * lws + (1 if last else 0)]
        else:
            generated += latents.shape[2]
            history = torch.cat([history, latents], dim=2)
            real = history[:, :, -generated:]
            to_decode = real if index == 0 else real[:, :, -2 * lws :]
        with policy.stage("vae"):
            pixels = vae.decode(to_decode)
        writers.add(timeline.add(pixels), at_front=inverted)
        hook.framepack_on_section(
            event=SectionEvent(index, sections, "end", time.perf_counter() - started,
                               computed=result.computed_steps[-1], skipped=result.skipped_steps[-1])
        )

    writers.add(timeline.finish(), at_front=inverted)
    result.latents = history[:, :, :generated] if inverted else history[:, :, -generated:]
    result.frames = timeline.final_frames
    return result


def _sample_section(settings, transformer, cache, branches, context, noise, sigmas, tdtype, hook, index, sections, started):
    steps = settings.steps
    cache.begin_section(steps)
    step_of = {"positive": 0, "negative": 0}

    def forward(**inputs):
        return forward_velocity(transformer, **inputs)

    def transformer_call(hidden_states, timestep, branch):
        step = step_of[branch]
        step_of[branch] += 1
        return cache(forward, branch=branch, step=step, steps=steps, hidden_states=hidden_states, timestep=timestep, **branches[branch], **context)

    model = make_x0_model(transformer_call, cfg=settings.cfg, rescale=settings.rs, dtype=tdtype)

    def on_step(info):
        hook.framepack_on_step(
            event=StepEvent(index, sections, info["i"], steps, time.perf_counter() - started, denoised=info["denoised"])
        )

    return sample_unipc(model, noise, sigmas, callback=on_step)
