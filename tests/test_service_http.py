"""The render service over real HTTP: `framepack serve` as a process with one
worker on the tiny model. A job submitted, its events streamed in order, its
video downloaded (ranges too) and its record equal to the CLI's for the same
settings; auth, the upload limit, hostile file names, and bad settings
refused with the CLI's message and no job row."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from framepack.output.metadata import read_metadata
from tests.jobs import cli, frames_of, write_plain_video
from tests.service_helpers import TOKEN, Server, submit, tiny_settings, wait_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("service")
    srv = Server(f"sqlite:///{root / 'queue.sqlite3'}", root / "storage", "--workers", "1", "--max-upload-mb", "1",
                 "--allow-model", str(tiny_model), token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def job_count(client) -> int:
    return client.get("/api/jobs").json()["total"]


def read_sse(client, job_id: str) -> list[tuple[int, str, dict]]:
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events", timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        block = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if block:
                    events.append((int(block["id"]), block["event"], json.loads(block["data"])))
                block = {}
                continue
            key, _, value = line.partition(": ")
            block[key] = value
    return events


def test_round_trip(server, client, tiny_model, test_image, tmp_path):
    settings = tiny_settings(tiny_model)
    response = submit(client, test_image, settings)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    events = read_sse(client, job_id)  # the stream ends when the job has ended

    ids = [e[0] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = [(kind, data.get("status") or data.get("phase")) for _, kind, data in events if kind != "step"]
    assert kinds == [("status", "queued"), ("status", "running"), ("start", None),
                     ("section", "start"), ("section", "end"), ("section", "start"), ("section", "end"),
                     ("section", "start"), ("section", "end"), ("status", "done")]
    steps = [data for _, kind, data in events if kind == "step"]
    assert [(s["section"], s["step"]) for s in steps] == [(0, 0), (1, 0), (2, 0)]
    assert steps[-1]["eta_s"] == 0 and all(s["eta_s"] >= 0 for s in steps)
    assert steps[-1]["preview"] == "files/preview.png"
    preview = client.get(f"/api/jobs/{job_id}/{steps[-1]['preview']}")
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).format == "PNG"

    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "done" and job["outputs"] == ["video.mp4", "video.json"]
    assert job["inputs"]["image"]["name"] == test_image.name
    assert "storage" not in json.dumps(job)  # no server paths
    video = client.get(f"/api/jobs/{job_id}/files/video.mp4")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "service.mp4").write_bytes(video.content)
    part = client.get(f"/api/jobs/{job_id}/files/video.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == video.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(video.content)}"

    # The CLI with the same settings: the same frames and the same record.
    out = tmp_path / "cli" / "video.mp4"
    out.parent.mkdir()
    proc = cli(["generate", "--image", test_image, "--prompt", "a wave", "--model", tiny_model, "--size", "64x64",
                "--steps", "1", "--seconds", "1.2", "--window", "3", "--seed", "7", "--profile", "cpu", "--quiet",
                "--output", out])
    assert proc.returncode == 0, proc.stderr
    ours, theirs = frames_of(tmp_path / "service.mp4"), frames_of(out)
    assert ours.shape == (job["stats"]["frames"], 64, 64, 3) == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    record, cli_record = read_metadata(tmp_path / "service.mp4"), read_metadata(out)
    for r in (record, cli_record):
        r.pop("created")
        for key in ("image", "output", "latents_out"):
            r["settings"].pop(key)
        r["inputs"]["image"].pop("path")
    assert record == cli_record
    assert record["extra"]["fps"] == 30

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'framepack_jobs{status="done"} 1.0' in metrics.text
    assert "framepack_workers_up 1.0" in metrics.text
    assert "framepack_seconds_per_step" in metrics.text


def test_every_endpoint_but_healthz_needs_the_token(server):
    with server.client(token=None) as anonymous, server.client(token="wrong-token-0123456789") as wrong:
        for c in (anonymous, wrong):
            for path in ("/api/jobs", "/metrics", "/docs", "/api/jobs/" + "0" * 32 + "/files/video.mp4"):
                response = c.get(path)
                assert response.status_code == 401, path
                assert response.headers["www-authenticate"] == "Bearer"
            assert c.post("/api/jobs", data={"settings": "{}"}).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with server.client() as c:
        assert c.get("/api/jobs").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/docs").status_code == 200
        assert "/api/jobs/{job_id}/events" in c.get("/openapi.json").json()["paths"]


def test_uploads_over_the_limit_get_413_and_no_job(client, tiny_model):
    before = job_count(client)
    big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)  # ~1.9 MB as PNG
    data = io.BytesIO()
    Image.fromarray(big).save(data, format="PNG")
    response = client.post("/api/jobs", data={"settings": json.dumps(tiny_settings(tiny_model))},
                           files={"image": ("big.png", data.getvalue(), "image/png")})
    assert response.status_code == 413
    assert "upload limit of 1 MB" in response.json()["detail"]
    assert job_count(client) == before


def test_hostile_file_names_never_become_paths(server, client, tiny_model, test_image):
    storage = server.storage
    response = client.post("/api/jobs", data={"settings": json.dumps(tiny_settings(tiny_model))},
                           files={"image": ("../../../escaped.png", test_image.read_bytes(), "image/png")})
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert client.delete(f"/api/jobs/{job_id}").json()["status"] in ("cancelled", "cancelling")
    assert not list(storage.parent.rglob("escaped.png")) and not list(storage.parent.parent.glob("escaped*"))
    assert client.get(f"/api/jobs/{job_id}").json()["inputs"]["image"]["name"] == "escaped.png"
    for name in ("../../queue.sqlite3", "..%2F..%2Fqueue.sqlite3", "%2Fetc%2Fpasswd", "../token", "video.json/../x"):
        assert client.get(f"/api/jobs/{job_id}/files/{name}").status_code == 404, name
    for bad_id in ("..", "..%2F..", "0" * 31 + "g"):
        assert client.get(f"/api/jobs/{bad_id}").status_code == 404
    for output in ("../video.mp4", "/tmp/video.mp4", "a/b.mp4"):
        response = submit(client, test_image, tiny_settings(tiny_model, output=output))
        assert response.status_code == 422 and "a plain file name" in response.json()["detail"]


@pytest.mark.parametrize("setting, flags", [
    ({"steps": 0}, ["--steps", "0"]),
    ({"size": "65x64"}, ["--size", "65x64"]),
    ({"seconds": -1}, ["--seconds", "-1"]),
    ({"variant": "f2"}, None),
    ({"cfg": 0.5}, ["--cfg", "0.5"]),
])
def test_bad_settings_get_422_with_the_cli_message_and_no_row(client, tiny_model, test_image, tmp_path, setting,
                                                              flags):
    before = job_count(client)
    response = submit(client, test_image, tiny_settings(tiny_model, **setting))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert job_count(client) == before
    if flags is None:
        assert detail == "--variant 'f2': must be one of original, f1"
        return
    proc = cli(["generate", "--image", test_image, "--prompt", "a", "--model", tiny_model, "--profile", "cpu",
                "--output", tmp_path / "x.mp4", *flags])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"framepack: error: {detail}"


def test_bad_requests_get_400_and_no_row(client, tiny_model, tmp_path):
    before = job_count(client)
    response = client.post("/api/jobs", data={"settings": "{not json"},
                           files={"image": ("a.png", b"x", "image/png")})
    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    response = submit(client, text, tiny_settings(tiny_model))
    assert response.status_code == 400
    assert response.json()["detail"] == "upload 'image' is not an image Pillow can read (PNG, JPEG, WebP, ...)"
    response = client.post("/api/jobs", data={"settings": json.dumps(tiny_settings(tiny_model, keyframes=[0.5]))})
    assert response.status_code == 422 and "1 time(s) in the settings but 0 image(s)" in response.json()["detail"]
    response = client.post("/api/jobs", data={"settings": json.dumps({"prompt": "a", "bogus": 1})},
                           files={"image": ("a.png", b"x", "image/png")})
    assert response.status_code == 422 and response.json()["detail"].startswith("unknown setting(s) bogus")
    assert job_count(client) == before
    assert client.patch("/api/jobs/" + "0" * 32, json={"priority": 1}).status_code == 404


def test_text_to_video_with_an_end_frame_and_a_keyframe_over_http(client, tiny_model, test_image, tmp_path):
    """No start image (a blank start), an end image and a keyframe as uploads: the
    worker hands them to the pipeline, and the job's record hashes each one."""
    end = tmp_path / "end.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(end)
    settings = tiny_settings(tiny_model, seconds=2.0, blank="black", end_strength=0.5, keyframes=[1.0])
    with open(end, "rb") as e, open(test_image, "rb") as k:
        response = client.post("/api/jobs", data={"settings": json.dumps(settings)},
                               files=[("end_image", ("end.png", e, "image/png")),
                                      ("keyframes", ("key.png", k, "image/png"))])
    assert response.status_code == 201, response.text
    job = wait_status(client, response.json()["id"])
    assert job["status"] == "done", job["error"]
    assert set(job["inputs"]) == {"end_image", "keyframe_0"}
    record = json.loads(client.get(f"/api/jobs/{job['id']}/files/video.json").content)
    hashes = json.dumps(record)
    assert job["inputs"]["end_image"]["sha256"] in hashes and job["inputs"]["keyframe_0"]["sha256"] in hashes
    assert job["progress"]["computed"] >= 1 and job["progress"].get("partial") == "video.partial.mp4"


def test_extending_an_uploaded_video_over_http(client, tiny_model, test_image, tmp_path):
    """The video to continue is an upload ('extend'), checked as the CLI checks it."""
    source = write_plain_video(tmp_path / "in.mp4", 40)
    settings = tiny_settings(tiny_model)  # window 3: three sections of 12 frames
    with open(source, "rb") as f:
        response = client.post("/api/jobs", data={"settings": json.dumps(settings)},
                               files={"extend": ("in.mp4", f, "video/mp4")})
    assert response.status_code == 201, response.text
    job = wait_status(client, response.json()["id"])
    assert job["status"] == "done", job["error"]
    assert set(job["inputs"]) == {"extend"} and job["stats"]["frames"] == 40 + 36
    video = tmp_path / "out.mp4"
    video.write_bytes(client.get(f"/api/jobs/{job['id']}/files/video.mp4").content)
    assert len(frames_of(video)) == 40 + 36
    assert read_metadata(video)["inputs"]["extend"]["sha256"] == job["inputs"]["extend"]["sha256"]

    before = job_count(client)
    response = client.post("/api/jobs", data={"settings": json.dumps(settings)},
                           files={"extend": ("x.mp4", b"not a video", "video/mp4")})
    assert response.status_code == 400 and response.json()["detail"].startswith("upload 'extend': not a video PyAV can read")
    with open(source, "rb") as f, open(test_image, "rb") as i:
        response = client.post("/api/jobs", data={"settings": json.dumps(settings)},
                               files=[("extend", ("in.mp4", f, "video/mp4")), ("image", ("i.png", i, "image/png"))])
    assert response.status_code == 422 and "leave out image" in response.json()["detail"]
    assert job_count(client) == before
