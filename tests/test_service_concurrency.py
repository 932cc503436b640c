"""Several worker processes claiming from one SQLite file, and from one
PostgreSQL server: 200 jobs whose run is a short sleep (the test double for
the pipeline), none run twice, none lost."""

from __future__ import annotations

import subprocess
import sys

from framepack.service.store import JobStore
from tests.service_helpers import db_url, postgres  # noqa: F401  (fixtures)

JOBS = 200
WORKERS = 4


def test_no_job_runs_twice_and_none_is_lost(db_url, tmp_path):
    store = JobStore(db_url)
    ids = {store.submit({"prompt": f"job {i}", "sleep": 0.01}, priority=i % 3) for i in range(JOBS)}
    records = tmp_path / "runs"
    records.mkdir()
    workers = [subprocess.Popen([sys.executable, "-m", "tests.service_sleep_worker", db_url, str(records)],
                                stderr=subprocess.PIPE, text=True) for _ in range(WORKERS)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    runs = {p.name: p.read_text().splitlines() for p in records.iterdir()}
    assert set(runs) == ids  # none lost
    assert all(len(lines) == 1 for lines in runs.values())  # none twice
    jobs, total = store.list(limit=1000)
    assert total == JOBS
    assert {j["status"] for j in jobs} == {"done"}
    assert {j["attempts"] for j in jobs} == {1}
    pids = {j["stats"]["pid"] for j in jobs}
    assert len(pids) > 1, "one worker took every job: the test did not exercise concurrent claims"
    for j in jobs:  # each job's events: queued, running, its step, done, in that order
        kinds = [(e["kind"], e["data"].get("status")) for e in store.events(j["id"])]
        assert kinds == [("status", "queued"), ("status", "running"), ("step", None), ("status", "done")]


def test_priority_and_reordering_over_http(db_url, tmp_path):
    """Jobs queued and reordered through the API run in the order asked for."""
    from PIL import Image

    from tests.service_helpers import Server, submit

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    server = Server(db_url, tmp_path / "storage", "--workers", "0").start()
    try:
        with server.client() as client:
            ids = [submit(client, image, {"prompt": f"job {i}"}).json()["id"] for i in range(5)]
            assert client.patch(f"/api/jobs/{ids[3]}", json={"priority": 2}).status_code == 200
            assert client.patch(f"/api/jobs/{ids[4]}", json={"position": 0}).status_code == 200
            changed = client.patch(f"/api/jobs/{ids[1]}", json={"settings": {"prompt": "changed", "steps": 3}})
            assert changed.json()["settings"] == {"prompt": "changed", "steps": 3, "output": "video.mp4"}
            bad = client.patch(f"/api/jobs/{ids[1]}", json={"settings": {"prompt": "x", "steps": 0}})
            assert bad.status_code == 422 and bad.json()["detail"] == "--steps 0: must be between 1 and 200"
            assert client.delete(f"/api/jobs/{ids[2]}").json()["status"] == "cancelled"
            listed = client.get("/api/jobs", params={"status": "queued", "limit": 2, "offset": 1}).json()
            assert listed["total"] == 4 and [j["id"] for j in listed["jobs"]] == [ids[4], ids[0]]
            records = tmp_path / "runs"
            records.mkdir()
            worker = subprocess.run([sys.executable, "-m", "tests.service_sleep_worker", db_url, str(records)],
                                    capture_output=True, text=True, timeout=120)
            assert worker.returncode == 0, worker.stderr
            done = client.get("/api/jobs", params={"status": "done"}).json()["jobs"]
            order = [j["id"] for j in sorted(done, key=lambda j: j["started_at"])]
            assert order == [ids[3], ids[4], ids[0], ids[1]]
            assert client.patch(f"/api/jobs/{ids[0]}", json={"priority": 1}).status_code == 409
            assert client.post(f"/api/jobs/{ids[2]}/resume").status_code == 200
            assert client.get(f"/api/jobs/{ids[2]}").json()["status"] == "queued"
    finally:
        server.stop()
