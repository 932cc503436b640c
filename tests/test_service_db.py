"""The queue's schema: a new database at the current version, and a version-1
database (frozen here as it was created) migrated with its jobs intact."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import inspect

from framepack.errors import UserError
from framepack.service.db import SCHEMA_VERSION
from framepack.service.store import JobStore
from tests.service_helpers import db_url, postgres  # noqa: F401  (fixtures)

# Version 1 of the schema, as framepack created it (before stats and presets).
V1 = """
CREATE TABLE jobs (id VARCHAR(32) NOT NULL PRIMARY KEY, status VARCHAR(16) NOT NULL, priority INTEGER NOT NULL,
  position BIGINT NOT NULL, settings JSON NOT NULL, inputs JSON NOT NULL, created_at FLOAT NOT NULL,
  updated_at FLOAT NOT NULL, started_at FLOAT, finished_at FLOAT, worker VARCHAR(200), lease_until FLOAT,
  attempts INTEGER NOT NULL, failures JSON NOT NULL, cancel_requested BOOLEAN NOT NULL, progress JSON NOT NULL,
  error TEXT, outputs JSON NOT NULL);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE INDEX ix_jobs_lease_until ON jobs (lease_until);
CREATE TABLE job_events (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, job_id VARCHAR(32) NOT NULL
  REFERENCES jobs (id) ON DELETE CASCADE, kind VARCHAR(16) NOT NULL, data JSON NOT NULL, at FLOAT NOT NULL);
CREATE INDEX ix_job_events_job_id ON job_events (job_id);
CREATE TABLE workers (name VARCHAR(200) NOT NULL PRIMARY KEY, host VARCHAR(200) NOT NULL, pid INTEGER NOT NULL,
  gpu VARCHAR(16), started_at FLOAT NOT NULL, last_seen FLOAT NOT NULL, job_id VARCHAR(32));
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
INSERT INTO jobs VALUES ('0123456789abcdef0123456789abcdef', 'queued', 3, 1, '{"prompt": "old"}', '{}', 1.0, 1.0,
  NULL, NULL, NULL, NULL, 0, '[]', 0, '{}', NULL, '[]');
"""


def columns(store: JobStore) -> dict[str, set[str]]:
    """Each table's columns and indexes."""
    insp = inspect(store.engine)
    return {t: {c["name"] for c in insp.get_columns(t)} | {i["name"] for i in insp.get_indexes(t)}
            for t in insp.get_table_names()}


def test_a_new_database_is_at_the_current_version(db_url):
    store = JobStore(db_url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version FROM schema_version").scalar() == SCHEMA_VERSION
    assert {"jobs", "job_events", "workers", "presets", "schema_version"} <= set(columns(store))
    store.put_preset("fast", {"prompt": "x", "steps": 5})
    assert store.presets() == {"fast": {"prompt": "x", "steps": 5}}
    JobStore(db_url)  # opening it again changes nothing


def test_a_version_1_database_is_migrated_with_its_jobs(tmp_path):
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1)
    store = JobStore(f"sqlite:///{path}")
    fresh = JobStore(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    assert columns(store) == columns(fresh)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version FROM schema_version").scalar() == SCHEMA_VERSION
    job = store.get("0123456789abcdef0123456789abcdef")
    assert (job["settings"], job["priority"], job["stats"]) == ({"prompt": "old"}, 3, {})
    claimed = store.claim("w")
    assert claimed["id"] == job["id"]
    assert store.finish(job["id"], "w", "done", outputs=["video.mp4"], stats={"seconds_per_step": 0.5})
    assert store.get(job["id"])["stats"] == {"seconds_per_step": 0.5}
    store.put_preset("p", {"prompt": "y"})
    assert store.presets() == {"p": {"prompt": "y"}}


def test_a_database_from_a_newer_framepack_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    store = JobStore(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(UserError, match="newer than this framepack"):
        JobStore(url)


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
