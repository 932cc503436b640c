"""Text-to-video: no --image, a blank start frame, for both variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framepack import Pipeline
from framepack.cli import main
from framepack.pipeline.blank import blank_image
from tests.jobs import frames_of
from tests.recording import TransformerInputs

FAST = dict(size="64x64", steps=1, seed=5)


def test_blank_frames():
    assert (blank_image("gray", 4, 6, 0) == 128).all() and blank_image("gray", 4, 6, 0).shape == (4, 6, 3)
    assert (blank_image("black", 4, 6, 0) == 0).all() and (blank_image("white", 4, 6, 0) == 255).all()
    noise = blank_image("noise", 32, 32, 7)
    assert np.array_equal(noise, blank_image("noise", 32, 32, 7))
    assert not np.array_equal(noise, blank_image("noise", 32, 32, 8))
    assert noise.std() > 50  # uniform over 0..255


@pytest.mark.parametrize("variant, blank", [("original", "gray"), ("f1", "noise")])
def test_text_to_video_for_both_variants(variant, blank, tiny_model, tmp_path, monkeypatch):
    rec = TransformerInputs(monkeypatch)
    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        result = pipe.generate(None, "a fox", output=tmp_path / "t.mp4", seconds=2.4, variant=variant, blank=blank,
                               on_event=rec.on_event, **FAST)
    assert result.frames == 4 * 9 * 2 + 1 == len(frames_of(tmp_path / "t.mp4"))
    assert result.latents.shape[2] == 2 * 9 + 1
    # the start frame is the blank one: the clean start latent the transformer reads is its latent
    assert torch.equal(rec.first(0, "latents_clean")[:, :, :1], result.latents[:, :, :1])
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["settings"]["image"] is None and record["settings"]["blank"] == blank
    assert "image" not in record["inputs"]


def test_the_blank_and_the_seed_choose_the_start_frame(tiny_model, tmp_path):
    with Pipeline(model=tiny_model, profile="cpu") as pipe:
        def start_latent(**kw):
            kw = {**FAST, **kw}
            return pipe.generate(None, "a fox", output=tmp_path / "x.mp4", seconds=1.2, overwrite=True,
                                 **kw).latents[:, :, :1]
        gray, black = start_latent(blank="gray"), start_latent(blank="black")
        noise5, noise6 = start_latent(blank="noise"), start_latent(blank="noise", seed=6)
    assert not torch.equal(gray, black)
    assert not torch.equal(noise5, noise6)


def test_cli_without_image(tiny_model, tmp_path, capsys):
    out = tmp_path / "t.mp4"
    code = main(["generate", "--prompt", "a fox", "--model", str(tiny_model), "--profile", "cpu", "--size", "64x64",
                 "--steps", "1", "--seconds", "1.2", "--blank", "white", "--output", str(out), "--json",
                 "--set", 'writers=["mp4"]'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["frames"] == 37 == len(frames_of(out))
    assert "text-to-video from a white start frame" in captured.err


def test_bad_blank_is_one_line(tiny_model, tmp_path, capsys):
    from framepack import UserError

    with Pipeline(model=tiny_model, profile="cpu") as pipe, pytest.raises(UserError, match="--blank 'pink'"):
        pipe.generate(None, "a fox", output=tmp_path / "t.mp4", blank="pink", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_blank_with_a_start_image_is_refused(tiny_model, test_image, tmp_path, capsys):
    code = main(["generate", "--image", str(test_image), "--prompt", "a fox", "--model", str(tiny_model),
                 "--profile", "cpu", "--size", "64x64", "--blank", "noise", "--output", str(tmp_path / "t.mp4")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--blank noise: the blank start frame is for text-to-video" in lines[0]
    assert list(tmp_path.iterdir()) == []
