"""End frame: the end latent in the first generated section's clean_latents_post,
the strength, and the image embedding each section sees under each rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from framepack import Pipeline
from framepack.cli import main
from framepack.pipeline.controls import embedding_weights
from tests.recording import TransformerInputs

FAST = dict(size="64x64", steps=1, seed=5)
SECTIONS = 3
SECONDS = 3.6  # three sections at window 9


@pytest.fixture(scope="module")
def end_image(tmp_path_factory):
    y, x = np.mgrid[0:96, 0:80]
    rgb = np.stack([255 - x * 3, (x * y) % 256, y * 2], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("end") / "end.png"
    Image.fromarray(rgb).save(path)
    return path


class Recorded:
    """One job's result and what its transformer received."""

    def __init__(self, result, calls):
        self.latents, self.calls = result.latents, {g: list(c) for g, c in calls.items()}

    def first(self, g, key):
        return self.calls[g][0][key]


@pytest.fixture(scope="module")
def jobs(tiny_model, test_image, end_image, tmp_path_factory):
    """Each job these tests look at, run once."""
    out = tmp_path_factory.mktemp("jobs")
    mp = pytest.MonkeyPatch()
    rec = TransformerInputs(mp)
    done = {}
    runs = {
        "plain": (test_image, SECONDS, {}),
        "end_ref": (end_image, 1.2, {}),  # its start latent and embedding are the end image's
        "zero_start": (test_image, SECONDS, dict(end_image=end_image, end_strength=0, image_embeds="start")),
        "one_linear": (test_image, SECONDS, dict(end_image=end_image)),  # linear is the default with an end image
        # with real CFG, so the negative branch's calls are checked too
        "half_mean": (test_image, SECONDS, dict(end_image=end_image, end_strength=0.5, image_embeds="mean",
                                                cfg=1.5, negative_prompt="blurry")),
    }
    try:
        with Pipeline(model=tiny_model, profile="cpu") as pipe:
            for name, (image, seconds, kw) in runs.items():
                rec.calls.clear()
                result = pipe.generate(image, "a fox", output=out / f"{name}.mp4", seconds=seconds,
                                       on_event=rec.on_event, **FAST, **kw)
                done[name] = Recorded(result, rec.calls)
    finally:
        mp.undo()
    return done


def test_strength_zero_with_start_embeds_is_the_plain_job(jobs):
    assert torch.equal(jobs["plain"].latents, jobs["zero_start"].latents)
    assert not torch.equal(jobs["plain"].latents, jobs["one_linear"].latents)


@pytest.mark.parametrize("job, strength", [("one_linear", 1.0), ("half_mean", 0.5)])
def test_the_end_latent_is_the_first_sections_clean_latents_post(job, strength, jobs):
    # The inverted model's video starts with its start latent: the reference job gives the end image's.
    end_latent = jobs["end_ref"].latents[:, :, :1]
    start_latent = jobs["plain"].latents[:, :, :1]
    clean = jobs[job].first(0, "latents_clean")  # (1, 16, 2, h, w): pre, post
    expected = end_latent if strength == 1 else end_latent * strength
    assert torch.equal(clean[:, :, 1:2], expected)
    assert torch.equal(clean[:, :, :1], start_latent)
    assert not torch.equal(jobs["plain"].first(0, "latents_clean")[:, :, 1:2], expected)  # zeros there
    for g in range(1, SECTIONS):  # later sections read the frames generated before them
        assert not torch.equal(jobs[job].first(g, "latents_clean")[:, :, 1:2], expected)


def test_the_weight_tables_by_hand():
    approx = lambda table: [{k: pytest.approx(v) for k, v in w.items()} for w in table]  # noqa: E731
    assert embedding_weights("start", 4, True, set()) == [{"start": 1.0}] * 4
    assert embedding_weights("mean", 2, True, set()) == [{"start": 0.5, "end": 0.5}] * 2
    assert embedding_weights("linear", 4, True, set()) == approx([
        {"start": 1.0}, {"start": 2 / 3, "end": 1 / 3}, {"start": 1 / 3, "end": 2 / 3}, {"end": 1.0}])
    assert embedding_weights("linear", 1, True, set()) == [{"start": 0.5, "end": 0.5}]
    assert embedding_weights("linear", 3, False, {1}) == [{"start": 1.0}, {"keyframe": 1.0}, {"start": 1.0}]
    assert embedding_weights("linear", 3, True, {1}) == [{"start": 1.0}, {"keyframe": 0.5, "end": 0.5}, {"end": 1.0}]


@pytest.mark.parametrize("job, rule", [("zero_start", "start"), ("one_linear", "linear"), ("half_mean", "mean")])
def test_each_section_sees_the_embedding_of_its_rule(job, rule, jobs):
    start_embeds = jobs["plain"].first(0, "image_embeds")
    end_embeds = jobs["end_ref"].first(0, "image_embeds")
    assert not torch.equal(start_embeds, end_embeds)
    for g in range(SECTIONS):
        p = SECTIONS - 1 - g  # playback section: the inverted model generates the end first
        e = {"start": 0.0, "mean": 0.5, "linear": p / (SECTIONS - 1)}[rule]
        expected = (1 - e) * start_embeds + e * end_embeds
        assert len(jobs[job].calls[g]) == (2 if job == "half_mean" else 1)  # one step: a call per branch
        for call in jobs[job].calls[g]:  # every call of the section, both branches
            torch.testing.assert_close(call["image_embeds"], expected, rtol=0, atol=1e-6)
    if rule == "linear":  # the ends are exact: the end image's at the video's end, the start image's at its start
        assert torch.equal(jobs[job].first(0, "image_embeds"), end_embeds)
        assert torch.equal(jobs[job].first(SECTIONS - 1, "image_embeds"), start_embeds)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("framepack: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--variant", "f1"], "f1 variant"),
    (["--end-strength", "-0.5"], "--end-strength -0.5"),
    (["--end-strength", "nan"], "--end-strength nan"),
    (["--end-strength", "1.5"], "--end-strength 1.5"),
])
def test_bad_end_frame_settings_are_one_line(extra, words, tiny_model, test_image, end_image, tmp_path, capsys):
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    code = main(["generate", "--image", str(test_image), "--prompt", "a fox", "--model", str(tiny_model),
                 "--profile", "cpu", "--size", "64x64", "--steps", "1", "--seconds", "1", "--quiet",
                 "--output", str(out), "--end-image", str(end_image), *extra])
    assert code == 2
    assert words in one_error(capsys)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_an_unreadable_end_image_is_one_line(content, tiny_model, test_image, tmp_path, capsys):
    bad = tmp_path / "end.png"
    bad.write_bytes(content)
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    code = main(["generate", "--image", str(test_image), "--prompt", "a fox", "--model", str(tiny_model),
                 "--profile", "cpu", "--size", "64x64", "--steps", "1", "--seconds", "1", "--quiet",
                 "--output", str(out), "--end-image", str(bad)])
    assert code == 2
    line = one_error(capsys)
    assert "--end-image" in line and str(bad) in line
    assert list(out.parent.iterdir()) == []
