"""Timed prompts: ``[0s: a man waves] [2s-4s: he jumps] [4s: he spins]``.

FramePack-Studio's syntax: ``[Ns: text]`` starts a prompt at N seconds,
``[Ns-Ms: text]`` also ends it, text outside brackets starts at 0 s, and a
prompt without an end runs to the next start. Times are in playback order
and snap to section boundaries: section ``p`` (0 = first in playback) shows
seconds ``[p*L, (p+1)*L)`` with ``L = 4 * window / 30`` (1.2 s at window 9,
the frames each section adds to the finished video). The inverted model
generates the end first; ``schedule`` gives weights per playback section and
the loop maps generation index ``g`` to playback section ``S - 1 - g``.

Blending (``prompt_blend = N``, default 0): over the N sections before each
change the new prompt's weight rises (j + 1)/(N + 1) for the j-th of them
(j = 0..N-1), the old one's falls by as much; the Llama embedding (with its
mask) and the CLIP pooler are interpolated with those weights. A plain
prompt is one prompt with weight 1 everywhere: exactly the untimed path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from framepack.errors import UserError

_BRACKET = re.compile(r"\[\s*([0-9]*\.?[0-9]+)\s*s?\s*(?:-\s*([0-9]*\.?[0-9]+)\s*s?\s*)?:\s*([^\[\]]*?)\s*\]")


@dataclass(frozen=True)
class TimedPrompt:
    start: float  # seconds of the output video
    end: float | None  # None: runs to the next start (or the end)
    text: str


def parse_timed_prompt(text: str) -> list[TimedPrompt]:
    """The prompts of ``text`` in playback order; a text without brackets is one prompt at 0 s."""
    if "[" not in text and "]" not in text:
        return [TimedPrompt(0.0, None, text)]
    found, rest, pos = [], [], 0
    for m in _BRACKET.finditer(text):
        rest.append(text[pos:m.start()])
        pos = m.end()
        start, end = float(m.group(1)), None if m.group(2) is None else float(m.group(2))
        if not m.group(3):
            raise UserError(f"--prompt: the prompt at [{m.group(0)[1:-1]}] is empty")
        if end is not None and end <= start:
            raise UserError(f"--prompt: [{m.group(0)[1:-1]}] ends before it starts")
        found.append(TimedPrompt(start, end, m.group(3)))
    rest.append(text[pos:])
    outside = " ".join(" ".join(rest).split())
    if "[" in outside or "]" in outside:
        bad = outside[outside.find("[") if "[" in outside else outside.find("]"):][:40]
        raise UserError(f"--prompt: a bracket that is not a timed prompt near {bad!r} "
                        "(write [2s: text] or [2s-4s: text])")
    if outside:
        found.insert(0, TimedPrompt(0.0, None, outside))
    for before, after in zip(found, found[1:]):
        if after.start < before.start:
            raise UserError(f"--prompt: times out of order: [{after.start:g}s] comes after [{before.start:g}s]")
    return found


def section_seconds(window: int) -> float:
    return 4 * window / 30


def schedule(prompts: list[TimedPrompt], sections: int, window: int, blend: int = 0) -> list[dict[str, float]]:
    """Per playback section, {prompt text: weight} (weights sum to 1)."""
    length = section_seconds(window)
    video = sections * length
    for p in prompts:
        if p.start >= video or (p.end is not None and p.end > video + 1e-9):
            raise UserError(f"--prompt: [{p.start:g}s{'' if p.end is None else f'-{p.end:g}s'}] is past the end of "
                            f"the {video:g} s video")
    hard: list[str | None] = [None] * sections
    for index, p in enumerate(prompts):
        first = round(p.start / length)
        nxt = prompts[index + 1].start if index + 1 < len(prompts) else None
        stop = p.end if p.end is not None else nxt
        last = sections if stop is None else round(stop / length)
        for s in range(first, min(max(last, first + 1), sections)):
            hard[s] = p.text
    for s in range(sections):  # a gap keeps the prompt before it (or the first one)
        if hard[s] is None:
            hard[s] = hard[s - 1] if s else prompts[0].text
    weights = [{text: 1.0} for text in hard]
    if blend > 0:
        for change in range(1, sections):
            old, new = hard[change - 1], hard[change]
            if old == new:
                continue
            for j in range(blend):
                s = change - blend + j
                if s < 0 or hard[s] != old:
                    continue
                w = (j + 1) / (blend + 1)
                weights[s] = {old: 1.0 - w, new: w}
    return weights
