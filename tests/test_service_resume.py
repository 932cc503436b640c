"""Faults with real processes on the tiny model: a worker SIGKILLed mid-job
and another resuming it, the whole server SIGKILLed and restarted, a job
cancelled mid-run and resumed (each bit-identical to an uninterrupted run:
latents and png frames), and a job that kills every worker that takes it,
failed after three with the reasons."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import cli, frames_of, write_killer_plugin
from tests.service_helpers import (TOKEN, Server, db_url, postgres, start_worker, submit,  # noqa: F401  (fixtures)
                                   tiny_settings, wait_for, wait_status)

pytestmark = pytest.mark.slow
WRITERS = 'writers=["mp4", "png"]'


@pytest.fixture(scope="module")
def killer_path(tmp_path_factory):
    return write_killer_plugin(tmp_path_factory.mktemp("killer"))


@pytest.fixture(scope="module")
def reference(tiny_model, test_image, tmp_path_factory):
    """latents and png frames of the job run uninterrupted by the CLI."""
    out = tmp_path_factory.mktemp("reference") / "video.mp4"
    proc = cli(["generate", "--image", test_image, "--prompt", "a wave", "--model", tiny_model, "--size", "64x64",
                "--steps", "1", "--seconds", "1.2", "--window", "3", "--seed", "7", "--profile", "cpu", "--quiet",
                "--output", out, "--set", WRITERS, "--latents-out", out.with_suffix(".safetensors")])
    assert proc.returncode == 0, proc.stderr
    return load_file(str(out.with_suffix(".safetensors")))["latents"], frames_of(out.with_suffix(""))


def job_settings(tiny_model) -> dict:
    return tiny_settings(tiny_model, overrides=[WRITERS], latents_out=True)


def assert_same_as(reference, storage: Path, job: dict) -> None:
    assert job["status"] == "done", job
    out = storage / "jobs" / job["id"] / "out"
    assert "video.safetensors" in job["outputs"] and "video/000000.png" in job["outputs"]
    latents, pngs = reference
    assert torch.equal(load_file(str(out / "video.safetensors"))["latents"], latents)
    np.testing.assert_array_equal(frames_of(out / "video"), pngs)


def test_a_worker_killed_mid_job_is_resumed_by_another(db_url, tmp_path, tiny_model, test_image, killer_path,
                                                       reference):
    """On one SQLite file, and on PostgreSQL as workers on several machines would share it."""
    db, storage = db_url, tmp_path / "storage"
    server = Server(db, storage, "--workers", "0", "--allow-model", str(tiny_model)).start()
    # Both workers kill themselves at the end of section 0; the one that resumes starts after it.
    workers = [start_worker(db, storage, env_extra={"KILL_AFTER": "0"}, pythonpath=killer_path,
                            log=tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        with server.client() as client:
            job_id = submit(client, test_image, job_settings(tiny_model)).json()["id"]
            dead = wait_for(lambda: [w for w in workers if w.poll() is not None], 300, "a worker to die")
            assert [w.returncode for w in dead] == [-signal.SIGKILL]
            job = wait_status(client, job_id)
            assert job["attempts"] == 2 and len(job["failures"]) == 1
            assert "stopped without finishing" in job["failures"][0]["reason"]
            assert [e["data"] for e in _events(db, job_id) if e["kind"] == "resume"] == [{"sections_done": 1}]
            assert_same_as(reference, storage, job)
    finally:
        for w in workers:
            w.kill()
            w.wait()
        server.stop()


def test_the_server_killed_mid_job_and_restarted_resumes_it(tmp_path, tiny_model, test_image, killer_path, reference):
    db, storage = f"sqlite:///{tmp_path / 'queue.sqlite3'}", tmp_path / "storage"
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {"KILL_AFTER": "0", "PAUSE_DIR": str(pause)}
    server = Server(db, storage, "--workers", "1", "--allow-model", str(tiny_model), env_extra=env,
                    pythonpath=killer_path, token=TOKEN).start()
    with server.client() as client:
        job_id = submit(client, test_image, job_settings(tiny_model)).json()["id"]
        waiting = submit(client, test_image, tiny_settings(tiny_model, seed=8), priority=-1).json()["id"]
        wait_for(lambda: (pause / "ready").exists(), 300, "the job to finish section 0")
    worker_pid = int((pause / "ready").read_text())
    server.kill()
    # The worker dies with its server (PR_SET_PDEATHSIG): no orphan keeps the job.
    wait_for(lambda: not Path(f"/proc/{worker_pid}").exists() or _zombie(worker_pid), 10, "the worker to die")

    restarted = Server(db, storage, "--workers", "1", "--allow-model", str(tiny_model), env_extra=env,
                       pythonpath=killer_path, token=TOKEN).start()
    try:
        with restarted.client() as client:
            jobs = {j["id"]: j for j in client.get("/api/jobs").json()["jobs"]}
            assert set(jobs) == {job_id, waiting}  # the queue is intact
            assert jobs[waiting]["status"] in ("queued", "running")
            client.delete(f"/api/jobs/{waiting}")  # not needed here; saves the test a job
            job = wait_status(client, job_id)
            assert job["attempts"] == 2
            assert_same_as(reference, storage, job)
    finally:
        restarted.stop()


def _events(db: str, job_id: str) -> list[dict]:
    from framepack.service.store import JobStore

    return JobStore(db).events(job_id)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_cancel_mid_job_then_resume(tmp_path, tiny_model, test_image, killer_path, reference):
    db, storage = f"sqlite:///{tmp_path / 'queue.sqlite3'}", tmp_path / "storage"
    pause = tmp_path / "pause"
    pause.mkdir()
    server = Server(db, storage, "--workers", "1", "--allow-model", str(tiny_model),
                    env_extra={"KILL_AFTER": "0", "PAUSE_DIR": str(pause)}, pythonpath=killer_path).start()
    try:
        with server.client() as client:
            job_id = submit(client, test_image, job_settings(tiny_model)).json()["id"]
            wait_for(lambda: (pause / "ready").exists(), 300, "the job to finish section 0")
            assert client.delete(f"/api/jobs/{job_id}").json() == {"id": job_id, "status": "cancelling"}
            time.sleep(server.lease_s / 3 * 2)  # the heartbeat sees the request and sets the job's cancel event
            (pause / "go").write_text("")
            job = wait_status(client, job_id)
            assert job["status"] == "cancelled" and "checkpoint is kept" in job["error"]
            assert (storage / "jobs" / job_id / "work" / "checkpoint.safetensors").exists()
            assert client.post(f"/api/jobs/{job_id}/resume").status_code == 200
            assert_same_as(reference, storage, wait_status(client, job_id))
            assert client.get(f"/api/jobs/{job_id}").json()["failures"] == []  # a cancel is no strike
    finally:
        server.stop()


STRIKER = '''
import os, signal
from framepack.hookspecs import hookimpl

@hookimpl
def framepack_on_job_start(event):
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_job_that_kills_its_worker_three_times_fails_with_the_reasons(tmp_path, tiny_model, test_image):
    plugin = tmp_path / "striker"
    plugin.mkdir()
    (plugin / "striker_plugin.py").write_text(textwrap.dedent(STRIKER))
    info = plugin / "striker_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: striker-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[framepack]\nstriker = striker_plugin\n")
    db, storage = f"sqlite:///{tmp_path / 'queue.sqlite3'}", tmp_path / "storage"
    server = Server(db, storage, "--workers", "1", "--allow-model", str(tiny_model), pythonpath=plugin, lease_s=2).start()
    try:
        with server.client() as client:
            job_id = submit(client, test_image, tiny_settings(tiny_model)).json()["id"]
            job = wait_status(client, job_id, timeout=400)
            assert job["status"] == "failed" and job["attempts"] == 3
            assert job["error"].startswith("took down its worker 3 times; not retried again: ")
            assert len(job["failures"]) == 3 and job["error"].count("stopped without finishing") == 3
            # the supervisor restarted the worker each time
            assert wait_for(lambda: client.get("/healthz").json()["local_workers"] == 1, 30, "a live worker")
    finally:
        server.stop()
    assert os.path.exists(storage / "logs" / "server.log")
    assert '"msg": "worker process died; restarting it"' in (storage / "logs" / "server.log").read_text()


def test_a_worker_stopped_with_sigterm_gives_its_job_back(tmp_path, tiny_model, test_image, killer_path):
    db, storage = f"sqlite:///{tmp_path / 'queue.sqlite3'}", tmp_path / "storage"
    pause = tmp_path / "pause"
    pause.mkdir()
    server = Server(db, storage, "--workers", "0", "--allow-model", str(tiny_model)).start()
    worker = start_worker(db, storage, env_extra={"KILL_AFTER": "0", "PAUSE_DIR": str(pause)}, pythonpath=killer_path,
                          log=tmp_path / "worker.log")
    try:
        with server.client() as client:
            job_id = submit(client, test_image, job_settings(tiny_model)).json()["id"]
            wait_for(lambda: (pause / "ready").exists(), 300, "the job to finish section 0")
            worker.terminate()
            assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()
            job = client.get(f"/api/jobs/{job_id}").json()
            assert (job["status"], job["worker"], job["failures"]) == ("queued", None, [])  # no strike
            assert (storage / "jobs" / job_id / "work" / "checkpoint.safetensors").exists()
            kinds = [e["data"] for e in _events(db, job_id) if e["kind"] == "status"]
            assert kinds[-1]["status"] == "queued" and "stopped" in kinds[-1]["reason"]
    finally:
        worker.kill()
        worker.wait()
        server.stop()
