"""The job queue on a database: submit, claim under a lease, heartbeat, finish.

Claiming is atomic. On SQLite the write transaction begins with BEGIN
IMMEDIATE (framepack.service.db), so claims are serialised by the database's
write lock; on PostgreSQL the candidate row is selected ``FOR UPDATE SKIP
LOCKED``, so concurrent claimers each get a different job without waiting on
each other. The same statement serves both: SQLAlchemy renders no FOR UPDATE
on SQLite.

A claimed job carries a lease (``lease_until``) that its worker's heartbeat
renews. A worker that dies (SIGKILL, OOM kill, power loss) stops renewing;
once the lease has run out the job is claimable again and the next worker
resumes it from the checkpoint in its job folder. Each such loss is recorded
in ``failures``; at ``max_lost`` losses the job is failed with the reasons
instead of being handed to yet another worker.

Every write finishes only if the worker still holds the job (same worker,
still running), so a worker that lost its lease can never overwrite the
outcome of the one that took over. A busy or locked database is retried with
back-off (``_retrying``); a transaction either commits whole or not at all.
"""

from __future__ import annotations

import functools
import random
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from framepack.errors import FramepackError, UserError
from framepack.service.db import STATUSES, Job, JobEvent, Preset, Worker, default_url, make_engine, migrate, now

TERMINAL = ("done", "failed", "cancelled")
RETRIES = 12  # about 10 s of back-off in all


class JobNotFound(UserError):
    """No job with that id (HTTP 404)."""


class JobStateError(UserError):
    """The job's status does not allow this (HTTP 409)."""


class DatabaseBusy(FramepackError):
    """The database stayed locked through every retry."""


def _transient(exc: Exception) -> bool:
    """A lock, busy database, serialisation failure or deadlock: worth retrying."""
    text = str(getattr(exc, "orig", exc)).lower()
    if "database is locked" in text or "database is busy" in text or "database table is locked" in text:
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return sqlstate in ("40001", "40P01", "55P03")  # serialization_failure, deadlock_detected, lock_not_available


def _retrying(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        for attempt in range(RETRIES):
            try:
                return method(self, *args, **kwargs)
            except (OperationalError, DBAPIError) as exc:
                if not _transient(exc) or attempt == RETRIES - 1:
                    if _transient(exc):
                        raise DatabaseBusy(f"the queue database stayed busy through {RETRIES} tries: {exc.orig}") from exc
                    raise
                time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))
    return wrapper


class JobStore:
    """The queue in the database at ``url`` (default: SQLite under the user data dir)."""

    def __init__(self, url: str | None = None, *, lease_s: float = 30.0, max_lost: int = 3) -> None:
        if lease_s <= 0:
            raise UserError(f"--lease-s {lease_s}: must be positive")
        self.url = url or default_url()  # as given (str(engine.url) hides the password)
        self.engine = make_engine(self.url)
        self.lease_s = lease_s
        self.max_lost = max_lost
        self._writer = self.engine.execution_options(write=True)  # BEGIN IMMEDIATE on SQLite
        self._migrate()

    @_retrying
    def _migrate(self) -> None:
        migrate(self._writer)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    # --- clients: submit and manage ----------------------------------------------------------

    @_retrying
    def submit(self, settings: dict, inputs: dict | None = None, priority: int = 0) -> str:
        job_id = uuid.uuid4().hex
        t = now()
        with self._write() as s:
            last = s.scalar(select(func.max(Job.position))) or 0
            s.add(Job(id=job_id, status="queued", priority=int(priority), position=last + 1, settings=settings,
                      inputs=inputs or {}, created_at=t, updated_at=t, attempts=0, failures=[], progress={},
                      outputs=[], stats={}, cancel_requested=False))
            s.flush()
            s.add(JobEvent(job_id=job_id, kind="status", data={"status": "queued"}, at=t))
        return job_id

    @_retrying
    def get(self, job_id: str) -> dict:
        with self._read() as s:
            return self._job(s, job_id).to_dict()

    @_retrying
    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """Jobs in queue order (running first, then queued by priority and position, then the rest, newest first)."""
        if status is not None and status not in STATUSES:
            raise UserError(f"status {status!r}: must be one of {', '.join(STATUSES)}")
        if not 1 <= limit <= 1000 or offset < 0:
            raise UserError(f"limit {limit} / offset {offset}: limit must be 1-1000 and offset 0 or more")
        with self._read() as s:
            query = select(Job)
            count = select(func.count()).select_from(Job)
            if status is not None:
                query, count = query.where(Job.status == status), count.where(Job.status == status)
            order = [
                (Job.status != "running"), (Job.status != "queued"), Job.priority.desc(), Job.position,
                Job.created_at.desc(),
            ]
            rows = s.scalars(query.order_by(*order).limit(limit).offset(offset)).all()
            return [r.to_dict() for r in rows], s.scalar(count)

    @_retrying
    def patch(self, job_id: str, *, priority: int | None = None, position: int | None = None,
              settings: dict | None = None) -> dict:
        """Change a queued job: its priority, its place among the queued jobs of its
        priority (0 = next), or its settings (already checked by the caller)."""
        with self._write() as s:
            job = self._job(s, job_id, lock=True)
            if job.status != "queued":
                raise JobStateError(f"job {job_id} is {job.status}; only a queued job can be changed")
            if settings is not None:
                job.settings = settings
            if priority is not None:
                job.priority = int(priority)
            if position is not None:
                if position < 0:
                    raise UserError(f"position {position}: must be 0 or more (0 = next)")
                peers = s.scalars(select(Job).where(Job.status == "queued", Job.priority == job.priority,
                                                    Job.id != job.id).order_by(Job.position)).all()
                order = peers[:position] + [job] + peers[position:]
                for i, each in enumerate(order):
                    each.position = i
                # new jobs go after these
            job.updated_at = now()
            return job.to_dict()

    @_retrying
    def cancel(self, job_id: str) -> str:
        """A queued job is cancelled at once; a running one is asked to stop (its worker
        stops it at the next step and keeps the checkpoint). -> the status now."""
        t = now()
        with self._write() as s:
            job = self._job(s, job_id, lock=True)
            if job.status == "queued":
                job.status, job.finished_at, job.updated_at = "cancelled", t, t
                s.add(JobEvent(job_id=job_id, kind="status", data={"status": "cancelled"}, at=t))
                return "cancelled"
            if job.status == "running":
                job.cancel_requested, job.updated_at = True, t
                return "cancelling"
            raise JobStateError(f"job {job_id} is already {job.status}")

    @_retrying
    def resume(self, job_id: str, *, restart: bool = False) -> None:
        """Queue a cancelled or failed job again: it continues from its checkpoint
        (``restart``: from scratch; a done job can be restarted too)."""
        allowed = ("cancelled", "failed", "done") if restart else ("cancelled", "failed")
        t = now()
        with self._write() as s:
            job = self._job(s, job_id, lock=True)
            if job.status not in allowed:
                verb = "retried" if restart else "resumed"
                raise JobStateError(f"job {job_id} is {job.status}; only a {' or '.join(allowed)} job can be {verb}")
            job.status, job.worker, job.lease_until, job.cancel_requested = "queued", None, None, False
            job.error, job.failures, job.finished_at, job.updated_at = None, [], None, t
            job.progress = {"restart": True} if restart else {}
            if restart:
                job.outputs, job.stats = [], {}
            s.add(JobEvent(job_id=job_id, kind="status", data={"status": "queued", "restart": restart}, at=t))

    def retry(self, job_id: str) -> None:
        self.resume(job_id, restart=True)

    @_retrying
    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]:
        with self._read() as s:
            self._job(s, job_id)
            rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                             .order_by(JobEvent.id).limit(limit)).all()
            return [{"id": e.id, "kind": e.kind, "data": e.data, "at": e.at} for e in rows]

    # --- workers: claim, heartbeat, report, finish -------------------------------------------

    @_retrying
    def claim(self, worker: str) -> dict | None:
        """The next job for ``worker``, marked running under a fresh lease, or None."""
        t = now()
        with self._write() as s:
            while True:
                job = s.scalars(
                    select(Job).where(or_(Job.status == "queued", (Job.status == "running") & (Job.lease_until < t)))
                    .order_by(Job.priority.desc(), Job.position, Job.created_at).limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if job is None:
                    return None
                resumed = job.status == "running"
                if resumed:  # its worker died: record why, and give up after max_lost
                    lost = {"at": t, "worker": job.worker, "attempt": job.attempts,
                            "reason": f"worker {job.worker} stopped without finishing (its lease ran out)"}
                    job.failures = list(job.failures) + [lost]
                    if sum(1 for f in job.failures if f.get("worker")) >= self.max_lost:
                        job.status, job.finished_at, job.updated_at, job.lease_until = "failed", t, t, None
                        job.error = (f"took down its worker {self.max_lost} times; not retried again: "
                                     + "; ".join(f["reason"] for f in job.failures))
                        s.add(JobEvent(job_id=job.id, kind="status", data={"status": "failed", "error": job.error},
                                       at=t))
                        s.flush()
                        continue
                job.status, job.worker, job.lease_until = "running", worker, t + self.lease_s
                job.attempts, job.updated_at = job.attempts + 1, t
                job.started_at = job.started_at or t
                s.add(JobEvent(job_id=job.id, kind="status",
                               data={"status": "running", "worker": worker, "attempt": job.attempts}, at=t))
                s.execute(update(Worker).where(Worker.name == worker).values(job_id=job.id, last_seen=t))
                return job.to_dict()

    @_retrying
    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]:
        """Renew the lease -> (still ours, cancel requested)."""
        t = now()
        with self._write() as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                             .values(lease_until=t + self.lease_s)).rowcount
            s.execute(update(Worker).where(Worker.name == worker).values(last_seen=t))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
            return bool(done), bool(cancel)

    @_retrying
    def report(self, job_id: str, worker: str, kind: str, data: dict, progress: dict | None = None) -> bool:
        """Append an event to the job's stream (and set its progress) while ``worker`` holds it."""
        t = now()
        with self._write() as s:
            values: dict[str, Any] = {"updated_at": t}
            if progress is not None:
                values["progress"] = progress
            held = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                             .values(**values)).rowcount
            if held:
                s.add(JobEvent(job_id=job_id, kind=kind, data=data, at=t))
            return bool(held)

    @_retrying
    def finish(self, job_id: str, worker: str, status: str, *, error: str | None = None,
               outputs: list[str] | None = None, stats: dict | None = None) -> bool:
        """End the job as done, failed or cancelled; False if ``worker`` no longer held it."""
        if status not in TERMINAL:
            raise ValueError(status)
        t = now()
        with self._write() as s:
            job = s.scalars(select(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                            .with_for_update()).first()
            if job is None:
                return False
            job.status, job.finished_at, job.updated_at, job.lease_until = status, t, t, None
            job.error, job.cancel_requested = error, False
            if status == "failed" and error:
                job.failures = list(job.failures) + [{"at": t, "attempt": job.attempts, "reason": error}]
            if outputs is not None:
                job.outputs = list(outputs)
            if stats is not None:
                job.stats = dict(stats)
            data = {"status": status, **({"error": error} if error else {}), **({"outputs": outputs} if outputs else {})}
            s.add(JobEvent(job_id=job_id, kind="status", data=data, at=t))
            s.execute(update(Worker).where(Worker.name == worker).values(job_id=None, last_seen=t))
            return True

    @_retrying
    def release(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue (its worker is stopping); the next
        claim continues it from its checkpoint. Not counted as a strike."""
        t = now()
        with self._write() as s:
            held = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                             .values(status="queued", worker=None, lease_until=None, updated_at=t)).rowcount
            if held:
                s.add(JobEvent(job_id=job_id, kind="status", data={"status": "queued", "reason": reason}, at=t))
            return bool(held)

    @_retrying
    def register_worker(self, name: str, host: str, pid: int, gpu: str | None) -> None:
        t = now()
        with self._write() as s:
            s.merge(Worker(name=name, host=host, pid=pid, gpu=gpu, started_at=t, last_seen=t, job_id=None))

    @_retrying
    def worker_seen(self, name: str) -> None:
        with self._write() as s:
            s.execute(update(Worker).where(Worker.name == name).values(last_seen=now()))

    @_retrying
    def unregister_worker(self, name: str) -> None:
        with self._write() as s:
            worker = s.get(Worker, name)
            if worker is not None:
                s.delete(worker)

    # --- what metrics and the health check read ---------------------------------------------

    @_retrying
    def snapshot(self) -> dict:
        t = now()
        with self._read() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
            workers = s.scalar(select(func.count()).select_from(Worker)
                               .where(Worker.last_seen > t - 2 * self.lease_s)) or 0
            recent = s.scalars(select(Job).where(Job.status == "done").order_by(Job.finished_at.desc()).limit(20)).all()
            return {"counts": {k: counts.get(k, 0) for k in STATUSES}, "oldest_queued_s": t - oldest if oldest else 0.0,
                    "workers_up": workers,
                    "recent": [{"stats": j.stats or {}, "wait_s": (j.started_at or j.created_at) - j.created_at}
                               for j in recent]}

    # --- presets (for a web UI) ---------------------------------------------------------------

    @_retrying
    def put_preset(self, name: str, settings: dict) -> None:
        t = now()
        with self._write() as s:
            preset = s.get(Preset, name)
            if preset is None:
                s.add(Preset(name=name, settings=settings, created_at=t, updated_at=t))
            else:
                preset.settings, preset.updated_at = settings, t

    @_retrying
    def presets(self) -> dict[str, dict]:
        with self._read() as s:
            return {p.name: p.settings for p in s.scalars(select(Preset).order_by(Preset.name))}

    @_retrying
    def delete_preset(self, name: str) -> bool:
        with self._write() as s:
            preset = s.get(Preset, name)
            if preset is not None:
                s.delete(preset)
            return preset is not None

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _job(s: Session, job_id: str, lock: bool = False) -> Job:
        query = select(Job).where(Job.id == job_id)
        job = s.scalars(query.with_for_update() if lock else query).first()
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job
