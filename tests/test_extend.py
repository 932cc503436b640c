"""Video extension (--extend): frame counts, the input's frames kept, what the
transformer reads, other sizes and frame rates, bad inputs, the record,
--from and a SIGKILLed extension resumed bit-identically."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from framepack import Pipeline
from framepack.cli import main
from framepack.output.timeline import PixelTimeline, crossfade_weights
from framepack.output.video_input import decode_rgb, probe_video
from framepack.pipeline.sections import inverted_layout
from tests.jobs import cli, frames_of, write_killer_plugin, write_plain_video
from tests.recording import TransformerInputs

FAST = dict(size="64x64", steps=1, seed=5)
ADDED = 72  # 2 s at window 9: two sections of 36 frames


@pytest.fixture(scope="module")
def pipe(tiny_model):
    with Pipeline(model=tiny_model, profile="cpu") as p:
        yield p


@pytest.fixture(scope="module")
def inputs(pipe, test_image, tmp_path_factory):
    """A framepack video per variant: 2.4 s, 73 frames, as mp4 only."""
    root = tmp_path_factory.mktemp("extend-inputs")
    made = {}
    for variant in ("original", "f1"):
        out = root / f"{variant}.mp4"
        pipe.generate(test_image, "a fox", output=out, seconds=2.4, variant=variant, overrides=['writers=["mp4"]'],
                      **FAST)
        made[variant] = out
    return made


@pytest.mark.parametrize("variant", ["original", "f1"])
def test_extending_a_framepack_video_keeps_its_frames(variant, pipe, inputs, tmp_path, monkeypatch, capsys):
    source = inputs[variant]
    rec = TransformerInputs(monkeypatch)
    out = tmp_path / "longer.mp4"
    result = pipe.generate(None, "a fox runs", extend=source, output=out, seconds=2, variant=variant,
                           overrides=['writers=["mp4"]'], on_event=rec.on_event, **FAST)
    before, after = frames_of(source), frames_of(out)
    n = len(before)
    assert result.frames == n + ADDED == len(after) == 145
    assert result.sections == 2 and result.latents.shape[2] == 9 * 3  # from the cross-fade's start on

    fade = n - 33
    keyframes = probe_video(source).keyframes
    copied = max(k for k in keyframes if k <= fade)  # packets copied up to the last keyframe before the fade
    assert copied == (fade if variant == "f1" else 33)  # F1's last segment is the 33-frame edge
    assert np.array_equal(after[:copied], before[:copied])
    assert f"packets copied without re-encoding (mp4: {copied} frames)" in capsys.readouterr().err
    for i in range(copied, fade):  # encoded once again: each is nearest to its own input frame
        errors = [np.abs(after[i].astype(int) - before[j]).mean() for j in range(i - 2, i + 3)]
        assert int(np.argmin(errors)) == 2, (i, errors)

    # What the transformer read: the input's latents as context.
    head = result.latents[:, :, :9]  # the latents of the input's last 33 frames
    if variant == "original":  # all nine before every section, then the post slot
        for section in (0, 1):
            clean = rec.first(section, "latents_clean")
            assert clean.shape[2] == 10 and torch.equal(clean[:, :, :9].float(), head.to(clean.dtype).float())
    else:  # the history: the 1x slot is the input's last latent
        clean = rec.first(0, "latents_clean")
        assert clean.shape[2] == 2 and torch.equal(clean[:, :, 1:].float(), head[:, :, -1:].to(clean.dtype).float())
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["settings"]["extend"] == str(source.absolute())
    assert record["inputs"]["extend"]["sha256"] and record["extra"]["extend_frames"] == n
    assert record["extra"]["frames"] == n + ADDED


def test_an_extension_can_head_for_an_end_frame(pipe, inputs, test_image, tmp_path, monkeypatch):
    """Inverted model: the end image fills the post slot after the input's latents."""
    rec = TransformerInputs(monkeypatch)
    result = pipe.generate(None, "a fox", extend=inputs["original"], end_image=test_image, output=tmp_path / "e.mp4",
                           seconds=1.2, overrides=['writers=["mp4"]'], on_event=rec.on_event, **FAST)
    clean = rec.first(0, "latents_clean")
    assert clean.shape[2] == 10 and clean[:, :, 9].abs().sum() > 0  # zeros without an end frame
    assert torch.equal(clean[:, :, :9].float(), result.latents[:, :, :9].to(clean.dtype).float())
    assert result.frames == 73 + 36


def test_the_fade_starts_at_the_input_and_ends_at_the_new_clip():
    """The inverted model's front edge fades in from the input's tail."""
    timeline = PixelTimeline(33, "front")
    new = torch.rand(1, 3, 69, 4, 4) * 2 - 1
    timeline.add(new)
    tail = torch.rand(1, 3, 33, 4, 4) * 2 - 1
    frames = timeline.finish(tail)
    w = crossfade_weights(33).view(1, 1, -1, 1, 1)
    expected = (torch.clamp(w * tail + (1 - w) * new[:, :, :33], -1, 1) * 127.5 + 127.5).to(torch.uint8)
    assert np.array_equal(frames, expected[0].permute(1, 2, 3, 0).numpy())
    with pytest.raises(ValueError, match="fade-in needs 33"):
        t = PixelTimeline(33, "front")
        t.add(new)
        t.finish(tail[:, :, :20])


def test_the_inverted_layout_puts_the_whole_context_before_the_section():
    layout = inverted_layout(1, 9, pre=9)
    assert layout.clean[:9].tolist() == list(range(9)) and layout.latent.tolist() == list(range(18, 27))
    assert layout.clean[9].item() == 27 and layout.clean_4x[-1].item() == 27 + 2 + 16
    plain = inverted_layout(1, 9)
    assert plain.clean.tolist() == [0, 19] and plain.latent.tolist() == list(range(10, 19))


def test_another_size_and_frame_rate_is_resized_and_resampled(pipe, tmp_path, capsys):
    source = write_plain_video(tmp_path / "phone.mp4", 48, fps=24, size=(96, 80))  # 2 s at 24 fps, not 64x64
    out = tmp_path / "more.mp4"
    result = pipe.generate(None, "a fox", extend=source, output=out, seconds=2, variant="f1",
                           overrides=['writers=["mp4"]'], **FAST)
    err = capsys.readouterr().err
    assert "80x96 resized and cropped to 64x64" in err and "24 fps resampled to 30 fps" in err
    assert "packets copied" not in err
    assert result.frames == 60 + ADDED == len(frames_of(out))


def test_a_video_of_another_writer_is_encoded_again(pipe, tmp_path, capsys):
    source = write_plain_video(tmp_path / "plain.mp4", 40)  # 64x64 at 30 fps, but other x264 settings
    result = pipe.generate(None, "a fox", extend=source, output=tmp_path / "o.mp4", seconds=1.2, variant="original",
                           overrides=['writers=["mp4", "png"]'], **FAST)
    assert "packets copied" not in capsys.readouterr().err
    frames = frames_of(tmp_path / "o.mp4")
    pngs = frames_of(tmp_path / "o")
    assert result.frames == 40 + 36 == len(frames) == len(pngs)
    # The png writer keeps the input's frames as decoded; the fade starts at frame 40 - 33.
    assert np.array_equal(pngs[:7], np.stack(list(decode_rgb(source)))[:7])


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a video"), "not a video PyAV can read"),
    (lambda p: write_plain_video(p, 20), "20 frames (0.67 s at 30 fps) is too short"),
    (lambda p: None, "no such file"),
])
def test_bad_extend_input_is_one_line_and_writes_nothing(make, message, tiny_model, tmp_path, capsys):
    source = tmp_path / "in" / "v.mp4"
    source.parent.mkdir()
    make(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["generate", "--extend", str(source), "--prompt", "a fox", "--model", str(tiny_model),
                 "--profile", "cpu", "--size", "64x64", "--steps", "1", "--output", str(out_dir / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("framepack: error: --extend") and message in lines[0], err
    assert list(out_dir.iterdir()) == []


def test_extend_refuses_an_image_and_keyframes(inputs, test_image, tiny_model, tmp_path, capsys):
    base = ["generate", "--extend", str(inputs["original"]), "--prompt", "a fox", "--model", str(tiny_model),
            "--profile", "cpu", "--size", "64x64", "--output", str(tmp_path / "o.mp4")]
    assert main(base + ["--image", str(test_image)]) == 2
    assert "leave out --image" in capsys.readouterr().err
    assert main(base + ["--keyframe", f"1.5={test_image}"]) == 2
    assert "keyframes are not supported when extending" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_extending_its_own_output_is_refused(inputs, tiny_model, tmp_path, capsys):
    source = shutil.copy(inputs["f1"], tmp_path / "v.mp4")
    code = main(["generate", "--extend", str(source), "--prompt", "a fox", "--model", str(tiny_model),
                 "--profile", "cpu", "--size", "64x64", "--output", str(source), "--overwrite"])
    assert code == 2 and "--extend" in capsys.readouterr().err


def extend_job(tiny_model, source, out: Path) -> list[str]:
    return ["generate", "--extend", str(source), "--prompt", "[0s: a fox] [1.2s: a hare]", "--model", str(tiny_model),
            "--seconds", "3.6", "--steps", "2", "--size", "64x64", "--profile", "cpu", "--quiet",
            "--output", str(out), "--set", 'writers=["mp4", "png"]', "--latents-out", str(out.with_suffix(".safetensors"))]


def test_sigkill_then_resume_and_from_are_identical(inputs, tiny_model, tmp_path, capsys):
    source = shutil.copy(inputs["original"], tmp_path / "input.mp4")
    full = tmp_path / "full.mp4"
    assert cli(extend_job(tiny_model, source, full)).returncode == 0

    killer = write_killer_plugin(tmp_path / "killer")
    out = tmp_path / "killed.mp4"
    proc = cli(extend_job(tiny_model, source, out), {"KILL_AFTER": "1"}, killer)
    assert proc.returncode == -9, proc.stderr
    jobdir = Path(str(out) + ".job")
    assert sorted(p.name for p in (jobdir / "segments" / "mp4").glob("lead-*")) == ["lead-0.mp4", "lead-1.mp4"]
    pristine = tmp_path / "pristine.job"
    shutil.copytree(jobdir, pristine)
    (jobdir / "segments" / "mp4" / "lead-1.mp4").write_bytes(b"damaged")  # rewritten from the input
    done = cli(["resume", jobdir])
    assert done.returncode == 0, done.stderr
    assert torch.equal(load_file(str(out.with_suffix(".safetensors")))["latents"],
                       load_file(str(full.with_suffix(".safetensors")))["latents"])
    assert np.array_equal(frames_of(out), frames_of(full))
    assert np.array_equal(frames_of(tmp_path / "killed"), frames_of(tmp_path / "full"))

    # A changed input video is refused.
    shutil.rmtree(jobdir, ignore_errors=True)
    shutil.copytree(pristine, jobdir)
    for done_file in (out, out.with_suffix(".safetensors"), out.with_suffix(".json")):
        done_file.unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "killed")
    write_plain_video(Path(source), 80)
    refused = cli(["resume", jobdir])
    assert refused.returncode == 2 and "input changed" in refused.stderr and "extend" in refused.stderr

    shutil.copy(inputs["original"], source)
    again = tmp_path / "again.mp4"
    proc = cli(["generate", "--from", full, "--output", again, "--latents-out", again.with_suffix(".safetensors"),
                "--quiet", "--profile", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(again.with_suffix(".safetensors")))["latents"],
                       load_file(str(full.with_suffix(".safetensors")))["latents"])
    assert main(["info", str(full)]) == 0
    assert "extend sha256" in capsys.readouterr().out


def test_probe_counts_frames_and_keyframes(tmp_path):
    probe = probe_video(write_plain_video(tmp_path / "v.mp4", 45, fps=25))
    assert probe.frames == 45 and probe.fps == Fraction(25) and probe.keyframes[0] == 0
    assert (probe.width, probe.height, probe.codec) == (64, 64, "h264")


@pytest.mark.parametrize("rotation, turns", [(-90, 3), (90, 1), (180, 2)])
def test_a_turned_video_is_probed_and_decoded_upright(tmp_path, rotation, turns):
    stored = np.stack(list(decode_rgb(write_plain_video(tmp_path / "flat.mp4", 8, size=(48, 80)))))
    turned = write_plain_video(tmp_path / "turned.mp4", 8, size=(48, 80), rotation=rotation)
    probe = probe_video(turned)
    assert probe.rotation == turns * 90 and probe.frames == 8
    assert (probe.height, probe.width) == ((48, 80) if turns == 2 else (80, 48))  # as a player shows it
    upright = np.stack(list(decode_rgb(turned)))
    assert upright.shape == (8, probe.height, probe.width, 3)
    assert np.array_equal(upright, np.rot90(stored, turns, axes=(1, 2)))  # the same packets, turned


def test_a_portrait_phone_video_is_extended_upright(pipe, tmp_path, capsys):
    source = write_plain_video(tmp_path / "phone.mp4", 40, size=(64, 96), rotation=-90)  # stored 96 wide
    out = tmp_path / "more.mp4"
    result = pipe.generate(None, "a fox", extend=source, output=out, seconds=1.2, variant="f1",
                           overrides=['writers=["mp4", "png"]'], **FAST)
    err = capsys.readouterr().err
    assert "64x96 resized and cropped to 64x64" in err and "packets copied" not in err  # width x height
    frames = frames_of(tmp_path / "more")
    assert result.frames == 40 + 36 == len(frames)
    from framepack.pipeline.buckets import resize_and_center_crop

    first = resize_and_center_crop(next(iter(decode_rgb(source))), 64, 64)
    assert np.array_equal(frames[0], first)  # the lead: the upright input, as the png writer keeps it


def test_an_absurdly_long_input_is_refused(tmp_path, monkeypatch):
    import framepack.pipeline.extend as extend
    from framepack import UserError
    from framepack.pipeline.settings import JobSettings

    monkeypatch.setattr(extend, "MAX_INPUT_SECONDS", 1.0)  # an hour is the real limit; 40 frames are 1.33 s
    settings = JobSettings(image=None, prompt="a", output=tmp_path / "o.mp4",
                           extend=write_plain_video(tmp_path / "v.mp4", 40))
    with pytest.raises(UserError, match="longer than the 1 s an extension reads"):
        extend.check_extension(settings)


def test_the_inputs_sound_is_copied_into_the_extended_video(pipe, tmp_path, capsys):
    import av

    from framepack.output.metadata import read_metadata

    source = write_plain_video(tmp_path / "talk.mp4", 40, audio=True)
    out = tmp_path / "more.mp4"
    result = pipe.generate(None, "a fox", extend=source, output=out, seconds=1.2, variant="f1",
                           overrides=['writers=["mp4", "webm"]'], **FAST)
    err = capsys.readouterr().err
    assert "its aac audio copied into more.mp4" in err
    assert "its aac audio is not in more.webm: " in err  # then FFmpeg's reason (WebM takes Opus or Vorbis)

    def packets(path, kind):
        with av.open(str(path)) as container:
            stream = getattr(container.streams, kind)[0]
            return [(p.pts, bytes(p)) for p in container.demux(stream) if p.dts is not None]

    assert packets(out, "audio") == packets(source, "audio")  # copied unchanged, at the input's times
    assert len(frames_of(out)) == result.frames == 40 + 36
    assert read_metadata(out)["settings"]["extend"] == str(source)  # the record's tags survive the remux
    with av.open(str(tmp_path / "more.webm")) as webm:
        assert not webm.streams.audio and len(webm.streams.video) == 1
    assert not list(tmp_path.glob(".*"))  # no temporary file left
