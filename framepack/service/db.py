"""The queue's schema and database engines (SQLAlchemy 2).

SQLite (the default, one machine) runs in WAL mode so readers never block the
writer, with a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE``: it takes the write lock up front, so two workers claiming
at once queue up on the lock instead of both reading the same job and one
failing at commit. PostgreSQL (several machines) claims with ``SELECT ... FOR
UPDATE SKIP LOCKED`` (``framepack.service.store``).

The schema is versioned: ``schema_version`` holds one row; a new database is
created at ``SCHEMA_VERSION``, an older one is brought up step by step by
``MIGRATIONS`` (tests/test_service_db.py migrates a frozen version-1 database).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, text)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from framepack.errors import UserError

SCHEMA_VERSION = 2
STATUSES = ("queued", "running", "done", "failed", "cancelled")


class Base(DeclarativeBase):
    metadata = MetaData()


class Job(Base):
    __tablename__ = "jobs"
    # the claim's WHERE and ORDER BY (version 2)
    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "position"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[int] = mapped_column(BigInteger)  # order within a priority, smaller first
    settings: Mapped[dict] = mapped_column(JSON)  # Pipeline.generate keywords (framepack.service.jobspec)
    inputs: Mapped[dict] = mapped_column(JSON, default=dict)  # field -> {"sha256", "file", "name"}
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # first claim
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims
    failures: Mapped[list] = mapped_column(JSON, default=list)  # why earlier attempts ended: lost workers, errors
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    outputs: Mapped[list] = mapped_column(JSON, default=list)  # file names under the job's output folder
    stats: Mapped[dict] = mapped_column(JSON, default=dict)  # added in version 2: seconds per step, peaks

    def to_dict(self) -> dict:
        return {c.name: getattr(self, c.name) for c in self.__table__.columns}


class JobEvent(Base):
    """What a job's event stream (SSE) replays: status changes, sections, steps."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # status, section, step
    data: Mapped[dict] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid[:gpu]
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[str | None] = mapped_column(String(16), nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Preset(Base):
    """Named settings a web UI offers (added in version 2)."""

    __tablename__ = "presets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    settings: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


schema_version = Table("schema_version", Base.metadata, Column("version", Integer, nullable=False))


# --- migrations --------------------------------------------------------------------------


def _v1_to_v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE jobs ADD COLUMN stats JSON"))
    conn.execute(text("UPDATE jobs SET stats = '{}'"))
    Preset.__table__.create(conn)
    next(i for i in Job.__table__.indexes if i.name == "ix_jobs_claim").create(conn)


# version reached -> the step from the version before it
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _v1_to_v2}


def current_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table("schema_version"):
        return None
    return conn.execute(text("SELECT version FROM schema_version")).scalar()


def migrate(engine: Engine) -> int:
    """Create the schema or bring it up to SCHEMA_VERSION; -> the version before (0: new)."""
    with engine.begin() as conn:
        version = current_version(conn)
        if version is None and inspect(conn).has_table("jobs"):
            raise UserError("this database has framepack tables but no schema_version; it is not one framepack made")
        if version is None:
            Base.metadata.create_all(conn)
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            return 0
        if version > SCHEMA_VERSION:
            raise UserError(f"the queue database is at schema version {version}, newer than this framepack "
                            f"({SCHEMA_VERSION}); upgrade framepack")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](conn)
            conn.execute(text("UPDATE schema_version SET version = :v"), {"v": step})
        return version


# --- engines -----------------------------------------------------------------------------


def data_dir() -> Path:
    """Where the service keeps its database and storage by default."""
    root = os.environ.get("FRAMEPACK_DATA_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "framepack"


def default_url() -> str:
    return f"sqlite:///{data_dir() / 'service' / 'queue.sqlite3'}"


def make_engine(url: str | None = None) -> Engine:
    """An engine for ``sqlite:///PATH`` or ``postgresql://...``, set up for the queue.

    Write transactions ask for ``execution_options(write=True)``: on SQLite they
    begin with BEGIN IMMEDIATE (see the module docstring)."""
    url = url or default_url()
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, not psycopg2
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--db {url}: cannot create {path.parent}: {exc.strerror}") from None
        engine = create_engine(url, connect_args={"timeout": 5})
        _sqlite_setup(engine)
        return engine
    if url.startswith("postgresql+psycopg://"):
        return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    raise UserError(f"--db {url!r}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own BEGIN is deferred)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def now() -> float:
    return time.time()
