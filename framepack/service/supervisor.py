"""The server's local workers: N child processes, restarted when one dies.

Each child is ``framepack worker`` with the server's database and storage
(and ``--gpu i`` when the machine has GPUs, one per worker). A child gets
SIGKILL when the server dies (Linux ``PR_SET_PDEATHSIG``): a SIGKILLed
server leaves no orphan holding a job, so the leases run out and the
restarted server's workers resume the jobs from their checkpoints.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time

from framepack.service.logs import get_logger

RESTART_DELAY_S = 1.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: children outlive a killed server; their leases still run out once they stop


class Supervisor:
    def __init__(self, count: int, worker_args: list[str], gpus: int = 0) -> None:
        self.count = count
        self.worker_args = worker_args
        self.gpus = gpus
        self.children: list[subprocess.Popen | None] = [None] * count
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = get_logger()

    def _command(self, index: int) -> list[str]:
        gpu = ["--gpu", str(index % self.gpus)] if self.gpus else []
        return [sys.executable, "-m", "framepack", "worker", *self.worker_args, *gpu]

    def _spawn(self, index: int) -> None:
        child = subprocess.Popen(self._command(index), preexec_fn=_die_with_parent)
        self.children[index] = child
        self.log.info("worker process started", extra={"slot": index, "child_pid": child.pid})

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for i, child in enumerate(self.children):
                if child is not None and child.poll() is not None and not self._stop.is_set():
                    self.log.warning("worker process died; restarting it",
                                     extra={"slot": i, "child_pid": child.pid, "returncode": child.returncode})
                    time.sleep(RESTART_DELAY_S)  # a worker that dies at once must not spin
                    if not self._stop.is_set():
                        self.restarts += 1
                        self._spawn(i)

    def alive(self) -> int:
        return sum(1 for c in self.children if c is not None and c.poll() is None)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM every worker (each releases its job at the next step), then SIGKILL stragglers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        live = [c for c in self.children if c is not None and c.poll() is None]
        for child in live:
            child.terminate()
        deadline = time.monotonic() + timeout_s
        for child in live:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
