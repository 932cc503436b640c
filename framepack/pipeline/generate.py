"""The section loop: image + prompt -> latents -> frames -> files.

Follows SPEC.md sections 2-4 step by step for both variants. The only
randomness is one CPU generator seeded once per job, from which each section
draws its noise in order, so a seed gives the same latents on every run.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framepack.engine.assemble import Engine, writers_for_output
from framepack.attention.processors import build_attention
from framepack.pipeline.buckets import nearest_bucket, resize_and_center_crop
from framepack.engine.profiles import torch_dtype
from framepack.errors import Cancelled, DiskFull, UserError
from framepack.events import JobEnd, JobStart
from framepack.output.metadata import build_metadata, container_tags, model_info, write_sidecar
from framepack.hardware import PeakMemory, device_present
from framepack.pipeline.inputs import load_image
from framepack.pipeline.settings import JobSettings
from framepack.output.jobdir import Checkpoint, JobDir, file_digest, free_bytes
from framepack.models.fingerprint import fingerprint
from framepack.models.sources import ModelSource
from framepack.notes import note
from framepack.output.outputs import OutputNames, SegmentOutputs, is_frame_folder, name_outputs
from framepack.engine.planning import plan_job
from framepack.models.prompt_cache import PromptCache, encoder_fingerprint
from framepack.pipeline.prompts import parse_timed_prompt, schedule
from framepack.pipeline.blank import blank_image
from framepack.pipeline.extend import carry_input_audio, check_extension, frames_at_30, read_extension
from framepack.pipeline.controls import (build_image_conditioning, check_controls, check_inputs_unchanged,
                                         embed_rule, keyframe_sections)
from framepack.pipeline.loop import CancelRequested, LoopInputs, LoopShape, LoopState, replay, run_sections
from framepack.pipeline.warm import ModelStore, StageTimes
from framepack.pipeline.sections import FPS, section_count, total_pixel_frames
from framepack.pipeline.transformer import load_transformer
from framepack.pipeline.loras import check_loras_unchanged, lora_records, prepare_job_loras, resolve_job_loras
from framepack.output.writing import check_output_path, refuse_overlap

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
    stage_s: dict[str, float] = field(default_factory=dict)  # load, encode, sample, decode, write
    loaded: list[str] = field(default_factory=list)  # model parts loaded for this job (empty when all were warm)
    peak_ram_gb: float = 0.0  # this job's peak resident set
    peak_vram_gb: float | None = None  # on CUDA
    job_dir: Path | None = None  # where the job ran (removed once the outputs were complete)
    settings: JobSettings | None = None  # as it ran: the output is the name actually written


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


def target_size(settings: JobSettings, image: np.ndarray | None, video=None) -> tuple[int, int]:
    if settings.size is not None:
        return settings.size
    if video is not None:  # an extension: the video's bucket (its own size for a framepack video)
        return nearest_bucket(video.height, video.width, settings.resolution)
    if image is None:  # text-to-video: the square bucket
        return nearest_bucket(settings.resolution, settings.resolution, settings.resolution)
    return nearest_bucket(image.shape[0], image.shape[1], settings.resolution)


def execution_device(engine: Engine) -> torch.device:
    hw = engine.hardware
    if not device_present(hw.device):
        raise UserError(f"FRAMEPACK_HARDWARE simulates a {hw.device} device, which this machine does not have")
    return torch.device(hw.device)


def preflight(settings: JobSettings) -> np.ndarray | None:
    """Check everything the user gave before any model loads; return the image
    (None for text-to-video).

    The CLI runs this before it prints the engine report, so a typo in a path
    is the only line the user sees."""
    settings.validate()
    sections = section_count(settings.seconds, settings.latent_window_size)
    prompt_weights(settings, sections)  # bad brackets: one line
    image = None if settings.image is None else load_image(settings.image)
    check_extension(settings)  # --extend: a readable video, long enough, no --image
    check_controls(settings, sections)  # end image and keyframes: readable, and where they land
    check_output_path(settings.output, folder_ok=True)
    if settings.latents_out is not None:
        check_output_path(settings.latents_out)
    ModelSource.from_arg(settings.model, settings.variant)
    return image


def control_images(settings: JobSettings, sections: int) -> dict[str, Path]:
    """The end image and keyframes, labelled for refuse_overlap."""
    images = {f"--keyframe {kf.given}": kf.path for kf in keyframe_sections(settings, sections).values()}
    if settings.end_image is not None:
        images["--end-image"] = settings.end_image
    if settings.extend is not None:
        images["--extend"] = settings.extend
    return images


def prompt_weights(settings: JobSettings, sections: int) -> list[dict[str, float]] | None:
    """{prompt: weight} per generation index for a timed prompt (framepack.pipeline.prompts);
    None for a plain prompt, which runs exactly as before."""
    timed = parse_timed_prompt(settings.prompt)
    if len(timed) == 1 and timed[0].start == 0 and timed[0].end is None:
        if timed[0].text == settings.prompt:
            return None
    per_playback = schedule(timed, sections, settings.latent_window_size, settings.prompt_blend)
    inverted = settings.variant == "original"
    return per_playback[::-1] if inverted else per_playback  # the inverted model generates the end first


class Interrupted(Cancelled):
    """Ctrl-C or SIGTERM during a job: the checkpoint and a partial video are on disk."""


def output_frames(settings: JobSettings, sections: int, video=None) -> int:
    """Frames of the finished video: an extension's input (at 30 fps) comes first, the
    cross-fade shares its last frames, and each section adds 4 * window."""
    if video is None:
        return total_pixel_frames(sections, settings.latent_window_size)
    return frames_at_30(video) + 4 * settings.latent_window_size * sections


def _job_record(settings, engine, source, parts, sections, height, width, overrides, config_files,
                writers, video=None) -> dict:
    """Everything needed to re-run or continue the job (framepack.output.metadata)."""
    extra = {"fps": FPS, "width": width, "height": height, "sections": sections,
             "frames": output_frames(settings, sections, video),
             "overrides": list(overrides), "config_files": [str(Path(p).absolute()) for p in config_files]}
    if video is not None:
        extra["extend_frames"] = frames_at_30(video)  # the input's part of the output, at 30 fps
    record = build_metadata(settings, engine.profile.name, engine_backends(engine, writers),
                            model_info(source, parts), extra=extra)
    if settings.loras:
        record["inputs"]["loras"] = lora_records(settings)  # file name, sha256, scale (resume checks them)
    return record


def engine_backends(engine: Engine, writers=None) -> dict[str, str]:
    names = {family: choice.name for family, choice in engine.choices.items()}
    names["writers"] = ",".join(c.name for c in (engine.writers if writers is None else writers))
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


def disk_estimate(settings: JobSettings, names: OutputNames, sections: int, height: int, width: int,
                  lead_frames: int = 0) -> int:
    """Bytes a job writes at its peak: section latents and the checkpoint, each
    writer's segments, and the joined outputs beside them (video joins copy;
    png joins hard-link). Typical sizes, not bounds: the ENOSPC handler stays."""
    lws = settings.latent_window_size
    h, w = height // 8, width // 8
    frames = total_pixel_frames(sections, lws) + lead_frames
    latents = (sections * lws + 1) * 16 * h * w * 4
    checkpoint = (2 * lws + 1 + 19) * 16 * h * w * 4 + 33 * 3 * height * width * 4
    per_frame = {"png": 1.5 * height * width * 3, "webm": 0.05 * height * width, "mp4": 0.1 * height * width}
    total = latents * (2 if settings.latents_out else 1) + checkpoint
    for choice in names.writers:
        if choice.backend.accepts == "latents":
            total += latents
        else:
            size = per_frame.get(choice.name, height * width * 3) * frames
            total += size if choice.name == "png" else 2 * size
    return int(total)


def _check_disk(settings, names, sections, height, width, folders, lead_frames=0) -> int:
    needed = disk_estimate(settings, names, sections, height, width, lead_frames)
    for folder in folders:
        free = free_bytes(folder)
        if free < needed:
            raise DiskFull(f"not enough disk space in {folder}: this job writes about {needed / 1e6:.0f} MB "
                           f"and {free / 1e6:.0f} MB are free; free some space or write elsewhere")
    return needed


@dataclass(frozen=True)
class ResumePlan:
    """What resume does, decided before anything is computed."""

    checkpoint: Checkpoint | None  # None: rebuilt from the section latents
    start: int  # first section to compute
    rewrite: frozenset[int] = frozenset()  # segments to write again from the latents
    stale: tuple[str, ...] = ()  # files the checkpoint does not list: discarded

    @property
    def replays(self) -> bool:
        return self.checkpoint is None or bool(self.rewrite) or self.start < self.checkpoint.next_section


def plan_resume(jobdir: JobDir, outputs: SegmentOutputs, sections: int, recompute_from: int | None) -> ResumePlan:
    """Check every file the rest of the job needs, before computing anything.

    A segment the checkpoint does not list is discarded and written again; a
    damaged or missing segment is rebuilt from its section's latents (decoded
    again); damaged latents stop the resume with the section that is lost and
    the command that recomputes from there."""
    how = f"framepack resume {jobdir.path} --recompute-from"
    try:
        ck = jobdir.read_checkpoint()
    except UserError as exc:
        if recompute_from is None or not jobdir.checkpoint_path.exists():
            intact = _intact_prefix(jobdir, sections)
            hint = f"; sections 0-{intact - 1} have intact latents: continue with `{how} {intact}`" if intact else ""
            raise UserError(f"{exc}{hint}") from None
        intact = _intact_prefix(jobdir, sections)
        if recompute_from > intact:
            raise UserError(f"--recompute-from {recompute_from}: only sections 0-{intact - 1} have intact latents; "
                            f"use --recompute-from {intact} or lower") from None
        stale = [f for f in jobdir.unlisted(set())
                 if not _section_of(f) < recompute_from or f.startswith("segments/")]
        return ResumePlan(None, recompute_from, frozenset(range(recompute_from)), tuple(stale))
    if not 0 <= ck.next_section <= sections or any(not 0 <= s <= sections for s in ck.segments):
        raise UserError(f"checkpoint {jobdir.checkpoint_path} is damaged: section {ck.next_section} of {sections}")

    def state_of(rel: str) -> str | None:
        path = jobdir.path / rel
        if not path.exists():
            return "missing"
        return None if file_digest(path) == ck.files.get(rel) else "damaged"

    bad_latents = {}
    for index in range(ck.next_section):
        rel = jobdir.relative(jobdir.section_latents_path(index))
        problem = "not listed in the checkpoint" if rel not in ck.files else state_of(rel)
        if problem:
            bad_latents[index] = f"{rel} is {problem}"
    bad_segments = {seg for seg in ck.segments for rel in outputs.segment_files([seg])
                    if rel not in ck.files or state_of(rel)}
    start = ck.next_section if recompute_from is None else recompute_from
    if not 0 <= start <= ck.next_section:
        raise UserError(f"--recompute-from {start}: must be between 0 and {ck.next_section} "
                        f"(the sections this job has finished)")
    if bad_latents and min(bad_latents) < start:
        first = min(bad_latents)
        raise UserError(f"section {first} is lost ({bad_latents[first]}); sections before it are intact: "
                        f"continue with `{how} {first}` to compute it and the rest again")
    listed = set(ck.files) if recompute_from is None else {
        rel for rel in ck.files if _section_of(rel) < start and not rel.startswith("segments/")}
    if recompute_from is not None:
        bad_segments |= set(range(start))  # rebuilt with the timeline; cheap next to sampling
    stale = jobdir.unlisted(listed)
    return ResumePlan(ck, start, frozenset(s for s in bad_segments if s < start), tuple(stale))


def _section_of(rel: str) -> int:
    stem = Path(rel).name.split(".")[0]
    return int(stem) if stem.isdigit() else 1 << 30


def _intact_prefix(jobdir: JobDir, sections: int) -> int:
    """How many sections from the first have latents that pass their own digest."""
    for index in range(sections):
        try:
            jobdir.load_section_latents(index)
        except UserError:
            return index
    return sections


@torch.inference_mode()
def generate(settings: JobSettings, engine: Engine, image: np.ndarray | None = None, *,
             jobdir: JobDir | None = None, resume: bool = False,
             overrides: list[str] = (), config_files: list = (), overwrite: bool = False,
             preview: Path | None = None, recompute_from: int | None = None,
             store: ModelStore | None = None, cancel: threading.Event | None = None,
             partial_video: bool = False) -> GenerationResult:
    """Run a job, or continue one (``resume``) from its job folder.

    ``image`` is the result of ``preflight(settings)`` when the caller already
    ran it. A crash loses at most the section in flight: every finished
    section is in the job folder (``OUTPUT.job/`` unless given), which
    ``framepack resume`` continues. The folder is claimed (marked and
    locked) before anything loads and removed when the outputs are complete.
    ``preview`` is only checked here (the caller writes it). ``store`` holds
    models between jobs (framepack.pipeline.warm; default: a store that
    keeps nothing). ``cancel`` set stops the job at the next step boundary
    with ``framepack.errors.Cancelled``, as Ctrl-C does. ``partial_video``:
    after every section, the video so far as the ``.partial`` file beside
    the output (a UI shows it; it is removed when the job completes)."""
    started = time.perf_counter()
    if image is None:
        image = preflight(settings)
    video = check_extension(settings)
    height, width = target_size(settings, image, video)
    source = ModelSource.from_arg(settings.model, settings.variant)
    ch = engine.choices
    parts = ("transformer",) + ch["text_encoder"].backend.parts + ch["image_encoder"].backend.parts + ch["vae"].backend.parts
    source.check_parts(parts)
    lws = settings.latent_window_size
    sections = section_count(settings.seconds, lws)
    base, writers = writers_for_output(engine, Path(settings.output))
    asked = name_outputs(base, writers, overwrite=True)  # the names as given
    names = name_outputs(base, writers, overwrite)  # the same, or the next free ones
    jobdir = jobdir or JobDir.for_output(names.main)
    for each in (asked, names):
        refuse_overlap(
            {"--output": each.main, **{f"the {c.name} output": each.path(c) for c in each.writers},
             **{"the partial video": p for p in each.partial_paths()}, "the job record": each.sidecar,
             "--latents-out": settings.latents_out, "--preview": preview},
            {"the image": settings.image, **control_images(settings, sections)},
            {"the model folder": source.root, "the job folder": jobdir.path},
        )
    refuse_overlap({"--job-dir": jobdir.path}, {"the image": settings.image, **control_images(settings, sections)},
                   {"the model folder": source.root})
    if settings.latents_out is not None and Path(settings.latents_out).exists() and not overwrite:
        raise UserError(f"--latents-out {settings.latents_out} exists; pass --overwrite to replace it")
    settings = resolve_job_loras(dataclasses.replace(settings, output=names.main), engine.profile)
    loras = prepare_job_loras(settings, source)  # a bad LoRA stops here, before the job folder exists
    store = store or ModelStore()
    # A transformer kept warm holds the LoRAs' pre-merge copies in RAM (framepack.models.lora).
    kept = loras.kept_bytes(source) if "transformer" in store.keep else 0
    plan = plan_job(engine, source, height, width, output_frames(settings, sections, video), lws,
                    settings.variant == "original", head=lws if video is not None else 1, kept_ram_bytes=kept)
    device = execution_device(engine)
    dtype = {part: torch_dtype(name) for part, name in engine.profile.dtype.items()}
    record = _job_record(settings, engine, source, parts, sections, height, width, overrides, config_files,
                         names.writers, video)
    outputs = SegmentOutputs(names, jobdir, width, height, settings.variant == "original", FPS)

    if resume:
        jobdir.claim_existing()
    else:
        jobdir.claim_new()
    status, error, written = "failed", None, []
    try:
        if resume:
            recorded = jobdir.read_job()
            check_resumable(recorded, record)
            check_inputs_unchanged(recorded, record)
            check_loras_unchanged(recorded, record)
            resuming = plan_resume(jobdir, outputs, sections, recompute_from)
            record = recorded  # the outputs describe the job as it started
        else:
            jobdir.write_job(record)
        _check_disk(settings, names, sections, height, width, [jobdir.path, names.main.parent],
                    frames_at_30(video) if video is not None else 0)
        if names.renamed_from is not None:
            note(f"{names.renamed_from} exists; writing {names.main} instead (--overwrite replaces it)")
        with PeakMemory() as peak:
            result = _run(settings, engine, image, source, plan, device, dtype, height, width, sections, outputs,
                          jobdir, record, resuming if resume else None, store, cancel, started,
                          loras, partial_video, video)
        result.peak_ram_gb, result.peak_vram_gb = peak.peak_ram_gb, peak.peak_vram_gb
        written = result.outputs
        status = "done"
        return result
    except KeyboardInterrupt as exc:
        status = "interrupted"
        kind = Cancelled if isinstance(exc, CancelRequested) else Interrupted
        message = _interrupted_message(jobdir, outputs, container_tags(record))
        raise kind(message, jobdir.path if jobdir.checkpoint_path.exists() else None) from None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(_disk_full_message(exc, jobdir, names)) from exc
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if status != "done" and not jobdir.checkpoint_path.exists() and not resume:
            jobdir.remove()  # nothing finished: nothing to resume
        jobdir.unlock()
        engine.hook.framepack_on_job_end(event=JobEnd(status=status, outputs=tuple(str(p) for p in written),
                                                      elapsed_s=time.perf_counter() - started, error=error))


def _run(settings, engine, image, source, plan, device, dtype, height, width, sections, outputs, jobdir, record,
         resuming: ResumePlan | None, store: ModelStore, cancel, started: float, loras,
         partial_video: bool = False, video=None) -> GenerationResult:
    ch, lws = engine.choices, settings.latent_window_size
    times = StageTimes()
    store.take_loaded()
    engine.hook.framepack_on_job_start(
        event=JobStart(
            settings=settings,
            profile=engine.profile.name,
            backends=engine_backends(engine, outputs.names.writers),
            sections=sections,
            frames=output_frames(settings, sections, video),
            width=width,
            height=height,
            plan=plan.summary(),
        )
    )
    if resuming is not None and resuming.stale:
        jobdir.discard(resuming.stale)  # written after the checkpoint by a job that was killed

    # Each stage's models are loaded to CPU RAM only when the stage comes, and the
    # encoders are dropped before the transformer loads (unless the store keeps
    # them: framepack.pipeline.warm), so the RAM peak is the largest stage (the
    # 13B transformer), not the sum of all models (about 42 GB in bf16/fp16). The
    # offload policy places what each stage loads.
    quantize = engine.profile.quantize

    def model_key(*parts: str) -> tuple:
        """Where a stage's parts come from and their fingerprint: the same files
        for another variant (the encoders) give the same key."""
        return tuple(source.location(p) for p in parts), fingerprint(source, parts)

    policy = store.policy_for((ch["offload"].name, ch["offload"].options, str(device)),
                              lambda: ch["offload"].backend.make_policy(ch["offload"].options, device))
    timed = prompt_weights(settings, sections)  # per generation index, or None for one prompt
    if timed is not None:
        playback = timed[::-1] if settings.variant == "original" else timed
        length = 4 * lws / FPS
        note("prompt schedule, snapped to sections: " + "; ".join(
            f"{p * length:.1f}-{(p + 1) * length:.1f} s " + " + ".join(
                t if w == 1 else f"{w:.0%} {t}" for t, w in weights.items())
            for p, weights in enumerate(playback)))
    texts = [settings.prompt] if timed is None else list(dict.fromkeys(t for w in timed for t in w))
    prompts = list(dict.fromkeys(texts + ([settings.negative_prompt] if settings.cfg != 1 else [])))
    cached, store_prompts = _cached_prompts(settings, engine, source, prompts, dtype["text_encoder"])
    missing = [p for p in prompts if p not in cached]
    embeddings = dict(cached)
    text_key = (model_key(*ch["text_encoder"].backend.parts), ch["text_encoder"].name, ch["text_encoder"].options, dtype["text_encoder"],
                quantize["text_encoder"])
    if missing:  # the 16 GB Llama loads only when a prompt is not in the cache
        with times.measure("load"):
            text = store.get("text", text_key, lambda: ch["text_encoder"].backend.load(
                source, ch["text_encoder"].options, dtype["text_encoder"], quantize["text_encoder"]),
                lambda obj: obj.modules)
        with times.measure("encode"), policy.stage("text_encoder", "text_encoder_2"):
            for prompt in missing:
                embeddings[prompt] = text.encode(prompt)
        store_prompts({p: embeddings[p] for p in missing})
        del text
    store.done_with("text")  # its memory goes (16 GB for the real Llama) unless the store keeps it
    with times.measure("load"):
        vision = store.get("vision", (model_key(*ch["image_encoder"].backend.parts), ch["image_encoder"].name, ch["image_encoder"].options,
                                      dtype["image_encoder"]),
                           lambda: ch["image_encoder"].backend.load(source, ch["image_encoder"].options,
                                                                    dtype["image_encoder"], "none"),
                           lambda obj: obj.modules)
        vae = store.get("vae", (model_key(*ch["vae"].backend.parts), ch["vae"].name, ch["vae"].options, dtype["vae"]),
                        lambda: ch["vae"].backend.load(source, ch["vae"].options, dtype["vae"], "none"),
                        lambda obj: obj.modules)
    vae.set_tiling(plan.vae_tiling)  # the plan tiles where an untiled decode would not fit or would set the peak
    extension = None
    if video is not None:  # the input's frames: the leading segment (unless intact), its tail and context
        with times.measure("write"):
            intact = resuming is not None and _lead_intact(outputs, resuming)
            extension = read_extension(settings, video, height, width, None if intact else outputs)
        cropped = extension.last if settings.variant == "original" else extension.first
    elif image is None:
        note(f"no --image: text-to-video from a {settings.blank} start frame")
        cropped = blank_image(settings.blank, height, width, settings.seed)
    else:
        cropped = resize_and_center_crop(image, height, width)
    with times.measure("encode"):
        branches, start_latent, section_branches = _condition(settings, embeddings, vision, vae, policy, cropped,
                                                              dtype["transformer"], timed)
        context_latents = None
        if extension is not None:
            with policy.stage("vae"):
                context_latents = vae.encode(extension.context_pixels()).cpu()
            if settings.variant == "original":  # the inverted model reads them all before each section
                start_latent, context_latents = context_latents, None
        controls = _image_controls(settings, sections, branches, vision, vae, policy, height, width,
                                   dtype["transformer"])
    del vision
    store.done_with("vision")
    checkpoint = resuming.checkpoint if resuming is not None else None
    if checkpoint is not None and not torch.equal(start_latent, checkpoint.start_latent):
        raise UserError("the start frame encodes differently than when this job started "
                        "(another image or video, VAE or machine); its checkpoint cannot continue")

    shape = LoopShape(sections, lws, height // 8, width // 8, settings.variant == "original", settings.seed,
                      extends=extension is not None)
    inputs = LoopInputs(settings, engine, shape, branches, start_latent, vae, None, policy, None, outputs, jobdir,
                        dtype["transformer"], cancel=cancel, times=times, section_branches=section_branches,
                        section_prompts=timed, end_latent=controls.end_latent, section_pre=controls.section_pre,
                        section_images=controls.section_images, context_latents=context_latents,
                        tail=None if extension is None else extension.tail_pixels(lws))
    if resuming is None:
        state = LoopState(shape, start_latent, controls.end_latent, inputs.context_latents, inputs.tail)
    elif resuming.replays:  # rebuild what was damaged, from the section latents, before sampling
        with times.measure("decode"):
            state = replay(inputs, resuming.start, set(resuming.rewrite))
    else:
        state = LoopState.from_checkpoint(shape, checkpoint)
    if extension is not None:  # the leading segment, as written now or verified intact
        state.files.update(lead_digests(outputs))

    with times.measure("load"):
        attention = ch["attention"]
        # Pre-merge copies cost RAM (the touched weights once): only a kept transformer needs them.
        loras.keep_originals = "transformer" in store.keep
        inputs.transformer = store.get(
            "transformer", (model_key("transformer"), dtype["transformer"], quantize["transformer"], attention.name,
                            attention.options, str(device)),
            # LoRAs merge into a fresh model before the offload policy places it; a warm one
            # switches in place (framepack.models.lora) without loading again.
            lambda: loras.merge_into(load_transformer(
                source, dtype["transformer"], build_attention(attention.backend, attention.options),
                quantize["transformer"], device)),
            lambda obj: {"transformer": obj})
        loras.merge_into(inputs.transformer)
    inputs.cache = ch["cache"].backend.make_cache(ch["cache"].options)
    inputs.cache.bind(inputs.transformer)

    metadata = container_tags(record)
    if partial_video:
        inputs.partial_metadata = metadata
    loop = run_sections(inputs, state)
    names = outputs.names
    with times.measure("write"):
        joined = outputs.join(loop.segments, metadata)
        if video is not None:
            carry_input_audio(video, joined, metadata)
        written = joined + outputs.save_latents(loop.latents, metadata)
        if settings.latents_out is not None:
            # The same file the `latents` writer makes, at the user's path.
            engine.registry.get("writer", "latents").backend.save(Path(settings.latents_out), loop.latents,
                                                                  metadata, None)
            written.append(Path(settings.latents_out))
        write_sidecar(names.sidecar, record)
        written.append(names.sidecar)
        for stale in names.partial_paths():  # the partial video of an earlier interruption is superseded
            if stale.is_file():
                stale.unlink()
            elif is_frame_folder(stale):
                shutil.rmtree(stale)
        jobdir.remove()
    store.done_with("vae", "transformer")
    return GenerationResult(
        latents=loop.latents, frames=loop.frames + (extension.lead_frames if extension is not None else 0),
        height=height, width=width, sections=sections, outputs=written,
        computed_steps=loop.computed_steps, skipped_steps=loop.skipped_steps,
        elapsed_s=time.perf_counter() - started, stage_s={k: round(v, 4) for k, v in times.seconds.items()},
        loaded=store.take_loaded(), job_dir=jobdir.path, settings=settings,
    )


def lead_digests(outputs: SegmentOutputs) -> dict[str, str]:
    return {outputs.jobdir.relative(p): file_digest(p) for c in outputs.frame_writers for p in outputs.lead_files(c)}


def _lead_intact(outputs: SegmentOutputs, resuming: ResumePlan) -> bool:
    """resume: an extension's leading segments are on disk as the checkpoint lists them
    (anything else is written again from the input video, which is cheap next to sampling)."""
    ck = resuming.checkpoint
    if ck is None:
        return False
    listed = {rel for rel in ck.files if Path(rel).name.startswith("lead-")}
    return bool(listed) and lead_digests(outputs) == {rel: ck.files[rel] for rel in listed}


def _image_controls(settings, sections, branches, vision, vae, policy, height, width, tdtype):
    """End frame, keyframes and per-section image embeddings (framepack.pipeline.controls)."""

    def encode_latent(cropped):
        with policy.stage("vae"):
            return vae.encode(image_to_pixels(cropped)).cpu()

    def encode_embeds(cropped):
        with policy.stage("image_encoder"):
            return vision.encode(cropped)

    def prepare(path):
        return resize_and_center_crop(load_image(path), height, width)

    controls = build_image_conditioning(settings, sections, branches["positive"]["image_embeds"], prepare,
                                        encode_latent, encode_embeds, policy.execution_device, tdtype)
    if settings.image_embeds is not None and settings.end_image is None and not settings.keyframes:
        note(f"--image-embeds {settings.image_embeds}: no effect without --end-image or --keyframe")
    if controls.weights is not None:
        note(f"image embeddings ({embed_rule(settings)}), by playback section: " + "; ".join(
            " + ".join(f"{w:.0%} {k}" for k, w in weights.items()) for weights in controls.weights[::-1]))
    for p, kf in sorted(keyframe_sections(settings, sections).items()):
        note(f"keyframe {kf.given}: conditions playback section {p} (generation index {sections - 1 - p})")
    return controls


def _disk_full_message(exc: OSError, jobdir: JobDir, names: OutputNames) -> str:
    where = exc.filename or jobdir.path
    free = free_bytes(Path(where))
    if jobdir.checkpoint_path.exists():
        then = f"free some space, then continue with: framepack resume {jobdir.path}"
    else:
        then = "free some space and start again (no section had finished)"
    return f"the disk is full (writing {where}; {free / 1e6:.0f} MB free); {then}"


def _interrupted_message(jobdir: JobDir, outputs: SegmentOutputs, metadata: dict[str, str]) -> str:
    """Join what is finished into a playable partial video and say how to go on."""
    if not jobdir.checkpoint_path.exists():
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


def _condition(settings, embeddings, vision, vae, policy, cropped, tdtype, weights=None):
    """Start latent and image embedding, plus the prompt embeddings already
    computed (SPEC section 2).

    Returns the transformer inputs of each CFG branch, the start latent
    (1, 16, 1, h, w) float32 on the CPU, and for timed prompts (``weights``:
    {prompt: weight} per generation index) each section's positive branch,
    else None."""
    device = policy.execution_device
    texts = [settings.prompt] if weights is None else list(dict.fromkeys(t for w in weights for t in w))
    llama, pooler = embeddings[texts[0]]
    if settings.cfg == 1:
        # No negative pass runs; zeros keep the shapes the original passes.
        llama_n, pooler_n = torch.zeros_like(llama), torch.zeros_like(pooler)
    else:
        llama_n, pooler_n = embeddings[settings.negative_prompt]
    with policy.stage("vae"):
        start_latent = vae.encode(image_to_pixels(cropped)).cpu()
    with policy.stage("image_encoder"):
        image_embeds = vision.encode(cropped)  # (1, N, C)

    def branch(vec, pool, mask=None):
        if mask is None:
            vec, mask = crop_or_pad(vec)
        return dict(
            encoder_hidden_states=vec.to(device, tdtype),
            encoder_attention_mask=mask.to(device),
            pooled_projections=pool.to(device, tdtype),
            image_embeds=image_embeds.to(device, tdtype),
            guidance=torch.tensor([settings.gs * 1000.0], device=device).to(tdtype),
        )

    branches = {"positive": branch(llama, pooler), "negative": branch(llama_n, pooler_n)}
    if weights is None:
        return branches, start_latent, None
    made: dict[tuple, dict] = {}

    def blended(w: dict[str, float]) -> dict:
        key = tuple(sorted(w.items()))
        if key not in made:
            if len(w) == 1:  # one prompt: exactly the untimed inputs
                made[key] = branch(*embeddings[next(iter(w))])
            else:  # lerp the padded Llama embeddings (the mask is their union) and the poolers
                parts = [(crop_or_pad(embeddings[t][0]), embeddings[t][1], x) for t, x in w.items()]
                vec = sum(x * v.float() for (v, _), _, x in parts)
                mask = torch.stack([m for (_, m), _, _ in parts]).any(dim=0)
                pool = sum(x * p.float() for _, p, x in parts)
                made[key] = branch(vec, pool, mask)
        return made[key]

    return branches, start_latent, [blended(w) for w in weights]


