"""`framepack serve`: the REST API (FastAPI on uvicorn) and its local workers.

Endpoints are listed in docs/api.md; OpenAPI is at /docs. Safe by default: it
binds 127.0.0.1; with a token every endpoint but /healthz needs
``Authorization: Bearer <token>``; request bodies over the upload limit get
413 before any of them is parsed; uploads pass the CLI's image checks; job
files are served only by the names the worker recorded, under their job's id;
settings name no server file but the models and LoRAs the operator offers
(client_paths).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path
from typing import Any, Iterable

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from framepack.api import blank_with_a_start
from framepack.errors import UserError
from framepack.service.client_paths import ClientPaths
from framepack.service.jobspec import check_settings
from framepack.service.logs import get_logger
from framepack.service.metrics import CONTENT_TYPE, registry_for, render
from framepack.service.storage import JOB_ID, Storage, UploadTooLarge
from framepack.service.store import TERMINAL, DatabaseBusy, JobNotFound, JobStateError, JobStore

SSE_POLL_S = 0.2
SSE_KEEPALIVE_S = 15.0
PUBLIC_PATHS = ("/healthz",)


class JobPatch(BaseModel):
    priority: int | None = None
    position: int | None = None
    settings: dict[str, Any] | None = None


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whole or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit, send)
        # Read the body first (at most limit + 1 bytes held), then hand it on.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _too_large(self.limit, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _too_large(limit: int, send) -> None:
    body = json.dumps({"detail": f"request body over the upload limit of {limit / 1e6:g} MB "
                                 "(the server's --max-upload-mb)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# The API, its docs and the metrics need the token; the web UI (everything else)
# has its own login page, which asks for the same token.
GUARDED = ("/api/", "/api", "/metrics", "/docs", "/openapi.json", "/redoc")


class BearerAuth:
    """ASGI middleware: every path but /healthz needs the token."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or not scope["path"].startswith(GUARDED):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = b'{"detail":"missing or wrong bearer token (Authorization: Bearer <token>)"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserError(f"--auth {path}: cannot read the token file: {exc.strerror}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UserError(f"--auth {path}: the token must be one line of at least 16 characters without spaces")
    return token


def public(job: dict) -> dict:
    """A job as the API shows it: no server paths."""
    view = {k: job[k] for k in ("id", "status", "priority", "position", "settings", "created_at", "updated_at",
                                "started_at", "finished_at", "worker", "attempts", "failures", "cancel_requested",
                                "progress", "error", "outputs", "stats")}
    view["inputs"] = {k: {"sha256": v["sha256"], "name": v.get("name", "")} for k, v in job["inputs"].items()}
    return view


def create_app(store: JobStore, storage: Storage, *, token: str | None = None, max_upload_mb: float = 50.0,
               supervisor=None, ui_base_url: str | None = None, ui_defaults: dict | None = None,
               models: Iterable[str] = ()) -> FastAPI:
    """The service's app; with ``ui_base_url`` (where this server answers) the
    web UI is mounted at ``/`` as a client of the API there (framepack.ui).
    ``models``: the models a job may name (framepack.service.client_paths)."""
    log = get_logger()
    app = FastAPI(title="framepack render service", version="1",
                  description="Queue FramePack renders, follow them, fetch their files (docs/api.md).")
    metrics = registry_for(store)
    limit = int(max_upload_mb * 1e6)
    client_paths = ClientPaths(models)

    for error, status in ((JobNotFound, 404), (JobStateError, 409), (UploadTooLarge, 413), (DatabaseBusy, 503),
                          (UserError, 422)):
        def handler(request: Request, exc: Exception, status=status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)
        app.add_exception_handler(error, handler)

    def job_or_404(job_id: str) -> dict:
        if not JOB_ID.fullmatch(job_id):
            raise JobNotFound(f"no job {job_id!r}")
        return store.get(job_id)

    @app.post("/api/jobs", status_code=201, summary="Submit a job")
    def submit(settings: str = Form(..., description="JSON object: Pipeline.generate's keywords"),
               image: UploadFile | None = File(None), priority: int = Form(0),
               end_image: UploadFile | None = File(None), keyframes: list[UploadFile] | None = File(None),
               extend: UploadFile | None = File(None)):
        try:
            raw = json.loads(settings)
        except ValueError as exc:
            return JSONResponse({"detail": f"settings: not valid JSON: {exc}"}, status_code=400)
        checked = check_settings(raw)
        client_paths.check(checked)
        keyframes = keyframes or []
        times = checked.get("keyframes", [])
        if len(times) != len(keyframes):
            raise UserError(f"keyframes: {len(times)} time(s) in the settings but {len(keyframes)} image(s) uploaded "
                            "(one 'keyframes' file per time, in the same order)")
        if extend is not None and image is not None:  # the CLI's words for --extend with --image
            raise UserError("extend and image: an extension starts from the video's own frames; leave out image")
        if "blank" in checked and (image is not None or extend is not None):
            raise UserError(blank_with_a_start(checked["blank"]))
        uploads = [("image", image), ("end_image", end_image)] + [(f"keyframe_{i}", k) for i, k in enumerate(keyframes)]
        inputs = {}
        try:
            for field, upload in uploads + [("extend", extend)]:
                if upload is not None:  # no image: text-to-video from the settings' blank start
                    inputs[field] = storage.save_input(upload.file, field, upload.filename, limit,
                                                       video=field == "extend")
        except UploadTooLarge:
            raise
        except UserError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        job_id = store.submit(checked, inputs, priority=priority)
        log.info("job submitted", extra={"job": job_id, "priority": priority})
        return {"id": job_id}

    @app.get("/api/jobs", summary="List jobs (queue order), filtered by status, paginated")
    def list_jobs(status: str | None = None, limit: int = 50, offset: int = 0):
        jobs, total = store.list(status, limit, offset)
        return {"jobs": [public(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    @app.get("/api/jobs/{job_id}", summary="One job: status, progress, error, outputs")
    def get_job(job_id: str):
        return public(job_or_404(job_id))

    @app.patch("/api/jobs/{job_id}", summary="Change a queued job's priority, position or settings")
    def patch_job(job_id: str, body: JobPatch):
        job_or_404(job_id)
        settings = check_settings(body.settings) if body.settings is not None else None
        if settings is not None:
            client_paths.check(settings)
        return public(store.patch(job_id, priority=body.priority, position=body.position, settings=settings))

    @app.delete("/api/jobs/{job_id}", summary="Cancel: a running job stops at the next step and keeps its checkpoint")
    def cancel_job(job_id: str):
        job_or_404(job_id)
        status = store.cancel(job_id)
        log.info("job cancel requested", extra={"job": job_id, "status": status})
        return {"id": job_id, "status": status}

    @app.post("/api/jobs/{job_id}/resume", summary="Queue a cancelled or failed job again, from its checkpoint")
    def resume_job(job_id: str):
        job_or_404(job_id)
        store.resume(job_id)
        return {"id": job_id, "status": "queued"}

    @app.post("/api/jobs/{job_id}/retry", summary="Queue a finished job again, from scratch")
    def retry_job(job_id: str):
        job_or_404(job_id)
        store.retry(job_id)
        return {"id": job_id, "status": "queued"}

    @app.get("/api/jobs/{job_id}/events", summary="Server-Sent Events: status, sections, steps with ETA, preview")
    async def job_events(job_id: str, request: Request):
        await run_in_threadpool(job_or_404, job_id)
        last = request.headers.get("last-event-id", "0")
        after = int(last) if last.isdigit() else 0

        async def stream():
            nonlocal after
            quiet_since = time.monotonic()
            while True:
                events = await run_in_threadpool(store.events, job_id, after)
                for e in events:
                    after = e["id"]
                    yield f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e['data'])}\n\n"
                if events:
                    quiet_since = time.monotonic()
                    continue
                job = await run_in_threadpool(store.get, job_id)
                if job["status"] in TERMINAL and not await run_in_threadpool(store.events, job_id, after):
                    return
                if await request.is_disconnected():
                    return
                if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/jobs/{job_id}/files/{name:path}", summary="An output or the preview (range requests work)")
    def job_file(job_id: str, name: str):
        job = job_or_404(job_id)
        path = storage.file_for(job, name)
        if path is None:
            return JSONResponse({"detail": f"job {job_id} has no file {name!r}"}, status_code=404)
        return FileResponse(path, filename=Path(name).name)

    @app.get("/api/loras", summary="The LoRAs jobs may name: the files in the server's LoRA folder")
    def list_loras():
        from framepack.models.lora_formats import describe_lora_dir

        return {"loras": describe_lora_dir()[1]}  # names, sizes, formats; not the server's folder

    @app.get("/api/presets", summary="Named settings (for a web UI)")
    def list_presets():
        return store.presets()

    @app.put("/api/presets/{name}", summary="Save named settings")
    def put_preset(name: str, settings: dict[str, Any]):
        if not 1 <= len(name) <= 200:
            raise UserError("a preset name is 1 to 200 characters")
        store.put_preset(name, check_settings(settings))
        return {"name": name}

    @app.delete("/api/presets/{name}", summary="Delete named settings")
    def delete_preset(name: str):
        if not store.delete_preset(name):
            return JSONResponse({"detail": f"no preset {name!r}"}, status_code=404)
        return {"name": name}

    @app.get("/healthz", summary="Liveness: the database answers")
    def healthz():
        try:
            snap = store.snapshot()
        except Exception as exc:  # the database is down: say so, for the load balancer
            return JSONResponse({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        local = supervisor.alive() if supervisor is not None else None
        return {"ok": True, "jobs": snap["counts"], "workers_up": snap["workers_up"], "local_workers": local}

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus():
        return Response(render(metrics), media_type=CONTENT_TYPE)

    if ui_base_url is not None:
        from framepack.ui.app import mount_ui
        from framepack.ui.client import ApiClient

        ui_defaults = ui_defaults or {}
        mount_ui(app, ApiClient(ui_base_url, token, cache_dir=storage.root / "ui-cache"), token=token,
                 default_model=ui_defaults.get("model"), default_profile=ui_defaults.get("profile"),
                 check_model=lambda model: client_paths.check({"model": model}))
    wrapped: Any = BodyLimit(app, limit)
    if token is not None:
        wrapped = BearerAuth(wrapped, token)  # outermost: no body is read before the token is checked
    return wrapped


def serve(*, host: str, port: int, workers: int, db: str | None, storage_dir: Path, token_file: Path | None,
          max_upload_mb: float, worker_args: list[str], lease_s: float, ui: bool = True,
          models: Iterable[str] = ()) -> int:
    import uvicorn

    from framepack.service.supervisor import Supervisor

    log = get_logger()
    if max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb {max_upload_mb}: must be positive")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    token = read_token(token_file) if token_file is not None else None
    store = JobStore(db, lease_s=lease_s)
    storage = Storage(storage_dir)
    gpus = _gpu_count() if workers else 0
    supervisor = Supervisor(workers, ["--db", store.url, "--storage", str(storage.root), "--lease-s", str(lease_s),
                                      *worker_args], gpus=gpus)
    # Not a bind address: where the in-process UI client reaches this server (the
    # loopback when it listens on every interface, which only --host asks for).
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ui_base_url = f"http://{'[' + local + ']' if ':' in local else local}:{port}" if ui else None
    # The UI's memory plan is the plan of the job that will run: the workers' model and profile.
    ui_defaults = {flag[2:]: value for flag, value in zip(worker_args, worker_args[1:]) if flag in ("--model", "--profile")}
    app = create_app(store, storage, token=token, max_upload_mb=max_upload_mb, supervisor=supervisor,
                     ui_base_url=ui_base_url, ui_defaults=ui_defaults, models=models)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("listening beyond this machine without --auth: anyone who can reach it can queue jobs",
                    extra={"host": host})
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    supervisor.start()
    log.info("serving", extra={"host": host, "port": port, "workers": workers, "storage": str(storage.root)})
    try:
        server.run()
    finally:
        supervisor.stop()
        store.close()
    return 0


def _gpu_count() -> int:
    """CUDA devices, without importing torch in the server (nvidia-smi, as the hardware probe does)."""
    import os
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
