"""The worker in this process, on the tiny model: a disk that fills during a
section fails that job with the reason and its checkpoint intact, the next job
goes on, and resume finishes the failed one once there is space."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from framepack.output.jobdir import JobDir
from framepack.service.storage import Storage
from framepack.service.store import JobStore
from framepack.service.worker import PipelineRunner, Worker
from tests.jobs import frames_of
from tests.service_helpers import tiny_settings

pytestmark = pytest.mark.slow


def test_a_full_disk_fails_only_that_job_and_resume_finishes_it(tmp_path, tiny_model, test_image, monkeypatch):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    storage = Storage(tmp_path / "storage")
    with open(test_image, "rb") as f:
        entry = storage.save_input(f, "image", test_image.name)
    full = store.submit(tiny_settings(tiny_model), {"image": entry}, priority=1)
    fine = store.submit(tiny_settings(tiny_model, seed=8), {"image": entry})

    real = JobDir.save_section_latents

    def fill_up(self, index, latents):
        if full in str(self.path) and index == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.section_latents_path(index)))
        return real(self, index, latents)

    monkeypatch.setattr(JobDir, "save_section_latents", fill_up)
    worker = Worker(store, PipelineRunner(storage, profile="cpu"), poll_s=0.05)
    assert worker.run(exit_when_idle=True) == 2
    failed, done = store.get(full), store.get(fine)
    assert failed["status"] == "failed" and "the disk is full" in failed["error"]
    assert failed["failures"][0]["reason"] == failed["error"]
    assert (storage.work_dir(full) / "checkpoint.safetensors").exists()
    assert done["status"] == "done" and done["outputs"] == ["video.mp4", "video.json"]

    monkeypatch.setattr(JobDir, "save_section_latents", real)
    store.resume(full)
    worker = Worker(store, PipelineRunner(storage, profile="cpu"), poll_s=0.05)
    assert worker.run(exit_when_idle=True) == 1
    resumed = store.get(full)
    assert resumed["status"] == "done", resumed["error"]
    assert (storage.out_dir(full) / "video.mp4").is_file() and not storage.work_dir(full).exists()
    sections = [e["data"] for e in store.events(full) if e["kind"] == "section" and e["data"]["phase"] == "start"]
    assert [s["index"] for s in sections] == [0, 1, 1, 2]  # the resumed run starts at the lost section


def test_retry_runs_a_done_job_again_from_scratch(tmp_path, tiny_model, test_image):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    storage = Storage(tmp_path / "storage")
    with open(test_image, "rb") as f:
        entry = storage.save_input(f, "image", test_image.name)
    job = store.submit(tiny_settings(tiny_model, seconds=1, window=9), {"image": entry})
    worker = Worker(store, PipelineRunner(storage, profile="cpu"), poll_s=0.05)
    assert worker.run(exit_when_idle=True, max_jobs=1) == 1
    first = frames_of(storage.out_dir(job) / "video.mp4")
    (storage.out_dir(job) / "stale.txt").write_text("from before")
    store.retry(job)
    worker = Worker(store, PipelineRunner(storage, profile="cpu"), poll_s=0.05)  # run() closed the last one
    assert worker.run(exit_when_idle=True) == 1
    again = store.get(job)
    assert again["status"] == "done" and again["attempts"] == 2, again["error"]
    np.testing.assert_array_equal(frames_of(storage.out_dir(job) / "video.mp4"), first)
    assert not (storage.out_dir(job) / "stale.txt").exists()  # from scratch: the old outputs went first


def test_a_job_whose_folder_is_still_in_use_goes_back_to_the_queue(tmp_path, tiny_model, test_image):
    """A worker that lost its lease but still runs holds the job folder's lock: the
    worker that took the job over gives it back instead of failing it."""
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}", lease_s=0.3)
    storage = Storage(tmp_path / "storage")
    with open(test_image, "rb") as f:
        entry = storage.save_input(f, "image", test_image.name)
    job_id = store.submit(tiny_settings(tiny_model), {"image": entry})
    holder = JobDir(storage.work_dir(job_id))
    holder.claim_new()  # the other worker, still working in the folder
    try:
        worker = Worker(store, PipelineRunner(storage, profile="cpu"), name="second")
        worker.run_one(store.claim("second"))
        job = store.get(job_id)
        assert (job["status"], job["failures"]) == ("queued", [])
        assert "another process" in store.events(job_id)[-1]["data"]["reason"]
    finally:
        holder.unlock()


def test_a_failed_jobs_message_names_the_servers_folders_by_label(tmp_path, tiny_model, test_image, monkeypatch):
    loras = tmp_path / "private" / "loras"
    loras.mkdir(parents=True)
    monkeypatch.setenv("FRAMEPACK_LORA_DIR", str(loras))
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    storage = Storage(tmp_path / "storage")
    with open(test_image, "rb") as f:
        entry = storage.save_input(f, "image", test_image.name)
    job_id = store.submit(tiny_settings(tiny_model, loras=["missing"]), {"image": entry})
    Worker(store, PipelineRunner(storage, profile="cpu"), poll_s=0.05).run(exit_when_idle=True)
    job = store.get(job_id)
    assert job["status"] == "failed"
    assert "no such file here or in the LoRA folder <LoRA folder>" in job["error"], job["error"]
    assert str(tmp_path) not in job["error"] and str(tmp_path) not in json.dumps(job["failures"])


def test_hiding_server_paths_keeps_the_inner_folders_label():
    from framepack.service.client_paths import hide_server_paths

    places = {"/srv/fp": "<storage>", "/srv/fp/loras": "<LoRA folder>", "/": "<root>"}
    assert hide_server_paths("cannot read /srv/fp/loras/a.safetensors or /srv/fp/jobs/x",
                             places) == "cannot read <LoRA folder>/a.safetensors or <storage>/jobs/x"
