"""`framepack serve`, `framepack worker` and `framepack queue ...`: flags and commands.

``add_parsers`` is called by framepack/cli.py; nothing heavy is imported until
a command runs, so the other commands start as fast as before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_LEASE_S = 30.0


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="URL", help="queue database: sqlite:///PATH (default: under the user data dir) "
                   "or postgresql://USER:PASSWORD@HOST:PORT/DB for several machines")
    p.add_argument("--storage", type=Path, metavar="DIR",
                   help="shared folder for inputs, job folders and outputs (default: under the user data dir)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="default model folder or hub repo id of jobs that name none")
    p.add_argument("--profile", help="profile for jobs that name none (default: the one matching this machine)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="profile override for every job (repeatable)")
    p.add_argument("--lease-s", type=float, default=DEFAULT_LEASE_S,
                   help="seconds a job stays claimed without a heartbeat; a dead worker's job is picked up "
                        f"after this (default {DEFAULT_LEASE_S:g})")


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="run the render service: REST API, queue and local GPU workers (docs/service.md)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--workers", type=int, default=1, help="local worker processes (default 1; 0: API only)")
    s.add_argument("--auth", type=Path, metavar="TOKEN_FILE",
                   help="require Authorization: Bearer <the token in this file> on every endpoint but /healthz")
    s.add_argument("--max-upload-mb", type=float, default=50.0, help="largest request body (default 50; 413 beyond)")
    s.add_argument("--no-ui", dest="ui", action="store_false", help="serve the API only, without the web UI at /")
    s.add_argument("--allow-model", dest="allow_models", action="append", default=[], metavar="FOLDER_OR_REPO",
                   help="a model jobs may name besides --model (repeatable); clients name no other server path")
    _add_store_args(s)
    _add_engine_args(s)

    w = sub.add_parser("worker", help="claim jobs from the queue and render them in one warm pipeline")
    w.add_argument("--gpu", type=int, metavar="N", help="use only this GPU (an index among the visible ones)")
    w.add_argument("--keep-loaded", default="auto", help="what stays loaded between jobs (as Pipeline's keep_loaded)")
    w.add_argument("--exit-when-idle", action="store_true", help="stop when the queue has nothing to claim")
    w.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    _add_store_args(w)
    _add_engine_args(w)

    q = sub.add_parser("queue", help="add, list, cancel, resume or retry jobs in the service's queue (no server needed)")
    qs = q.add_subparsers(dest="queue_action", required=True)
    add = qs.add_parser("add", help="queue a job (the settings of framepack generate)")
    add.add_argument("--image", type=Path, required=True)
    add.add_argument("--prompt", required=True)
    for flag, kind in (("--negative-prompt", str), ("--model", str), ("--variant", str), ("--seconds", float),
                       ("--steps", int), ("--seed", int), ("--gs", float), ("--cfg", float), ("--rs", float),
                       ("--resolution", int), ("--size", str), ("--window", int), ("--prompt-blend", int)):
        add.add_argument(flag, type=kind, default=None, help="as for generate")
    add.add_argument("--output", default=None, help="output file name, e.g. video.webm (default video.mp4)")
    add.add_argument("--latents", action="store_true", help="also write the latents (.safetensors)")
    add.add_argument("--profile", default=None)
    add.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE")
    add.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    ls = qs.add_parser("list", help="the queue, running jobs first")
    ls.add_argument("--status", choices=("queued", "running", "done", "failed", "cancelled"))
    ls.add_argument("--limit", type=int, default=50)
    for name, text in (("show", "one job, as JSON"), ("cancel", "cancel a queued job, or stop a running one"),
                       ("resume", "queue a cancelled or failed job again, from its checkpoint"),
                       ("retry", "queue a finished job again, from scratch")):
        one = qs.add_parser(name, help=text)
        one.add_argument("job_id")
    for each in (add, ls, *[qs.choices[n] for n in ("show", "cancel", "resume", "retry")]):
        _add_store_args(each)
        each.add_argument("--json", action="store_true", help="print JSON on stdout")


def _storage_dir(args) -> Path:
    from framepack.service.db import data_dir

    return args.storage or data_dir() / "service" / "storage"


def _engine_args(args) -> list[str]:
    extra = []
    if args.model:
        extra += ["--model", args.model]
    if args.profile:
        extra += ["--profile", args.profile]
    for item in args.overrides:
        extra += ["--set", item]
    return extra


def _offered_models(args) -> list[str]:
    """The models a client's job may name: --model (else the original hub repos,
    which the workers then use) and every --allow-model."""
    from framepack.models.sources import TRANSFORMER_REPOS

    default = [args.model] if args.model else list(TRANSFORMER_REPOS.values())
    return default + list(args.allow_models)


def cmd_serve(args) -> int:
    from framepack.service.logs import setup_logging
    from framepack.service.server import serve

    storage = _storage_dir(args)
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "logs").mkdir(exist_ok=True)
    setup_logging("server", storage / "logs")
    return serve(host=args.host, port=args.port, workers=args.workers, db=args.db, storage_dir=storage,
                 token_file=args.auth, max_upload_mb=args.max_upload_mb, worker_args=_engine_args(args),
                 lease_s=args.lease_s, ui=args.ui, models=_offered_models(args))


def cmd_worker(args) -> int:
    from framepack.errors import UserError

    if args.gpu is not None:
        # Before torch loads: this process sees only its GPU (as index 0).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [d.strip() for d in visible.split(",")] if visible else None
        if devices is not None and not 0 <= args.gpu < len(devices):
            raise UserError(f"--gpu {args.gpu}: CUDA_VISIBLE_DEVICES={visible} has {len(devices)} device(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[args.gpu] if devices is not None else str(args.gpu)
    from framepack.service.logs import setup_logging
    from framepack.service.storage import Storage
    from framepack.service.store import JobStore
    from framepack.service.worker import PipelineRunner, Worker

    store = JobStore(args.db, lease_s=args.lease_s)
    storage = Storage(_storage_dir(args))
    gpu = None if args.gpu is None else str(args.gpu)
    worker = Worker(store, PipelineRunner(storage, args.model, args.profile, args.overrides, args.keep_loaded), gpu=gpu)
    setup_logging(f"worker-{worker.name}", storage.root / "logs")
    worker.run(exit_when_idle=args.exit_when_idle, max_jobs=args.max_jobs)
    return 0


def cmd_queue(args) -> int:
    from framepack.service.jobspec import check_settings
    from framepack.service.storage import Storage
    from framepack.service.store import JobStore

    store = JobStore(args.db)
    action = args.queue_action
    if action == "add":
        names = ("negative_prompt", "model", "variant", "seconds", "steps", "seed", "gs", "cfg", "rs", "resolution",
                 "size", "window", "prompt_blend", "output", "profile", "overrides")
        raw = {"prompt": args.prompt, **{n: getattr(args, n) for n in names if getattr(args, n) is not None}}
        if args.latents:
            raw["latents_out"] = True
        settings = check_settings(raw)
        storage = Storage(_storage_dir(args))
        from framepack.pipeline.inputs import load_image

        load_image(args.image)  # the CLI's message, naming the user's own path
        with open(args.image, "rb") as f:
            entry = storage.save_input(f, "image", args.image.name)
        job_id = store.submit(settings, {"image": entry}, priority=args.priority)
        print(json.dumps({"id": job_id}) if args.json else job_id)
        return 0
    if action == "list":
        jobs, total = store.list(args.status, args.limit)
        if args.json:
            print(json.dumps({"jobs": jobs, "total": total}, indent=2, default=str))
            return 0
        for j in jobs:
            prog = j["progress"] or {}
            where = f"section {prog.get('section', 0) + 1}/{prog['sections']}" if prog.get("sections") else ""
            print(f"{j['id']}  {j['status']:<9} p{j['priority']:<3} {where:<14} {j['settings'].get('prompt', '')[:50]}")
            if j["error"]:
                print(f"    {j['error']}")
        print(f"{total} job(s)", file=sys.stderr)
        return 0
    if action == "show":
        print(json.dumps(store.get(args.job_id), indent=2, default=str))
        return 0
    if action == "cancel":
        status = store.cancel(args.job_id)
    elif action == "resume":
        store.resume(args.job_id)
        status = "queued"
    else:
        store.retry(args.job_id)
        status = "queued"
    print(json.dumps({"id": args.job_id, "status": status}) if args.json else f"{args.job_id} {status}")
    return 0


COMMANDS = {"serve": cmd_serve, "worker": cmd_worker, "queue": cmd_queue}
