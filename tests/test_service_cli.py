"""`framepack queue add|list|show|cancel|resume|retry` against the store with
no server, and `framepack worker` rendering what was queued; JSON-line logs
that carry the job id."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from framepack.cli import main
from framepack.service.store import JobStore
from tests.jobs import cli_env


@pytest.fixture
def where(tmp_path):
    return ["--db", f"sqlite:///{tmp_path / 'queue.sqlite3'}", "--storage", str(tmp_path / "storage")]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_queue_commands(capsys, where, tiny_model, test_image, tmp_path):
    code, out, _ = run(capsys, "queue", "add", "--image", test_image, "--prompt", "a wave", "--model", tiny_model,
                       "--size", "64x64", "--steps", "1", "--seconds", "1", "--priority", "3", "--json", *where)
    assert code == 0
    job_id = json.loads(out)["id"]
    code, out, _ = run(capsys, "queue", "list", "--json", *where)
    listed = json.loads(out)
    assert listed["total"] == 1 and listed["jobs"][0]["priority"] == 3
    assert listed["jobs"][0]["settings"] == {"prompt": "a wave", "model": str(tiny_model), "size": "64x64",
                                             "steps": 1, "seconds": 1.0, "output": "video.mp4"}
    assert run(capsys, "queue", "cancel", job_id, *where)[1].strip() == f"{job_id} cancelled"
    code, _, err = run(capsys, "queue", "cancel", job_id, *where)
    assert code == 2 and err.strip() == f"framepack: error: job {job_id} is already cancelled"
    assert run(capsys, "queue", "resume", job_id, *where)[1].strip() == f"{job_id} queued"
    code, _, err = run(capsys, "queue", "retry", job_id, *where)
    assert code == 2 and "only a cancelled or failed or done job can be retried" in err
    code, out, _ = run(capsys, "queue", "show", job_id, *where)
    assert json.loads(out)["status"] == "queued"
    code, out, _ = run(capsys, "queue", "list", *where)
    assert job_id in out and "queued" in out


def test_queue_add_refuses_bad_input_with_the_cli_message(capsys, where, tiny_model, test_image, tmp_path):
    code, _, err = run(capsys, "queue", "add", "--image", test_image, "--prompt", "a", "--steps", "0", *where)
    assert code == 2 and err.strip() == "framepack: error: --steps 0: must be between 1 and 200"
    text = tmp_path / "notes.png"
    text.write_text("hello")
    code, _, err = run(capsys, "queue", "add", "--image", text, "--prompt", "a", *where)
    assert code == 2 and err.strip() == f"framepack: error: {text} is not an image Pillow can read (PNG, JPEG, WebP, ...)"
    code, _, err = run(capsys, "queue", "show", "f" * 32, *where)
    assert code == 2 and err.strip() == f"framepack: error: no job {'f' * 32!r}"
    assert JobStore(where[1]).list()[1] == 0


def test_a_worker_renders_what_the_queue_holds(capsys, where, tiny_model, test_image, tmp_path):
    code, out, _ = run(capsys, "queue", "add", "--image", test_image, "--prompt", "a wave", "--model", tiny_model,
                       "--size", "64x64", "--steps", "1", "--seconds", "1", "--output", "clip.mp4", "--latents",
                       *where)
    job_id = out.strip()
    proc = subprocess.run([sys.executable, "-m", "framepack", "worker", "--exit-when-idle", "--profile", "cpu",
                           *where], capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    job = JobStore(where[1]).get(job_id)
    assert job["status"] == "done", job["error"]
    assert job["outputs"] == ["clip.mp4", "clip.safetensors", "clip.json"]
    out_dir = tmp_path / "storage" / "jobs" / job_id / "out"
    assert all((out_dir / name).is_file() for name in job["outputs"])
    assert not (tmp_path / "storage" / "jobs" / job_id / "work" / "checkpoint.safetensors").exists()
    assert job["stats"]["frames"] == 37 and job["stats"]["seconds_per_step"] > 0
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [line["msg"] for line in lines if line.get("job") == job_id] == ["job claimed", "job done"]
    logs = list((tmp_path / "storage" / "logs").glob("worker-*.log"))
    assert len(logs) == 1 and job_id in logs[0].read_text()
