"""Progress on stderr, as an ordinary event-hook plugin.

On a terminal one line is rewritten every step; in a log one line is written
every few steps and at the end of each section. Every elapsed time is on one
clock, counted from the job start event. Until a section has finished, the ETA
is the sampler's step rate times the steps left; after that it is the mean
whole-section time (steps plus the VAE decode and write that follow them)
times the sections left, less what the current section has already taken.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from framepack.hookspecs import hookimpl


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressReporter:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.started_at: float | None = None
        self.section_started_at: float | None = None
        self.section_times: list[float] = []  # whole sections, start event to end event
        self.last_step: tuple[int, float] | None = None  # (section, time)
        self.step_time = 0.0  # summed time between steps of the same section
        self.step_gaps = 0
        self.sections_kept = 0  # finished sections, counting those of an earlier run of a resumed job

    def _elapsed(self) -> tuple[float, float]:
        """-> (now, seconds since the job started)."""
        now = self.clock()
        if self.started_at is None:  # no job start seen (a caller that skips it)
            self.started_at = now
        return now, now - self.started_at

    def _print(self, text: str, transient: bool = False) -> None:
        if self.tty:
            end = "" if transient else "\n"
            self.stream.write("\r\033[K" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    @hookimpl
    def framepack_on_job_start(self, event) -> None:
        self._reset()
        self.started_at = self.clock()
        self._print(
            f"framepack: {event.sections} section(s), {event.frames} frames at {event.width}x{event.height}, "
            f"{event.settings.steps} steps, seed {event.settings.seed}"
        )
        if event.plan:
            self._print(f"memory plan: {event.plan}")

    def _eta(self, now: float, event) -> float | None:
        steps_here = event.steps - event.step - 1
        sections_after = event.sections - event.section - 1
        rate = self.step_time / self.step_gaps if self.step_gaps else None
        if self.section_times:
            mean = sum(self.section_times) / len(self.section_times)
            in_section = now - (self.section_started_at if self.section_started_at is not None else now)
            # Never below what the steps alone still need (a slow section).
            here = max(mean - in_section, (rate or 0.0) * steps_here)
            return here + mean * sections_after
        if rate is None:
            return None
        return rate * (steps_here + sections_after * event.steps)

    @hookimpl
    def framepack_on_step(self, event) -> None:
        now, elapsed = self._elapsed()
        if self.last_step is not None and self.last_step[0] == event.section:
            self.step_time += now - self.last_step[1]
            self.step_gaps += 1
        self.last_step = (event.section, now)
        eta = self._eta(now, event)
        text = (
            f"section {event.section + 1}/{event.sections} step {event.step + 1}/{event.steps}"
            f" | {_duration(elapsed)} elapsed | ETA {'?' if eta is None else _duration(eta)}"
        )
        every = max(1, event.steps // 5)
        if self.tty:
            self._print(text, transient=True)
        elif (event.step + 1) % every == 0 or event.step + 1 == event.steps:
            self._print(text)

    @hookimpl
    def framepack_on_section(self, event) -> None:
        now, elapsed = self._elapsed()
        if event.phase == "start":
            self.section_started_at = now
            self.sections_kept = max(self.sections_kept, event.index)  # a resumed job starts past 0
        elif event.phase == "end":
            if self.section_started_at is not None:
                self.section_times.append(now - self.section_started_at)
            self.sections_kept = max(self.sections_kept, event.index + 1)
            calls = f"{event.computed} transformer calls computed, {event.skipped} skipped"
            self._print(f"section {event.index + 1}/{event.count} done at {_duration(elapsed)} ({calls})")

    @hookimpl
    def framepack_on_job_end(self, event) -> None:
        _, elapsed = self._elapsed()
        if event.status == "done":
            self._print(f"done in {_duration(elapsed)}: " + ", ".join(event.outputs))
        elif event.status == "interrupted":
            # The caller prints the detail (partial video, how to resume) after this line.
            if self.sections_kept:
                self._print("interrupted; the finished sections are kept (see below)")
            else:
                self._print("interrupted; no section had finished, so nothing is kept (see below)")
