"""Keyframes: the section covering each time reads the keyframe's latent as its
clean_latents_pre (and its embedding), in the inverted model's generation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from framepack import Pipeline
from framepack.cli import main
from framepack.pipeline.controls import keyframe_sections
from framepack.pipeline.settings import JobSettings
from tests.recording import TransformerInputs

FAST = dict(size="64x64", steps=1, seed=5)
SECTIONS = 3


def picture(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def keyframe_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("kf")
    return picture(root / "one.png", 1), picture(root / "two.png", 2)


@pytest.fixture(scope="module")
def jobs(tiny_model, test_image, keyframe_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs")
    mp = pytest.MonkeyPatch()
    rec = TransformerInputs(mp)
    one, two = keyframe_images
    runs = {  # one-section references give each image's latent (the video's first) and embedding
        "start": (test_image, 1.2, {}), "one": (one, 1.2, {}), "two": (two, 1.2, {}),
        "keyed": (test_image, 3.6, dict(keyframes=[f"1.3={one}", (2.5, two)])),
    }
    done = {}
    try:
        with Pipeline(model=tiny_model, profile="cpu") as pipe:
            for name, (image, seconds, kw) in runs.items():
                rec.calls.clear()
                result = pipe.generate(image, "a fox", output=out / f"{name}.mp4", seconds=seconds,
                                       on_event=rec.on_event, **FAST, **kw)
                done[name] = (result.latents, {g: list(c) for g, c in rec.calls.items()})
    finally:
        mp.undo()
    return done


def test_keyframes_land_in_the_section_covering_their_time(jobs):
    latent = {name: jobs[name][0][:, :, :1] for name in ("start", "one", "two")}
    embeds = {name: jobs[name][1][0][0]["image_embeds"] for name in ("start", "one", "two")}
    calls = jobs["keyed"][1]
    # playback sections 0-1.2 s, 1.2-2.4 s, 2.4-3.6 s; the inverted model generates them 2, 1, 0
    expected = {0: "two", 1: "one", 2: "start"}
    for g, name in expected.items():
        assert calls[g]
        for call in calls[g]:
            assert torch.equal(call["latents_clean"][:, :, :1], latent[name]), (g, name)
            assert torch.equal(call["image_embeds"], embeds[name]), (g, name)
    assert torch.equal(jobs["keyed"][0][:, :, :1], latent["start"])  # the video still starts at the start image


def settings(*keyframes, seconds=6.0, variant="original"):
    return JobSettings(image=None, prompt="p", output="o.mp4", seconds=seconds, keyframes=keyframes, variant=variant)


def test_placement_by_hand():
    # 5 sections of 1.2 s: playback sections 0..4
    placed = keyframe_sections(settings("1.2=a.png", "3.5=b.png", "5.99=c.png"), 5)
    assert {p: kf.path.name for p, kf in placed.items()} == {1: "a.png", 2: "b.png", 4: "c.png"}


@pytest.mark.parametrize("keyframes, words", [
    (["7=a.png"], "--keyframe 7=a.png: 7 s is past the end of the 6 s video"),
    (["2.5=a.png", "3=b.png"], "--keyframe 2.5=a.png and --keyframe 3=b.png fall in the same section (section 2"),
    (["0.5=a.png"], "--keyframe 0.5=a.png: lands in section 0"),
    (["a.png"], "expected TIME=IMAGE"),
    (["x=a.png"], "expected TIME=IMAGE"),
    (["-1=a.png"], "--keyframe '-1=a.png': the time must be"),
])
def test_bad_keyframes_name_themselves(keyframes, words):
    from framepack import UserError

    with pytest.raises(UserError, match=None) as info:
        keyframe_sections(settings(*keyframes).validate(), 5)
    assert words in str(info.value)


def cli_args(tiny_model, test_image, out, *extra):
    return ["generate", "--image", str(test_image), "--prompt", "a fox", "--model", str(tiny_model),
            "--profile", "cpu", "--size", "64x64", "--steps", "1", "--seconds", "2.4", "--quiet",
            "--output", str(out), *extra]


@pytest.mark.parametrize("extra, words", [
    (["--keyframe", "9=KF"], "past the end"),
    (["--keyframe", "1.3=KF", "--keyframe", "2=KF"], "same section"),
    (["--keyframe", "1.3=KF", "--variant", "f1"], "f1 variant"),
    (["--keyframe", "1.3=MISSING"], "image not found"),
    (["--keyframe", "1.3=BROKEN"], "not an image"),
])
def test_cli_refuses_bad_keyframes_in_one_line(extra, words, tiny_model, test_image, keyframe_images, tmp_path,
                                               capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    names = {"KF": str(keyframe_images[0]), "MISSING": str(tmp_path / "missing.png"), "BROKEN": str(broken)}
    extra = [e.replace("=KF", "=" + names["KF"]).replace("=MISSING", "=" + names["MISSING"])
             .replace("=BROKEN", "=" + names["BROKEN"]) for e in extra]
    out = tmp_path / "out" / "v.mp4"
    out.parent.mkdir()
    assert main(cli_args(tiny_model, test_image, out, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("framepack: error:")]
    assert len(lines) == 1 and words in lines[0] and "--keyframe" in lines[0] and "Traceback" not in err, err
    assert list(out.parent.iterdir()) == []
