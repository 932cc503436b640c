"""Timed prompts: the parser, the per-section schedule (blends that really
move), the mapping onto the inverted model's generation order, and what the
transformer receives."""

from __future__ import annotations

import pytest
import torch

from framepack import Pipeline, SectionEvent, UserError
from framepack.pipeline.prompts import TimedPrompt, parse_timed_prompt, schedule

FAST = dict(size="64x64", steps=1, seed=5)


def test_parse_follows_studios_syntax():
    got = parse_timed_prompt("a calm sea [2s-4s: a wave rises] [4s: it breaks]")
    assert got == [TimedPrompt(0.0, None, "a calm sea"), TimedPrompt(2.0, 4.0, "a wave rises"),
                   TimedPrompt(4.0, None, "it breaks")]
    assert parse_timed_prompt("no brackets here") == [TimedPrompt(0.0, None, "no brackets here")]


@pytest.mark.parametrize("text, words", [("[0s: a] [2s: b", "bracket"), ("[3s: a] [1s: b]", "out of order"),
                                         ("[0s: ] [1s: b]", "empty"), ("[2s-1s: a]", "ends before")])
def test_bad_timed_prompts_say_what(text, words):
    with pytest.raises(UserError, match=words):
        parse_timed_prompt(text)


def test_the_schedule_by_hand():
    # 6 sections of 1.2 s at window 9: 0-1.2, 1.2-2.4, 2.4-3.6, 3.6-4.8, 4.8-6.0, 6.0-7.2.
    prompts = parse_timed_prompt("[0s: a] [2.4s: b] [6s: c]")
    assert schedule(prompts, 6, 9) == [{"a": 1}, {"a": 1}, {"b": 1}, {"b": 1}, {"b": 1}, {"c": 1}]
    blended = schedule(prompts, 6, 9, blend=2)
    expected = [{"a": 2 / 3, "b": 1 / 3}, {"a": 1 / 3, "b": 2 / 3}, {"b": 1}, {"b": 2 / 3, "c": 1 / 3},
                {"b": 1 / 3, "c": 2 / 3}, {"c": 1}]
    assert [{k: pytest.approx(v) for k, v in w.items()} for w in blended] == expected
    with pytest.raises(UserError, match="past the end"):
        schedule(parse_timed_prompt("[0s: a] [8s: b]"), 6, 9)


@pytest.mark.parametrize("variant", ["original", "f1"])
def test_sections_receive_the_scheduled_embeddings(variant, tiny_model, test_image, tmp_path):
    seen = []

    def record(event):
        if isinstance(event, SectionEvent) and event.phase == "start":
            seen.append((event.index, event.prompts))

    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        pipe.generate(test_image, "[0s: a fox] [2.4s: a hare]", output=tmp_path / "t.mp4", seconds=6,
                      variant=variant, prompt_blend=1, on_event=record, **FAST)
    by_playback = [{"a fox": 1.0}, {"a fox": 0.5, "a hare": 0.5}, {"a hare": 1.0}, {"a hare": 1.0}, {"a hare": 1.0}]
    sections = len(by_playback)
    order = [sections - 1 - g for g in range(sections)] if variant == "original" else list(range(sections))
    assert [w for _, w in seen] == [by_playback[p] for p in order]


def test_a_plain_prompt_and_zero_s_bracket_are_the_untimed_job(tiny_model, test_image, tmp_path):
    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        plain = pipe.generate(test_image, "a fox", output=tmp_path / "a.mp4", seconds=2.4, **FAST)
        bracket = pipe.generate(test_image, "[0s: a fox]", output=tmp_path / "b.mp4", seconds=2.4, **FAST)
        other = pipe.generate(test_image, "[0s: a fox] [1.2s: a hare]", output=tmp_path / "c.mp4", seconds=2.4,
                              **FAST)
    assert torch.equal(plain.latents, bracket.latents)
    assert not torch.equal(plain.latents, other.latents)
