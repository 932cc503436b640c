"""A queue worker whose job is a short sleep: the test double for the pipeline
in the queue concurrency tests (the real Worker and JobStore, no model).

    python -m tests.service_sleep_worker DB_URL RECORD_DIR

Each run appends "<job id> <pid>" to RECORD_DIR/<job id>, so a job run twice
shows two lines; the worker exits when the queue has nothing left to claim."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from framepack.service.store import JobStore
from framepack.service.worker import RunResult, Worker


class SleepRunner:
    def __init__(self, record_dir: Path) -> None:
        self.record_dir = record_dir

    def run(self, job, ctx) -> RunResult:
        fd = os.open(self.record_dir / job["id"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{job['id']} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        ctx.report("step", {"step": 0}, {"step": 0})
        time.sleep(job["settings"].get("sleep", 0.01))
        return RunResult(outputs=[], stats={"pid": os.getpid()})

    def close(self) -> None:
        pass


if __name__ == "__main__":
    store = JobStore(sys.argv[1], lease_s=30)
    Worker(store, SleepRunner(Path(sys.argv[2])), poll_s=0.05).run(exit_when_idle=True)
