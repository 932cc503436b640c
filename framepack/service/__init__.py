"""The render service: a persistent job queue, workers that keep a warm
``framepack.Pipeline`` and resume after crashes, and a REST API.

It is a client of ``framepack.Pipeline`` (it sits above ``api`` in the
layout, below the CLI). One module per job:

    db.py          the schema (SQLAlchemy 2), engines for SQLite and PostgreSQL, migrations
    store.py       the queue: submit, claim under a lease, heartbeat, finish, cancel, resume, retry
    storage.py     the shared folder: hashed inputs, one folder per job
    jobspec.py     a submitted job's settings, checked exactly as the CLI checks them
    worker.py      `framepack worker`: claim, run in one warm Pipeline, report
    supervisor.py  the server's local worker processes, restarted when they die
    server.py      `framepack serve`: FastAPI on uvicorn
    metrics.py     Prometheus metrics read from the store
    logs.py        JSON-line logs carrying the job id
    commands.py    `framepack serve`, `worker` and `queue ...`
"""
