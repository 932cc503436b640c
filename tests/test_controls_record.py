"""Creative controls in the job record: sha256 of every image, `framepack info`,
`--from` re-runs, and a SIGKILLed job with timed prompts, an end frame and a
keyframe resumes bit-identically (and refuses when an image changed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from framepack.cli import main
from tests.jobs import cli, write_killer_plugin

SECONDS = 3.6  # three sections


def picture(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def job(tiny_model, image, end, keyframe, out: Path) -> list[str]:
    return ["generate", "--image", str(image), "--prompt", "[0s: a fox] [2.4s: a hare]", "--prompt-blend", "1",
            "--end-image", str(end), "--end-strength", "0.8", "--keyframe", f"1.5={keyframe}",
            "--model", str(tiny_model), "--seconds", str(SECONDS), "--steps", "2", "--size", "64x64",
            "--profile", "cpu", "--quiet", "--output", str(out), "--set", 'writers=["mp4"]',
            "--latents-out", str(out.with_suffix(".safetensors"))]


def latents(out: Path) -> torch.Tensor:
    return load_file(str(out.with_suffix(".safetensors")))["latents"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, test_image):
    root = tmp_path_factory.mktemp("inputs")
    return test_image, picture(root / "end.png", 1), picture(root / "key.png", 2)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "video.mp4"
    proc = cli(job(tiny_model, *inputs, out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_record_holds_every_control_and_image(uninterrupted, inputs, capsys):
    image, end, key = inputs
    record = json.loads(uninterrupted.with_suffix(".json").read_text())
    s = record["settings"]
    assert s["end_image"] == str(end.absolute()) and s["end_strength"] == 0.8 and s["prompt_blend"] == 1
    assert s["keyframes"] == [f"1.5={key.absolute()}"] and s["image_embeds"] is None and s["blank"] == "gray"
    import hashlib

    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}
    assert record["inputs"]["image"]["sha256"] == sha[image]
    assert record["inputs"]["end_image"]["sha256"] == sha[end]
    assert record["inputs"]["keyframes"] == [{"time": "1.5", "path": str(key.absolute()), "sha256": sha[key]}]
    assert main(["info", str(uninterrupted)]) == 0
    shown = capsys.readouterr().out
    for p in inputs:
        assert sha[p] in shown
    assert "end_strength: 0.8" in shown and "keyframe at 1.5 s sha256" in shown


def test_from_re_runs_the_controls(uninterrupted, tmp_path):
    again = tmp_path / "again.mp4"
    proc = cli(["generate", "--from", uninterrupted, "--output", again, "--latents-out",
                again.with_suffix(".safetensors"), "--quiet", "--profile", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(latents(again), latents(uninterrupted))


def test_sigkill_then_resume_is_identical_and_a_changed_image_is_refused(uninterrupted, tiny_model, inputs,
                                                                          tmp_path):
    killer = write_killer_plugin(tmp_path / "killer")
    image, end, key = inputs
    end_copy, key_copy = shutil.copy(end, tmp_path / "end.png"), shutil.copy(key, tmp_path / "key.png")
    out = tmp_path / "video.mp4"
    proc = cli(job(tiny_model, image, end_copy, key_copy, out), {"KILL_AFTER": "0"}, killer)
    assert proc.returncode == -9, proc.stderr
    jobdir = Path(str(out) + ".job")
    pristine = tmp_path / "pristine.job"
    shutil.copytree(jobdir, pristine)

    done = cli(["resume", jobdir])
    assert done.returncode == 0, done.stderr
    assert torch.equal(latents(out), latents(uninterrupted))

    for changed, label in ((end_copy, "end_image"), (key_copy, "keyframes")):
        shutil.rmtree(jobdir, ignore_errors=True)
        shutil.copytree(pristine, jobdir)
        for done_file in (out, out.with_suffix(".safetensors"), out.with_suffix(".json")):
            done_file.unlink(missing_ok=True)
        original = Path(changed).read_bytes()
        picture(Path(changed), 9)
        refused = cli(["resume", jobdir])
        Path(changed).write_bytes(original)
        assert refused.returncode == 2, refused.stderr
        lines = [line for line in refused.stderr.splitlines() if line.startswith("framepack: error:")]
        assert len(lines) == 1 and "input changed" in lines[0] and label in lines[0], refused.stderr
