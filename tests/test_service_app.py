"""The API in this process (no worker): a streamed body over the limit gets
413 too, /healthz says 503 when the database does not answer, and log lines
are JSON with the job id."""

from __future__ import annotations

import io
import json
import logging

from fastapi.testclient import TestClient
from PIL import Image

from framepack.service.logs import JsonLines
from framepack.service.server import create_app
from framepack.service.storage import Storage
from framepack.service.store import JobStore


def make(tmp_path, **kwargs):
    store = JobStore(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    return store, TestClient(create_app(store, Storage(tmp_path / "storage"), **kwargs))


def test_a_streamed_body_over_the_limit_gets_413(tmp_path):
    store, client = make(tmp_path, max_upload_mb=0.1)

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(20):
            yield b"x" * 10_000

    response = client.post("/api/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert store.list()[1] == 0


def test_a_small_upload_passes_the_limit(tmp_path):
    store, client = make(tmp_path, max_upload_mb=0.1)
    data = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data, format="PNG")
    response = client.post("/api/jobs", data={"settings": json.dumps({"prompt": "a"})},
                           files={"image": ("a.png", data.getvalue(), "image/png")})
    assert response.status_code == 201
    assert store.get(response.json()["id"])["inputs"]["image"]["name"] == "a.png"


def test_healthz_is_503_when_the_database_does_not_answer(tmp_path, monkeypatch):
    store, client = make(tmp_path, token="a-token-of-sixteen-chars")
    assert client.get("/healthz").json()["ok"] is True  # no token needed
    monkeypatch.setattr(store, "snapshot", lambda: (_ for _ in ()).throw(ConnectionError("db down")))
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json() == {"ok": False, "error": "ConnectionError: db down"}


def test_log_lines_are_json_with_the_job_id():
    record = logging.LogRecord("framepack.service", logging.INFO, __file__, 1, "job claimed %s", ("now",), None)
    record.job = "ab" * 16
    line = json.loads(JsonLines("worker-x").format(record))
    assert line["msg"] == "job claimed now" and line["job"] == "ab" * 16 and line["component"] == "worker-x"
    assert line["level"] == "info" and line["ts"].endswith("Z") and isinstance(line["pid"], int)
