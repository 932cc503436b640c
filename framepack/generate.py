"""The section loop: image + prompt -> latents -> frames -> files.

Follows SPEC.md sections 2-4 step by step for both variants. The only
randomness is one CPU generator seeded once per job, from which each section
draws its noise in order, so a seed gives the same latents on every run.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framepack.assemble import Engine
from framepack.attention import build_attention
from framepack.buckets import nearest_bucket, resize_and_center_crop
from framepack.config import torch_dtype
from framepack.errors import FramepackError, UserError
from framepack.heap import release_free_heap
from framepack.events import JobEnd, JobStart
from framepack.metadata import build_metadata, container_tags, model_info, sidecar_path, write_sidecar
from framepack.hardware import device_present
from framepack.inputs import load_image
from framepack.job import JobSettings
from framepack.jobdir import JobDir
from framepack.models import ModelSource
from framepack.outputs import SegmentOutputs
from framepack.planning import plan_job
from framepack.prompt_cache import PromptCache, encoder_fingerprint
from framepack.section_loop import run_sections
from framepack.sections import FPS, section_count, total_pixel_frames
from framepack.transformer import load_transformer
from framepack.writing import check_output_path

TEXT_TOKENS = 512  # text embeddings are cropped or zero-padded to this, with a mask


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


class Interrupted(FramepackError):
    """Ctrl-C during a job: the checkpoint and a partial video are on disk."""


def _job_record(settings, engine, source, parts, sections, height, width, overrides, config_files) -> dict:
    """Everything needed to re-run or continue the job (framepack.metadata)."""
    return build_metadata(
        settings, engine.profile.name, engine_backends(engine), model_info(source, parts),
        extra={"fps": FPS, "width": width, "height": height, "sections": sections,
               "frames": total_pixel_frames(sections, settings.latent_window_size),
               "overrides": list(overrides), "config_files": [str(p) for p in config_files]},
    )


def engine_backends(engine: Engine) -> dict[str, str]:
    names = {family: choice.name for family, choice in engine.choices.items()}
    names["writers"] = ",".join(c.name for c in engine.writers)
    names["dtype"] = json.dumps(engine.profile.dtype, sort_keys=True)
    names["quantize"] = json.dumps(engine.profile.quantize, sort_keys=True)
    return names


def check_resumable(recorded: dict, current: dict) -> None:
    """Refuse to continue a job with other weights or other backends: the
    rest of the video would not match its beginning."""
    if recorded.get("model", {}).get("fingerprint") != current["model"]["fingerprint"]:
        raise UserError(
            f"the model files changed since this job started ({recorded.get('model', {}).get('source')}); "
            "its checkpoint cannot continue with other weights"
        )
    changed = [f"{k}: {recorded['backends'].get(k)} -> {v}" for k, v in current["backends"].items()
               if recorded["backends"].get(k) != v]
    if changed:
        raise UserError("this job would continue with other backends than it started with (" + "; ".join(changed)
                        + "); run it where it started, or start over")


@torch.inference_mode()
def generate(settings: JobSettings, engine: Engine, image: np.ndarray | None = None, *,
             jobdir: JobDir | None = None, resume: bool = False,
             overrides: list[str] = (), config_files: list = ()) -> GenerationResult:
    """Run a job, or continue one (``resume``) from its job folder.

    ``image`` is the result of ``preflight(settings)`` when the caller already
    ran it. A crash loses at most the section in flight: every finished
    section is in the job folder (``OUTPUT.job/`` unless given), which
    ``framepack resume`` continues. The folder is removed when the outputs
    are complete."""
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

    jobdir = jobdir or JobDir.for_output(output)
    record = _job_record(settings, engine, source, parts, sections, height, width, overrides, config_files)
    checkpoint = None
    if resume:
        recorded = jobdir.read_job()
        check_resumable(recorded, record)
        checkpoint = jobdir.read_checkpoint()
        record = recorded  # the outputs describe the job as it started
    elif jobdir.checkpoint_path.exists():
        jobdir.create(record)  # refuses: an unfinished job is there (checked before loading anything)

    hook = engine.hook
    hook.framepack_on_job_start(
        event=JobStart(
            settings=settings,
            profile=engine.profile.name,
            backends=engine_backends(engine),
            sections=sections,
            frames=total_pixel_frames(sections, lws),
            width=width,
            height=height,
            plan=plan.summary(),
        )
    )

    # Each stage's models are loaded to CPU RAM only when the stage comes, and the
    # encoders are dropped before the transformer loads, so the RAM peak is the
    # largest stage (the 13B transformer), not the sum of all models (about 42 GB
    # in bf16/fp16). The offload policy places what each stage loads.
    quantize = engine.profile.quantize
    policy = ch["offload"].backend.make_policy(ch["offload"].options, device)
    prompts = list(dict.fromkeys([settings.prompt] + ([settings.negative_prompt] if settings.cfg != 1 else [])))
    cached, store = _cached_prompts(settings, engine, source, prompts, dtype["text_encoder"])
    missing = [p for p in prompts if p not in cached]
    embeddings = dict(cached)
    if missing:  # the 16 GB Llama loads only when a prompt is not in the cache
        text = ch["text_encoder"].backend.load(source, ch["text_encoder"].options, dtype["text_encoder"], quantize["text_encoder"])
        release_free_heap()  # what quantizing on load freed (framepack.heap)
        policy.prepare(text.modules)
        with policy.stage("text_encoder", "text_encoder_2"):
            for prompt in missing:
                embeddings[prompt] = text.encode(prompt)
        store({p: embeddings[p] for p in missing})
        policy.release(*text.modules)  # done with it: its memory goes (16 GB for the real Llama)
        del text
        gc.collect()
        release_free_heap()
    vision = ch["image_encoder"].backend.load(source, ch["image_encoder"].options, dtype["image_encoder"], "none")
    vae = ch["vae"].backend.load(source, ch["vae"].options, dtype["vae"], "none")
    vae.set_tiling(engine.profile.vae_tiling)
    policy.prepare({**vision.modules, **vae.modules})
    cropped = resize_and_center_crop(image, height, width)
    branches, start_latent = _condition(settings, embeddings, vision, vae, policy, cropped, dtype["transformer"])
    policy.release(*vision.modules)
    del vision
    gc.collect()
    release_free_heap()

    attention = build_attention(ch["attention"].backend, ch["attention"].options)
    transformer = load_transformer(source, dtype["transformer"], attention, quantize["transformer"], device)
    policy.prepare({"transformer": transformer})
    cache = ch["cache"].backend.make_cache(ch["cache"].options)
    cache.bind(transformer)
    if checkpoint is not None and not torch.equal(start_latent, checkpoint.start_latent):
        raise UserError("the start image encodes differently than when this job started "
                        "(another image, VAE or machine); its checkpoint cannot continue")

    if not resume:
        jobdir.create(record)  # only now: an interruption while loading leaves nothing behind
    outputs = SegmentOutputs(engine, jobdir, output, width, height, settings.variant == "original")
    metadata = container_tags(record)
    status, error = "failed", None
    written: list[Path] = []
    try:
        loop = run_sections(settings, engine, sections, height, width, branches, start_latent, vae, transformer,
                            policy, cache, outputs, jobdir, checkpoint, dtype["transformer"])
        written = outputs.join(loop.segments, metadata) + outputs.save_latents(loop.latents, metadata)
        if settings.latents_out is not None:
            # The same file the `latents` writer makes, at the user's path.
            engine.registry.get("writer", "latents").backend.save(Path(settings.latents_out), loop.latents, metadata, None)
            written.append(Path(settings.latents_out))
        write_sidecar(sidecar_path(output), record)
        written.append(sidecar_path(output))
        jobdir.remove()
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise Interrupted(_interrupted_message(jobdir, outputs, metadata)) from None
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if not jobdir.checkpoint_path.exists():
            jobdir.remove()  # nothing finished: nothing to resume
        raise
    finally:
        hook.framepack_on_job_end(event=JobEnd(status=status, outputs=tuple(str(p) for p in written),
                                               elapsed_s=time.perf_counter() - started, error=error))
    return GenerationResult(
        latents=loop.latents, frames=loop.frames, height=height, width=width, sections=sections, outputs=written,
        computed_steps=loop.computed_steps, skipped_steps=loop.skipped_steps,
        elapsed_s=time.perf_counter() - started,
    )


def _interrupted_message(jobdir: JobDir, outputs: SegmentOutputs, metadata: dict[str, str]) -> str:
    """Join what is finished into a playable partial video and say how to go on."""
    if not jobdir.checkpoint_path.exists():
        jobdir.remove()
        return "interrupted before the first section finished; nothing to resume"
    done = jobdir.read_checkpoint()
    partial = []
    if done.segments:
        try:
            partial = outputs.join(done.segments, metadata, partial=True)
        except Exception as exc:  # the checkpoint matters more than the preview
            partial = [f"(partial video failed: {exc})"]
    where = f"; partial video: {', '.join(map(str, partial))}" if partial else ""
    return (f"interrupted after {done.next_section} finished section(s){where}; "
            f"continue with: framepack resume {jobdir.path}")


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


