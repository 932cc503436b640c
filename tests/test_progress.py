"""The progress lines: one clock for every elapsed time, an ETA that counts the
per-section decode and write, and a true word when a job is interrupted.

Synthetic events and a fake clock: nothing runs, every number is exact.
"""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from framepack.events import JobEnd, JobStart, SectionEvent, StepEvent
from framepack.output.progress import ProgressReporter

SECTIONS, STEPS = 3, 4
LOAD_S, STEP_S, DECODE_S = 10.0, 1.0, 6.0  # each section: 4 s of steps, then 6 s of decode and write


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0  # an arbitrary origin: only differences count

    def __call__(self) -> float:
        return self.now


def reporter() -> tuple[ProgressReporter, FakeClock, io.StringIO]:
    clock, stream = FakeClock(), io.StringIO()
    return ProgressReporter(stream=stream, clock=clock), clock, stream


def job_start(sections: int = SECTIONS) -> JobStart:
    settings = SimpleNamespace(steps=STEPS, seed=1)
    return JobStart(settings=settings, profile="cpu", backends={}, sections=sections, frames=33, width=64, height=64)


def run_sections(rep: ProgressReporter, clock: FakeClock, indices, sections: int = SECTIONS, stop_after_step=None):
    """Drive the hooks as the section loop does. ``elapsed_s`` in the events is
    the loop's own clock (it starts after loading), deliberately not ours."""
    loop_started = clock.now
    for index in indices:
        rep.framepack_on_section(event=SectionEvent(index, sections, "start", clock.now - loop_started))
        for step in range(STEPS):
            clock.now += STEP_S
            rep.framepack_on_step(event=StepEvent(index, sections, step, STEPS, clock.now - loop_started))
            if stop_after_step == (index, step):
                return
        clock.now += DECODE_S
        rep.framepack_on_section(event=SectionEvent(index, sections, "end", clock.now - loop_started, computed=4))


def seconds(text: str) -> float:
    parts = [int(p) for p in text.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def test_every_line_counts_elapsed_on_one_clock_from_the_job_start():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    started = clock.now
    clock.now += LOAD_S  # loading the models: the section loop's clock starts after it
    run_sections(rep, clock, range(SECTIONS))
    rep.framepack_on_job_end(event=JobEnd(status="done", outputs=("out.mp4",), elapsed_s=clock.now - started - 3))
    lines = stream.getvalue().splitlines()[1:]  # after the job's header line
    shown = []
    for line in lines:
        match = re.search(r"(\d+:\d\d) elapsed|done at (\d+:\d\d)|done in (\d+:\d\d)", line)
        assert match, line
        shown.append(seconds(next(g for g in match.groups() if g)))
    # Seconds since the job started: 4 steps, a section end, ... then the job end.
    assert shown == [11, 12, 13, 14, 20, 21, 22, 23, 24, 30, 31, 32, 33, 34, 40, 40]
    assert lines[4] == "section 1/3 done at 0:20 (4 transformer calls computed, 0 skipped)"
    assert lines[-1] == "done in 0:40: out.mp4"


def test_eta_counts_the_decode_of_each_section_once_one_has_finished():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    clock.now += LOAD_S
    run_sections(rep, clock, range(SECTIONS))
    etas = {}
    for line in stream.getvalue().splitlines():
        match = re.match(r"section (\d)/3 step (\d)/4 \| .* \| ETA (\S+)$", line)
        if match:
            etas[int(match[1]), int(match[2])] = match[3]
    # The first step: no rate yet.
    assert etas[1, 1] == "?"
    # Before any section has finished: the step rate (1 s a step), 8 steps left.
    assert etas[1, 4] == "0:08"
    # Then whole sections (10 s each): at section 2 step 2 the rest of this one
    # (10 - 2 s) and one more, exactly the time still to come.
    assert etas[2, 2] == "0:18"
    assert etas[3, 4] == "0:06"  # the last step: only the decode and write are left
    assert etas[3, 1] == "0:09"


def test_eta_of_a_resumed_job_counts_only_the_sections_left():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    run_sections(rep, clock, [2])  # sections 0 and 1 finished in an earlier run
    lines = [line for line in stream.getvalue().splitlines() if "step 3/4" in line]
    assert lines == ["section 3/3 step 3/4 | 0:03 elapsed | ETA 0:01"]


def test_interrupted_after_a_finished_section_says_it_is_kept():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    run_sections(rep, clock, range(SECTIONS), stop_after_step=(1, 2))
    rep.framepack_on_job_end(event=JobEnd(status="interrupted", outputs=(), elapsed_s=0))
    last = stream.getvalue().splitlines()[-1]
    assert last == "interrupted; the finished sections are kept (see below)"


def test_interrupted_resumed_job_still_has_its_earlier_sections():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    run_sections(rep, clock, [2], stop_after_step=(2, 0))
    rep.framepack_on_job_end(event=JobEnd(status="interrupted", outputs=(), elapsed_s=0))
    assert stream.getvalue().splitlines()[-1] == "interrupted; the finished sections are kept (see below)"


def test_interrupted_before_any_section_finished_says_nothing_is_kept():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    run_sections(rep, clock, range(SECTIONS), stop_after_step=(0, 1))
    rep.framepack_on_job_end(event=JobEnd(status="interrupted", outputs=(), elapsed_s=0))
    last = stream.getvalue().splitlines()[-1]
    assert last == "interrupted; no section had finished, so nothing is kept (see below)"


def test_a_second_job_on_the_same_reporter_starts_afresh():
    rep, clock, stream = reporter()
    rep.framepack_on_job_start(event=job_start())
    run_sections(rep, clock, range(SECTIONS))
    rep.framepack_on_job_end(event=JobEnd(status="done", outputs=("a.mp4",), elapsed_s=0))
    clock.now += 100
    rep.framepack_on_job_start(event=job_start(sections=1))
    run_sections(rep, clock, [0], sections=1)
    rep.framepack_on_job_end(event=JobEnd(status="done", outputs=("b.mp4",), elapsed_s=0))
    lines = stream.getvalue().splitlines()
    assert "section 1/1 step 1/4 | 0:01 elapsed | ETA ?" in lines
    assert lines[-1] == "done in 0:10: b.mp4"
