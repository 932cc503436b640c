"""Helpers for the render-service tests: a throwaway PostgreSQL cluster, the
server and workers as real processes, and small HTTP helpers."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.jobs import cli_env

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """initdb + pg_ctl in a temp folder, listening on 127.0.0.1 only, trust auth."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="framepack-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0  # postgres refuses to run as root
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-w", "-l", str(self.root / "log"), "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c max_connections=100",
                  "start")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{tool} failed: {proc.stderr}")

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty queue database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


# --- processes --------------------------------------------------------------------------------


class Server:
    """`framepack serve` as a child process on a free port."""

    def __init__(self, db: str, storage: Path, *args: str, env_extra=None, pythonpath=None, lease_s: float = 3.0,
                 token: str | None = None, ui: bool = False) -> None:
        self.db, self.storage, self.args = db, storage, args
        self.env_extra, self.pythonpath, self.lease_s, self.token = env_extra, pythonpath, lease_s, token
        self.ui = ui  # the web UI costs seconds of Gradio import per start: only for the tests that use it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = storage.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 60) -> "Server":
        cmd = [sys.executable, "-m", "framepack", "serve", "--port", str(self.port), "--db", self.db,
               "--storage", str(self.storage), "--lease-s", str(self.lease_s), "--profile", "cpu", *self.args]
        if not self.ui:
            cmd.append("--no-ui")
        if self.token is not None:
            token_file = self.storage.parent / "token"
            token_file.write_text(self.token + "\n")
            cmd += ["--auth", str(token_file)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                     env=cli_env(self.env_extra, self.pythonpath))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve did not answer in {timeout} s: {self.log.read_text()[-3000:]}")

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_worker(db: str, storage: Path, *args: str, env_extra=None, pythonpath=None, lease_s: float = 3.0,
                 log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "framepack", "worker", "--db", db, "--storage", str(storage), "--lease-s",
           str(lease_s), "--profile", "cpu", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "ab") if log else subprocess.DEVNULL,
                            env=cli_env(env_extra, pythonpath))


# --- HTTP ---------------------------------------------------------------------------------------


def tiny_settings(model: Path, **extra) -> dict:
    """A tiny job: 64x64, one step, three short sections of the inverted model."""
    return {"prompt": "a wave", "model": str(model), "size": "64x64", "steps": 1, "seconds": 1.2, "window": 3,
            "seed": 7, **extra}


def submit(client: httpx.Client, image: Path, settings: dict, priority: int = 0) -> httpx.Response:
    import json

    with open(image, "rb") as f:
        return client.post("/api/jobs", data={"settings": json.dumps(settings), "priority": str(priority)},
                           files={"image": (image.name, f, "image/png")})


def wait_status(client: httpx.Client, job_id: str, statuses=("done", "failed", "cancelled"), timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
