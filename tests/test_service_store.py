"""The queue's rules, on SQLite and on a real PostgreSQL: order by priority
and position, reordering, cancel / resume / retry, leases that run out and
hand the job to the next worker, three strikes, and writes only by the worker
that holds the job. A locked SQLite database is waited for, not failed."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from framepack.errors import UserError
from framepack.service.store import JobNotFound, JobStateError, JobStore
from tests.service_helpers import db_url, postgres  # noqa: F401  (fixtures)


def prompts(store: JobStore, status="queued") -> list[str]:
    return [j["settings"]["prompt"] for j in store.list(status)[0]]


def test_claims_follow_priority_then_position(db_url):
    store = JobStore(db_url)
    ids = {p: store.submit({"prompt": p}, priority=pr) for p, pr in (("a", 0), ("b", 5), ("c", 0), ("d", 5))}
    assert prompts(store) == ["b", "d", "a", "c"]
    store.patch(ids["c"], position=0)  # c jumps ahead of a, within priority 0
    store.patch(ids["a"], priority=9)  # a jumps ahead of everyone
    assert prompts(store) == ["a", "b", "d", "c"]
    claimed = [store.claim("w")["settings"]["prompt"] for _ in range(4)]
    assert claimed == ["a", "b", "d", "c"]
    assert store.claim("w") is None
    assert store.list("running")[1] == 4


def test_only_a_queued_job_can_be_changed(db_url):
    store = JobStore(db_url)
    job = store.submit({"prompt": "a"})
    store.patch(job, settings={"prompt": "b"})
    assert store.get(job)["settings"] == {"prompt": "b"}
    store.claim("w")
    with pytest.raises(JobStateError, match="only a queued job"):
        store.patch(job, priority=1)
    with pytest.raises(JobNotFound):
        store.get("0" * 32)


def test_cancel_resume_and_retry(db_url):
    store = JobStore(db_url)
    queued = store.submit({"prompt": "q"})
    assert store.cancel(queued) == "cancelled"
    with pytest.raises(JobStateError, match="already cancelled"):
        store.cancel(queued)
    store.resume(queued)
    assert store.get(queued)["status"] == "queued"

    running = store.claim("w")["id"]
    assert running == queued  # the resumed job is first in the queue again
    assert store.cancel(running) == "cancelling"  # the worker sees it on its next heartbeat
    assert store.heartbeat(running, "w") == (True, True)
    assert store.finish(running, "w", "cancelled")
    with pytest.raises(JobStateError, match="only a cancelled or failed job can be resumed"):
        store.resume(store.submit({"prompt": "x"}))
    store.resume(running)
    job = store.claim("w2")
    assert (job["id"], job["cancel_requested"], job["progress"]) == (running, False, {})
    assert store.finish(running, "w2", "done", outputs=["video.mp4"])
    with pytest.raises(JobStateError):
        store.resume(running)
    store.retry(running)  # a done job can be run again from scratch
    job = store.get(running)
    assert (job["status"], job["progress"], job["outputs"]) == ("queued", {"restart": True}, [])
    events = [e["data"]["status"] for e in store.events(running) if e["kind"] == "status"]
    assert events == ["queued", "cancelled", "queued", "running", "cancelled", "queued", "running", "done", "queued"]


def test_an_expired_lease_hands_the_job_on_and_three_losses_fail_it(db_url):
    store = JobStore(db_url, lease_s=0.3)
    job = store.submit({"prompt": "crashy"})
    other = store.submit({"prompt": "fine"}, priority=-1)
    for n in range(1, 4):
        claimed = store.claim(f"w{n}")
        assert claimed["id"] == job and claimed["attempts"] == n
        assert len(claimed["failures"]) == n - 1  # each earlier worker's loss, recorded
        time.sleep(0.4)  # w{n} dies: no heartbeat
        assert not store.finish(job, "nobody", "done")
    # The fourth claim finds the third loss: the job fails with every reason, the next job runs.
    assert store.claim("w4")["id"] == other
    failed = store.get(job)
    assert failed["status"] == "failed"
    assert "took down its worker 3 times" in failed["error"]
    assert all(f"worker w{n} stopped without finishing" in failed["error"] for n in (1, 2, 3))


def test_a_worker_that_lost_its_lease_cannot_write(db_url):
    store = JobStore(db_url, lease_s=0.3)
    job = store.submit({"prompt": "a"})
    store.claim("old")
    time.sleep(0.4)
    assert store.claim("new")["id"] == job
    assert store.heartbeat(job, "old") == (False, False)
    assert not store.report(job, "old", "step", {"step": 1}, {"step": 1})
    assert not store.finish(job, "old", "failed", error="late")
    assert store.heartbeat(job, "new") == (True, False)
    assert store.finish(job, "new", "done", outputs=["video.mp4"])
    assert store.get(job)["outputs"] == ["video.mp4"]


def test_a_released_job_is_resumed_by_the_next_worker_without_a_strike(db_url):
    store = JobStore(db_url)
    job = store.submit({"prompt": "a"})
    store.claim("stopping")
    assert store.release(job, "stopping", "SIGTERM")
    again = store.claim("next")
    assert (again["id"], again["failures"], again["attempts"]) == (job, [], 2)


def test_bad_list_arguments_are_user_errors(db_url):
    store = JobStore(db_url)
    with pytest.raises(UserError, match="status 'nope'"):
        store.list("nope")
    with pytest.raises(UserError, match="limit 0"):
        store.list(limit=0)


def test_a_locked_sqlite_database_is_waited_for(tmp_path):
    path = tmp_path / "q.sqlite3"
    store = JobStore(f"sqlite:///{path}")
    store.engine.dispose()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    threading.Timer(1.0, blocker.rollback).start()
    started = time.monotonic()
    job = store.submit({"prompt": "after the lock"})
    assert time.monotonic() - started >= 0.9
    assert store.get(job)["status"] == "queued"
    blocker.close()
