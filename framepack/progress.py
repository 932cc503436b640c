"""Progress on stderr, as an ordinary event-hook plugin.

On a terminal one line is rewritten every step; in a log one line is written
every few steps and at the end of each section. The ETA assumes the rest of
the job runs at the average speed of the steps so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from framepack.hookspecs import hookimpl


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressReporter:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first_step_at: float | None = None
        self.steps_done = 0

    def _print(self, text: str, transient: bool = False) -> None:
        if self.tty:
            end = "" if transient else "\n"
            self.stream.write("\r\033[K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    @hookimpl
    def framepack_on_job_start(self, event) -> None:
        self._print(
            f"framepack: {event.sections} section(s), {event.frames} frames at {event.width}x{event.height}, "
            f"{event.settings.steps} steps, seed {event.settings.seed}"
        )
        if event.plan:
            self._print(f"memory plan: {event.plan}")
        self.total_steps = event.sections * event.settings.steps

    @hookimpl
    def framepack_on_step(self, event) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
        self.steps_done += 1
        elapsed = now - self.first_step_at
        rate = elapsed / max(self.steps_done - 1, 1)
        eta = rate * (self.total_steps - self.steps_done)
        text = (
            f"section {event.section + 1}/{event.sections} step {event.step + 1}/{event.steps}"
            f" | {_duration(elapsed)} elapsed | ETA {_duration(eta)}"
        )
        every = max(1, event.steps // 5)
        if self.tty:
            self._print(text, transient=True)
        elif (event.step + 1) % every == 0 or event.step + 1 == event.steps:
            self._print(text)

    @hookimpl
    def framepack_on_section(self, event) -> None:
        if event.phase == "end":
            calls = f"{event.computed} transformer calls computed, {event.skipped} skipped"
            self._print(f"section {event.index + 1}/{event.count} done at {_duration(event.elapsed_s)} ({calls})")

    @hookimpl
    def framepack_on_job_end(self, event) -> None:
        if event.status == "done":
            self._print(f"done in {_duration(event.elapsed_s)}: " + ", ".join(event.outputs))
        elif event.status == "interrupted":
            self._print("interrupted; no output was written")
