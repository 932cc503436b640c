"""``framepack.Pipeline``: the engine as a library that runs many jobs warm.

The CLI, the render service and the web UI are clients of this class. A
pipeline assembles an engine per profile and overrides (once), keeps what
the memory plan lets stay loaded between jobs (``framepack.pipeline.warm``),
and runs each job through ``framepack.pipeline.generate``: the same checks,
the same messages (``framepack.UserError``), the same job folder with its
checkpoint. ``close()`` frees every model it holds.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from framepack.errors import UserError
from framepack.hookspecs import hookimpl

# Pipeline.generate's settings, by the name `framepack generate` gives them -> JobSettings field.
SETTINGS = {
    "image": "image", "prompt": "prompt", "negative_prompt": "negative_prompt", "output": "output",
    "variant": "variant", "seconds": "seconds", "steps": "steps", "seed": "seed", "gs": "gs", "cfg": "cfg",
    "rs": "rs", "window": "latent_window_size", "resolution": "resolution", "size": "size",
    "latents_out": "latents_out", "model": "model", "prompt_cache": "prompt_cache", "prompt_blend": "prompt_blend",
    # creative controls (docs/controls.md)
    "end_image": "end_image", "end_strength": "end_strength", "image_embeds": "image_embeds",
    "keyframes": "keyframes", "blank": "blank", "extend": "extend",
    "loras": "loras", "lora_strict": "lora_strict",  # [(path, scale), ...] or "PATH[:SCALE]"; docs/lora.md
}
CONTROL_ONLY = ("prompts",)  # generate() settings that become others: prompts (a file or list) -> prompt
KEEP_CHOICES = ("auto", "all", "none")


class _Listener:
    """``on_event=callable`` as a plugin: every event object the hooks get."""

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self.callback = callback

    @hookimpl
    def framepack_on_job_start(self, event) -> None:
        self.callback(event)

    @hookimpl
    def framepack_on_section(self, event) -> None:
        self.callback(event)

    @hookimpl
    def framepack_on_step(self, event) -> None:
        self.callback(event)

    @hookimpl
    def framepack_on_job_end(self, event) -> None:
        self.callback(event)


class Pipeline:
    """Run framepack jobs in this process, keeping models loaded between them.

    :param model: a local model folder or a hub repo id with its layout (None:
        the original hub repos); a job may name another with ``model=``.
    :param profile: a profile name (None: the one matching this machine).
    :param overrides: ``KEY=VALUE`` strings, as ``--set`` takes them.
    :param config_files: extra profile files, as ``--config``.
    :param plugins: plugin objects registered for every job (listeners, a
        progress reporter, backends).
    :param keep_loaded: what stays loaded between jobs: ``"auto"`` (what the
        memory plan says fits, ``framepack.engine.planning.resident_between_jobs``),
        ``"all"``, ``"none"``, or part names among text, vision, vae, transformer.
    :param on_engine: called with the engine (hardware, profile, choices) of
        each job once its inputs are checked, before anything loads (the CLI
        prints its report from it).
    """

    def __init__(self, model: str | Path | None = None, profile: str | None = None,
                 overrides: Iterable[str] = (), config_files: Iterable[str | Path] = (), *,
                 plugins: Iterable[Any] = (), keep_loaded: str | Iterable[str] = "auto",
                 on_engine: Callable[[Any], None] | None = None) -> None:
        from framepack.pipeline.warm import PARTS, ModelStore

        self.model = None if model is None else str(model)
        self.profile = profile
        self.overrides = list(overrides)
        self.config_files = [Path(p) for p in config_files]
        self.plugins = list(plugins)
        self.on_engine = on_engine
        self.last_engine = None  # the engine of the latest job
        if isinstance(keep_loaded, str) and keep_loaded not in KEEP_CHOICES:
            raise UserError(f"keep_loaded {keep_loaded!r}: must be one of {', '.join(KEEP_CHOICES)} or part names")
        if not isinstance(keep_loaded, str):
            keep_loaded = frozenset(keep_loaded)
            unknown = sorted(keep_loaded - set(PARTS))
            if unknown:
                raise UserError(f"keep_loaded: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
        self.keep_loaded = keep_loaded
        self._engines: dict[tuple, Any] = {}
        self._store = ModelStore()
        self._lock = threading.Lock()  # one job at a time: they share the loaded models
        self._closed = False

    # --- the engine ---------------------------------------------------------------

    def engine(self, profile: str | None = None, overrides: Iterable[str] | None = None):
        """The assembled engine for a profile and overrides (defaults: the pipeline's),
        built once and reused."""
        from framepack.engine.assemble import assemble

        profile = self.profile if profile is None else profile
        overrides = tuple(self.overrides if overrides is None else overrides)
        key = (profile, overrides)
        if key not in self._engines:
            self._engines[key] = assemble(profile, overrides, self.config_files, extra_plugins=self.plugins)
        return self._engines[key]

    # --- jobs --------------------------------------------------------------------------

    def generate(self, image: str | Path | None = None, prompt: str | None = None, *,
                 output: str | Path | None = None, from_: str | Path | None = None,
                 profile: str | None = None, overrides: Iterable[str] | None = None,
                 job_dir: str | Path | None = None, preview: str | Path | None = None, preview_every: int = 1,
                 overwrite: bool = False, on_event: Callable[[Any], None] | None = None,
                 cancel: threading.Event | None = None, partial_video: bool = False, **settings: Any):
        """Run one job and return its ``GenerationResult``.

        Takes every setting ``framepack generate`` takes, under the same names:
        ``negative_prompt``, ``model``, ``variant``, ``seconds``, ``steps``,
        ``seed``, ``gs``, ``cfg``, ``rs``, ``resolution``, ``size`` ("HxW" or
        (H, W)), ``window``, ``latents_out``, ``prompt_cache``, and the creative
        controls of docs/controls.md: ``prompt_blend``, ``prompts`` (a TOML/JSON
        file or a list of {start, end?, prompt}), ``end_image``, ``end_strength``,
        ``image_embeds``, ``keyframes`` ("TIME=IMAGE" strings or (time, image)
        pairs), ``blank`` (the start frame when ``image`` is None), ``extend`` (a
        video to continue by ``seconds``, instead of ``image``); ``from_`` starts
        from a recorded job (a framepack video, sidecar, png folder or latents
        file), its profile and overrides included, with what you give on top.
        ``cancel`` set stops the job at the next step boundary with
        ``framepack.Cancelled`` (its ``job_dir`` continues with ``resume``).
        """
        from framepack.pipeline.settings import JobSettings, parse_size

        unknown = sorted(set(settings) - set(SETTINGS) - set(CONTROL_ONLY))
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(SETTINGS))})")
        prompt = _prompt_of(prompt, settings.pop("prompts", None))
        values: dict[str, Any] = {}
        if from_ is not None:  # the recorded --set overrides first, then the ones given now
            values, recorded_overrides = _recorded(Path(from_))
            overrides = recorded_overrides + list(self.overrides if overrides is None else overrides)
        given = {SETTINGS[k]: v for k, v in settings.items() if v is not None}
        for name, value in (("image", image), ("prompt", prompt), ("output", output)):
            if value is not None:
                given[name] = value
        for key in ("seconds", "gs", "cfg", "rs", "end_strength"):  # as the CLI parses them, so messages match word for word
            if isinstance(given.get(key), int) and not isinstance(given[key], bool):
                given[key] = float(given[key])
        if isinstance(given.get("size"), str):
            given["size"] = parse_size(given["size"])
        if "loras" in given:
            from framepack.pipeline.loras import normalize_loras

            given["loras"] = normalize_loras(given["loras"])
        if given.get("size") is not None:
            given["size"] = tuple(given["size"])
        for key in ("image", "output", "latents_out", "end_image", "extend"):
            if given.get(key) is not None:
                given[key] = Path(given[key])
        if given.get("keyframes") is not None:
            given["keyframes"] = _keyframe_strings(given["keyframes"])
        values.update(given)
        if given.get("blank") is not None and (values.get("image") is not None or values.get("extend") is not None):
            raise UserError(blank_with_a_start(given["blank"]))
        if self.model is not None:
            values.setdefault("model", self.model)
        if values.get("prompt") is None:
            raise UserError("prompt required (or from_ a previous video or its .json)")
        values.setdefault("image", None)  # text-to-video
        if values.get("output") is None:
            import time

            values["output"] = Path(f"framepack_{time.strftime('%Y%m%d_%H%M%S')}_{values.get('seed', 31337)}.mp4")
        job = JobSettings(**values)
        return self._run(job, profile, overrides, job_dir=job_dir, resume=False, preview=preview,
                         preview_every=preview_every, overwrite=overwrite, on_event=on_event, cancel=cancel,
                         partial_video=partial_video)

    def resume(self, job_dir: str | Path, *, preview: str | Path | None = None, preview_every: int = 1,
               overwrite: bool = False, recompute_from: int | None = None,
               on_event: Callable[[Any], None] | None = None, cancel: threading.Event | None = None,
               partial_video: bool = False):
        """Continue a job from its folder (a killed, interrupted or cancelled one);
        the result is bit-identical to an uninterrupted run."""
        from framepack.output.jobdir import JobDir
        from framepack.pipeline.settings import JobSettings, settings_from_metadata

        job = JobDir(job_dir).read_job()
        settings = JobSettings(**settings_from_metadata(job)).validate()
        extra = job.get("extra", {})
        overrides = extra.get("overrides", [])
        files = extra.get("config_files", [])
        if not isinstance(overrides, list) or not isinstance(files, list) or \
                not all(isinstance(x, str) for x in overrides + files) or not isinstance(job.get("profile"), str):
            raise UserError(f"{Path(job_dir) / 'job.json'} is damaged: profile, overrides and config files")
        if [str(Path(f)) for f in files] != [str(p.absolute()) for p in self.config_files]:
            self.config_files = [Path(f) for f in files]  # the job's own profile files
            self._engines.clear()
        return self._run(settings, job["profile"], overrides, job_dir=job_dir, resume=True, preview=preview,
                         preview_every=preview_every, overwrite=overwrite, on_event=on_event, cancel=cancel,
                         recompute_from=recompute_from, partial_video=partial_video)

    def calibrate(self, cache: str, output: str | Path, image: str | Path, prompt: str, *,
                  profile: str | None = None, overrides: Iterable[str] | None = None, **settings: Any) -> dict:
        """Fit a step cache (``"teacache"`` or ``"magcache"``) to this model: run the
        job uncached while recording, write the calibration file ``output``, and
        return its contents (``framepack calibrate``; docs/caches.md)."""
        from framepack.pipeline.calibrate import run_calibration
        from framepack.pipeline.settings import JobSettings, parse_size

        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(SETTINGS))})")
        values = {SETTINGS[k]: v for k, v in settings.items() if v is not None}
        if isinstance(values.get("size"), str):
            values["size"] = parse_size(values["size"])
        values.setdefault("model", self.model)
        job = JobSettings(image=Path(image), prompt=prompt, output=Path("unused.mp4"), **values)
        if self._closed:
            raise UserError("this Pipeline is closed; make a new one")
        with self._lock:
            return run_calibration(job, cache, Path(output), self.profile if profile is None else profile,
                                   list(self.overrides if overrides is None else overrides), self.config_files,
                                   extra_plugins=self.plugins, store=self._store)

    def _run(self, settings, profile, overrides, *, job_dir, resume, preview, preview_every, overwrite, on_event,
             cancel, recompute_from=None, partial_video=False):
        from framepack.output.jobdir import JobDir
        from framepack.pipeline.generate import generate, preflight

        if self._closed:
            raise UserError("this Pipeline is closed; make a new one")
        image = preflight(settings)  # one clear line for a bad input, before anything is assembled
        if preview_every < 1:
            raise UserError(f"--preview-every {preview_every}: must be 1 or more")
        with self._lock:
            engine = self.engine(profile, overrides)
            self.last_engine = engine
            if self.on_engine is not None:
                self.on_engine(engine)
            self._store.keep, self._store.alone = self._resident(engine, settings)
            listeners = []
            if on_event is not None:
                listeners.append(_Listener(on_event))
            if preview is not None:
                from framepack.output.preview import PreviewWriter
                from framepack.output.writing import check_output_path

                listeners.append(PreviewWriter(check_output_path(Path(preview), "--preview"), every=preview_every))
            for listener in listeners:
                engine.plugins.manager.register(listener)
            try:
                return generate(settings, engine, image, jobdir=JobDir(job_dir) if job_dir is not None else None,
                                resume=resume, overrides=list(overrides if overrides is not None else self.overrides),
                                config_files=self.config_files, overwrite=overwrite,
                                preview=Path(preview) if preview is not None else None,
                                recompute_from=recompute_from, store=self._store, cancel=cancel,
                                partial_video=partial_video)
            finally:
                for listener in listeners:
                    engine.plugins.manager.unregister(listener)

    def _resident(self, engine, settings) -> tuple[frozenset, frozenset]:
        from framepack.engine.planning import count_params, resident_between_jobs
        from framepack.models.sources import ModelSource
        from framepack.pipeline.warm import PARTS

        if self.keep_loaded == "all":
            return frozenset(PARTS), frozenset()
        if self.keep_loaded == "none":
            return frozenset(), frozenset()
        if not isinstance(self.keep_loaded, str):
            return self.keep_loaded, frozenset()  # as asked: what is not kept loads beside what is
        params = count_params(ModelSource.from_arg(settings.model, settings.variant))
        return resident_between_jobs(engine.profile, params, engine.hardware)

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Free every model this pipeline holds; it cannot run jobs afterwards."""
        with self._lock:
            self._store.close()
            self._engines.clear()
            self._closed = True
            try:
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
            except ImportError:
                pass

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _recorded(path: Path) -> tuple[dict, list[str]]:
    """(JobSettings fields, --set overrides) of a recorded job, for a re-run: a
    new file unless output is given. The profile is this machine's (or the one
    asked for): profiles describe hardware, the overrides describe the job."""
    from framepack.output.metadata import read_metadata
    from framepack.pipeline.settings import settings_from_metadata

    record = read_metadata(path)
    values = settings_from_metadata(record)
    values.pop("output", None)
    values.pop("latents_out", None)
    extra = record.get("extra", {})
    overrides = extra.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(x, str) for x in overrides):
        raise UserError(f"{path}: framepack metadata is damaged: 'extra.overrides' must be a list of strings")
    return values, overrides


def _prompt_of(prompt, prompts):
    """``prompts`` (a file, or a list of {start, end?, prompt}) as a timed prompt."""
    if prompts is None:
        return prompt
    if prompt is not None:
        raise UserError("give either --prompt or --prompts, not both")
    from framepack.pipeline.prompts_file import load_prompts_file, prompts_from_entries

    if isinstance(prompts, (str, Path)):
        return load_prompts_file(prompts)
    return prompts_from_entries(list(prompts) if isinstance(prompts, tuple) else prompts)


def blank_with_a_start(blank) -> str:
    """The one line for --blank given where the start frame comes from an image or a video."""
    return (f"--blank {blank}: the blank start frame is for text-to-video; with --image or --extend the start "
            "frame is the image's or the video's: leave out --blank")


def _keyframe_strings(keyframes) -> tuple[str, ...]:
    if isinstance(keyframes, (str, Path)):
        keyframes = [keyframes]
    out = []
    for kf in keyframes:
        if isinstance(kf, (tuple, list)) and len(kf) == 2:
            kf = f"{kf[0]}={kf[1]}"
        out.append(str(kf))
    return tuple(out)
