"""`framepack worker`: claim jobs from the queue and run them one at a time.

A worker holds one warm ``framepack.Pipeline`` (models stay loaded between
jobs). For each claimed job a heartbeat thread renews the lease and watches
for a cancel request, which it turns into the ``threading.Event`` the
pipeline checks at every step. Progress and events go to the store from the
pipeline's ``on_event``.

How a job ends:

- done: the outputs are recorded (names under the job's out/ folder);
- cancelled (DELETE, ``queue cancel``): stopped at the next step, checkpoint kept;
- failed: a bad input or an error, with its message;
- released: the worker itself is stopping (SIGTERM, Ctrl-C); the job goes back
  to the queue and the next worker continues it from its checkpoint;
- lost: the worker died (SIGKILL, OOM, power): its lease runs out and the next
  claim resumes it (framepack.service.store).

The pipeline is one implementation of ``Runner``; the queue tests run the same
worker with a runner that only sleeps.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from framepack.errors import Cancelled, FramepackError
from framepack.service.logs import get_logger
from framepack.service.storage import Storage
from framepack.service.store import DatabaseBusy, JobStore


class JobFolderBusy(FramepackError):
    """Another process still works in the job's folder: a worker that lost its lease
    but has not noticed yet. The job goes back to the queue; that worker stops at
    its next heartbeat and the folder frees up."""


@dataclass
class RunContext:
    cancel: threading.Event
    report: Callable[[str, dict, dict | None], None]  # (kind, data, progress or None)


@dataclass
class RunResult:
    outputs: list[str]
    stats: dict = field(default_factory=dict)


class Runner(Protocol):
    def run(self, job: dict, ctx: RunContext) -> RunResult: ...

    def close(self) -> None: ...


class Worker:
    def __init__(self, store: JobStore, runner: Runner, *, name: str | None = None, gpu: str | None = None,
                 poll_s: float = 0.5) -> None:
        self.store = store
        self.runner = runner
        self.gpu = gpu
        self.name = name or f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpu}" if gpu is not None else "")
        self.poll_s = poll_s
        self.log = get_logger()
        # What clients read of a failure: a runner that knows the server's folders hides them.
        self._public = getattr(runner, "public_text", lambda text: text)

    def run(self, *, exit_when_idle: bool = False, max_jobs: int | None = None) -> int:
        """Claim and run jobs until stopped (KeyboardInterrupt, SIGTERM), or until the
        queue is empty with ``exit_when_idle``. -> the number of jobs run."""
        self.store.register_worker(self.name, socket.gethostname(), os.getpid(), self.gpu)
        self.log.info("worker started", extra={"worker": self.name, "db": _safe_url(self.store.url)})
        ran = 0
        last_seen = 0.0
        try:
            while max_jobs is None or ran < max_jobs:
                try:
                    job = self.store.claim(self.name)
                except DatabaseBusy:  # retried already; keep the warm models and try again later
                    self.log.warning("queue database busy; claiming again shortly", extra={"worker": self.name})
                    time.sleep(self.poll_s * 4)
                    continue
                if job is None:
                    if exit_when_idle:
                        break
                    if time.monotonic() - last_seen > self.store.lease_s / 3:
                        self.store.worker_seen(self.name)  # workers up, for /metrics
                        last_seen = time.monotonic()
                    time.sleep(self.poll_s)
                    continue
                self.run_one(job)
                ran += 1
        except KeyboardInterrupt:
            self.log.info("worker stopping", extra={"worker": self.name})
            _ignore_further_sigterm()  # a second SIGTERM (systemd, a process group) must not cut the cleanup short
        finally:
            try:
                self.store.unregister_worker(self.name)
            finally:
                self.runner.close()
        return ran

    def run_one(self, job: dict) -> None:
        job_id = job["id"]
        cancel = threading.Event()
        lost = threading.Event()
        stop_beat = threading.Event()

        def beat() -> None:
            while not stop_beat.wait(self.store.lease_s / 3):
                try:
                    mine, cancel_requested = self.store.heartbeat(job_id, self.name)
                except Exception:  # a database hiccup: the next beat tries again, the lease has slack
                    self.log.exception("heartbeat failed", extra={"job": job_id})
                    continue
                if not mine:
                    lost.set()
                    cancel.set()
                elif cancel_requested:
                    cancel.set()

        def report(kind: str, data: dict, progress: dict | None = None) -> None:
            if not self.store.report(job_id, self.name, kind, data, progress):
                lost.set()
                cancel.set()

        log_extra = {"job": job_id, "worker": self.name, "attempt": job["attempts"]}
        self.log.info("job claimed", extra=log_extra)
        heartbeat = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
        heartbeat.start()
        try:
            result = self.runner.run(job, RunContext(cancel=cancel, report=report))
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C outside the pipeline's own handling
            self._release(job_id, log_extra)
            raise
        except JobFolderBusy as exc:
            self.store.release(job_id, self.name, self._public(str(exc)))
            self.log.warning("job folder busy; job released", extra={**log_extra, "error": str(exc)})
            time.sleep(self.store.lease_s / 3)  # let the other process notice and stop
        except Cancelled as exc:
            from framepack.pipeline.generate import Interrupted

            if isinstance(exc, Interrupted):  # the worker was told to stop, not the job
                self._release(job_id, log_extra)
                raise KeyboardInterrupt from None
            if lost.is_set():
                self.log.warning("job lost its lease; another worker has it", extra=log_extra)
            else:
                self.store.finish(job_id, self.name, "cancelled",
                                  error="cancelled; its checkpoint is kept (resume continues it)")
                self.log.info("job cancelled", extra=log_extra)
        except FramepackError as exc:
            self.store.finish(job_id, self.name, "failed", error=self._public(str(exc)))
            self.log.warning("job failed", extra={**log_extra, "error": str(exc)})
        except Exception as exc:
            self.store.finish(job_id, self.name, "failed", error=self._public(f"{type(exc).__name__}: {exc}"))
            self.log.exception("job failed with an unexpected error", extra=log_extra)
        else:
            if self.store.finish(job_id, self.name, "done", outputs=result.outputs, stats=result.stats):
                self.log.info("job done", extra={**log_extra, "outputs": result.outputs})
            else:
                self.log.warning("job finished after losing its lease; the other worker's result stands",
                                 extra=log_extra)
        finally:
            stop_beat.set()
            heartbeat.join()

    def _release(self, job_id: str, log_extra: dict) -> None:
        self.store.release(job_id, self.name, f"worker {self.name} stopped; the next worker continues it")
        self.log.info("job released back to the queue", extra=log_extra)


class PipelineRunner:
    """Runs jobs in one warm ``framepack.Pipeline``, job folders in shared storage."""

    def __init__(self, storage: Storage, model: str | None = None, profile: str | None = None,
                 overrides: list[str] | None = None, keep_loaded: str = "auto") -> None:
        from framepack.api import Pipeline

        self.storage = storage
        self.pipe = Pipeline(model=model, profile=profile, overrides=overrides or [], keep_loaded=keep_loaded)
        self.places = _server_places(storage, model)

    def public_text(self, text: str) -> str:
        """A message as clients see it: the server's folders by label (client_paths)."""
        from framepack.service.client_paths import hide_server_paths

        return hide_server_paths(text, self.places)

    def run(self, job: dict, ctx: RunContext) -> RunResult:
        from framepack.output.jobdir import JobDir
        from framepack.service.jobspec import generate_kwargs, partial_name

        job_id = job["id"]
        work, out, preview = self.storage.work_dir(job_id), self.storage.out_dir(job_id), self.storage.preview(job_id)
        if job.get("progress", {}).get("restart"):  # `retry`: start from scratch
            if work.exists():
                JobDir(work).remove()
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        _check_folder_free(work)
        events = EventReporter(ctx.report, preview, out / partial_name(job["settings"]))
        if (work / "checkpoint.safetensors").exists():
            ctx.report("resume", {"sections_done": _sections_done(work)}, None)
            result = self.pipe.resume(work, preview=preview, overwrite=True, on_event=events, cancel=ctx.cancel,
                                      partial_video=True)
        else:
            kwargs = generate_kwargs(job["settings"], out)
            inputs = job["inputs"]
            image = self.storage.input_path(inputs["image"]) if "image" in inputs else None  # None: text-to-video
            if "end_image" in inputs:
                kwargs["end_image"] = self.storage.input_path(inputs["end_image"])
            if "extend" in inputs:  # the uploaded video this job continues
                kwargs["extend"] = self.storage.input_path(inputs["extend"])
            if kwargs.get("keyframes"):
                kwargs["keyframes"] = [(t, self.storage.input_path(inputs[f"keyframe_{i}"]))
                                       for i, t in enumerate(kwargs["keyframes"])]
            result = self.pipe.generate(image=image, job_dir=work, preview=preview, overwrite=True,
                                        on_event=events, cancel=ctx.cancel, partial_video=True, **kwargs)
        steps = sum(result.computed_steps) + sum(result.skipped_steps) if result.computed_steps else 0
        stats = {
            "elapsed_s": result.elapsed_s, "frames": result.frames, "width": result.width, "height": result.height,
            "sections": result.sections, "stage_s": result.stage_s, "loaded": result.loaded,
            "seconds_per_step": result.stage_s.get("sample", 0.0) / steps if steps else None,
            "seconds_per_frame": result.elapsed_s / result.frames if result.frames else None,
            "peak_ram_gb": result.peak_ram_gb, "peak_vram_gb": result.peak_vram_gb,
        }
        return RunResult(outputs=self.storage.output_names(job_id, result.outputs), stats=stats)

    def close(self) -> None:
        self.pipe.close()


def _server_places(storage: Storage, model: str | None) -> dict[str, str]:
    """The server's folders a message may name -> the label clients see, each
    both as given and resolved (a message may carry either)."""
    from framepack.models.lora_formats import lora_dir

    places = {}
    folders = [(storage.root, "<storage>"), (lora_dir(), "<LoRA folder>")]
    if model is not None and Path(model).expanduser().is_dir():
        folders.append((Path(model).expanduser(), "<model>"))
    for folder, label in folders:
        for form in (str(folder), str(Path(folder).resolve())):
            places[form] = label
    return places


def _check_folder_free(work: Path) -> None:
    from framepack.errors import UserError
    from framepack.output.jobdir import JobDir

    if not work.is_dir():
        return
    probe = JobDir(work)
    try:
        probe.lock()
    except UserError as exc:
        raise JobFolderBusy(str(exc)) from None
    probe.unlock()


def _ignore_further_sigterm() -> None:
    import signal

    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: the owner of the signals decides
        pass


def _sections_done(work: Path) -> int:
    return len(list((work / "latents").glob("*.safetensors")))


class EventReporter:
    """The pipeline's events as the job's stream: sections, steps with an ETA, the preview."""

    def __init__(self, report: Callable[[str, dict, dict | None], None], preview: Path,
                 partial: Path | None = None) -> None:
        self.report = report
        self.preview = preview
        self.partial = partial
        self.started = time.monotonic()
        self.total_steps = 0
        self.done_steps = 0
        self.progress: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        from framepack.events import JobStart, SectionEvent, StepEvent

        if isinstance(event, JobStart):
            self.started = time.monotonic()
            self.progress = {"sections": event.sections, "frames": event.frames, "width": event.width,
                             "height": event.height, "section": 0, "step": 0, "steps": 0, "eta_s": None}
            self.report("start", dict(self.progress), dict(self.progress))
        elif isinstance(event, SectionEvent):
            self.progress.update(section=event.index, sections=event.count)
            if event.phase == "end":
                self.progress["computed"] = self.progress.get("computed", 0) + event.computed
                self.progress["skipped"] = self.progress.get("skipped", 0) + event.skipped
                if self.partial is not None and self.partial.exists():
                    self.progress["partial"] = self.partial.name  # the playable video so far
            self.report("section", {"index": event.index, "count": event.count, "phase": event.phase,
                                    "elapsed_s": round(event.elapsed_s, 3)}, dict(self.progress))
        elif isinstance(event, StepEvent):
            self.done_steps += 1
            # steps left in this run: the rest of this section and every section after it
            left = (event.steps - event.step - 1) + (event.sections - event.section - 1) * event.steps
            rate = (time.monotonic() - self.started) / self.done_steps
            eta = round(rate * left, 2)
            self.progress.update(section=event.section, sections=event.sections, step=event.step, steps=event.steps,
                                 eta_s=eta)
            data = {"section": event.section, "sections": event.sections, "step": event.step, "steps": event.steps,
                    "eta_s": eta}
            if self.preview.exists():
                data["preview"] = "files/preview.png"
                self.progress["preview"] = data["preview"]
            self.report("step", data, dict(self.progress))


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url
