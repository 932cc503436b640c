"""How fast is the queue? Claim throughput, submit-to-start latency, and the
time the service adds per step event, on SQLite and on PostgreSQL.

- claim throughput: JOBS queued jobs drained by 1 and by WORKERS processes, each
  looping claim -> finish with no work (the database's share of a job);
- submit-to-start latency: one real ``Worker`` (its default 0.5 s poll) with a
  runner that does nothing; jobs submitted one at a time, 0.2 s apart; the
  latency is the job's first claim time minus its submit time;
- per step event: what the worker's ``on_event`` costs the sampling loop per
  step (``EventReporter`` -> ``JobStore.report``: one write transaction).

PostgreSQL is a throwaway cluster this script starts (initdb, pg_ctl; skipped
when the binaries are absent, as the tests do).

    python benchmarks/queue_bench.py [--jobs 500] [--workers 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def drain(url: str, name: str, counts, ready, go) -> None:
    from framepack.service.store import JobStore

    store = JobStore(url)
    store.get(store.list(limit=1)[0][0]["id"])  # connected and warm before the clock starts
    ready.release()
    go.wait()
    n = 0
    while (job := store.claim(name)) is not None:
        store.finish(job["id"], name, "done")
        n += 1
    counts.put(n)


def claim_throughput(url: str, jobs: int, workers: int) -> dict:
    from framepack.service.store import JobStore

    store = JobStore(url)
    for i in range(jobs):
        store.submit({"prompt": f"bench {i}"}, priority=i % 3)
    counts, ready, go = mp.Queue(), mp.Semaphore(0), mp.Event()
    procs = [mp.Process(target=drain, args=(url, f"bench-{workers}-{i}", counts, ready, go)) for i in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    started = time.perf_counter()  # every process started and connected
    go.set()
    per_worker = sorted(counts.get() for _ in procs)
    wall = time.perf_counter() - started
    for p in procs:
        p.join()
    done = store.list("done", limit=1)[1]
    assert done == jobs and sum(per_worker) == jobs, (done, per_worker)
    return {"workers": workers, "jobs": jobs, "wall_s": round(wall, 3), "claims_per_s": round(jobs / wall, 1),
            "per_worker": per_worker}


class Nothing:
    def run(self, job, ctx):
        from framepack.service.worker import RunResult

        return RunResult(outputs=[])

    def close(self) -> None:
        pass


def submit_to_start(url: str, jobs: int = 20) -> dict:
    from framepack.service.store import JobStore
    from framepack.service.worker import Worker

    store = JobStore(url)
    worker = Worker(JobStore(url), Nothing(), name="latency")
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": jobs}, daemon=True)
    thread.start()
    time.sleep(1.0)
    ids = []
    for i in range(jobs):
        ids.append(store.submit({"prompt": f"latency {i}"}))
        time.sleep(0.2)
    thread.join(60)
    waits = sorted(store.get(i)["started_at"] - store.get(i)["created_at"] for i in ids)
    return {"jobs": jobs, "poll_s": worker.poll_s, "median_s": round(statistics.median(waits), 4),
            "p95_s": round(waits[int(0.95 * (len(waits) - 1))], 4), "max_s": round(waits[-1], 4)}


def per_step_event(url: str, events: int = 300) -> dict:
    import torch  # noqa: F401  (framepack.events imports it; keep it out of the timing)

    from framepack.events import StepEvent
    from framepack.service.store import JobStore
    from framepack.service.worker import EventReporter

    store = JobStore(url)
    job = store.submit({"prompt": "events"})
    store.claim("events")
    reporter = EventReporter(lambda kind, data, progress: store.report(job, "events", kind, data, progress),
                             Path("/nonexistent/preview.png"))
    times = []
    for i in range(events):
        event = StepEvent(section=i // 25, sections=events // 25, step=i % 25, steps=25, elapsed_s=0.0)
        t = time.perf_counter()
        reporter(event)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"events": events, "median_ms": round(1000 * statistics.median(times), 3),
            "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 3)}


def bench(url: str, args) -> dict:
    return {
        "claim_throughput": [claim_throughput(fresh(url), args.jobs, w) for w in (1, args.workers)],
        "submit_to_start": submit_to_start(fresh(url)),
        "per_step_event": per_step_event(fresh(url)),
    }


_fresh_counter = [0]
_cluster = [None]


def fresh(url: str) -> str:
    """A new empty database of the same kind."""
    _fresh_counter[0] += 1
    if url.startswith("sqlite:///"):
        return url.replace(".sqlite3", f"-{_fresh_counter[0]}.sqlite3")
    return _cluster[0].new_database()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "queue-bench.json")
    args = parser.parse_args()

    from tests.service_helpers import PostgresCluster, postgres_bin

    results = {"machine": {"python": platform.python_version(), "cpus": mp.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = bench(f"sqlite:///{tmp}/queue.sqlite3", args)
        print(json.dumps(results["sqlite"], indent=2), flush=True)
    if postgres_bin() is None:
        results["postgresql"] = "skipped: PostgreSQL binaries (initdb, pg_ctl) not found"
    else:
        _cluster[0] = PostgresCluster()
        try:
            results["postgresql"] = bench("postgresql://unused", args)
            import psycopg

            with psycopg.connect(_cluster[0].new_database()) as conn:
                results["postgresql_version"] = conn.execute("SHOW server_version").fetchone()[0]
        finally:
            _cluster[0].stop()
        print(json.dumps(results["postgresql"], indent=2), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
