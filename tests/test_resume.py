"""A killed or interrupted job continues from its job folder and gives what an
uninterrupted run gives: the same latents and the same frames.

Frames are compared through the lossless png writer and through the mp4,
whose encoding is deterministic (framepack.output.segments): a resumed job's mp4
decodes to exactly the frames of an uninterrupted one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.jobs import cli, frames_of, job_args, write_killer_plugin


@pytest.fixture(scope="module")
def killer_path(tmp_path_factory):
    return write_killer_plugin(tmp_path_factory.mktemp("killer"))


def assert_same_video(out: Path, expected: tuple) -> None:
    latents, pngs, mp4 = expected
    assert torch.equal(load_file(str(out.with_suffix(".safetensors")))["latents"], latents)
    np.testing.assert_array_equal(frames_of(out.with_suffix("")), pngs)  # lossless: identical
    np.testing.assert_array_equal(frames_of(out), mp4)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, test_image, tmp_path_factory):
    results = {}
    for variant, seconds in (("original", 4.8), ("f1", 3.6)):
        out = tmp_path_factory.mktemp(f"full-{variant}") / "video.mp4"
        proc = cli(job_args(tiny_model, test_image, out, variant, seconds))
        assert proc.returncode == 0, proc.stderr
        assert not Path(str(out) + ".job").exists()  # removed once the outputs are complete
        results[variant] = (load_file(str(out.with_suffix(".safetensors")))["latents"],
                            frames_of(out.with_suffix("")), frames_of(out))
    return results


@pytest.mark.parametrize("variant, seconds, kill_after", [("original", 4.8, 0), ("original", 4.8, 2), ("f1", 3.6, 1)])
def test_sigkill_then_resume_is_identical(variant, seconds, kill_after, uninterrupted, killer_path, tiny_model,
                                          test_image, tmp_path):
    out = tmp_path / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, variant, seconds), {"KILL_AFTER": str(kill_after)}, killer_path)
    assert proc.returncode == -9, proc.stderr  # killed, not finished
    assert not out.exists()
    jobdir = Path(str(out) + ".job")
    assert (jobdir / "checkpoint.safetensors").exists()
    done = cli(["resume", str(jobdir)])
    assert done.returncode == 0, done.stderr
    assert_same_video(out, uninterrupted[variant])
    assert not jobdir.exists()


def test_ctrl_c_leaves_a_checkpoint_and_a_playable_partial_video(uninterrupted, killer_path, tiny_model, test_image,
                                                                 tmp_path):
    out = tmp_path / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, "f1", 3.6), {"KILL_AFTER": "1", "KILL_SIGNAL": "SIGINT"},
               killer_path)
    assert proc.returncode == 1
    jobdir = Path(str(out) + ".job")
    assert f"continue with: framepack resume {jobdir}" in proc.stderr
    partial = tmp_path / "video.partial"  # the png writer's partial folder; video.partial.mp4 beside it
    assert partial.is_dir() and (tmp_path / "video.partial.mp4").exists() and not out.exists()
    _, pngs, _ = uninterrupted["f1"]
    head = frames_of(partial)
    assert 0 < len(head) < len(pngs)
    np.testing.assert_array_equal(head, pngs[: len(head)])  # F1: the beginning, final frames only
    assert len(frames_of(tmp_path / "video.partial.mp4")) == len(head)
    done = cli(["resume", str(jobdir)])
    assert done.returncode == 0, done.stderr
    assert_same_video(out, uninterrupted["f1"])


@pytest.fixture
def killed_job(killer_path, tiny_model, test_image, tmp_path):
    out = tmp_path / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, "original", 2.4), {"KILL_AFTER": "0"}, killer_path)
    assert proc.returncode == -9
    return Path(str(out) + ".job")


def test_a_corrupt_checkpoint_is_refused(killed_job):
    (killed_job / "checkpoint.safetensors").write_bytes(b"\x00" * 64)
    proc = cli(["resume", str(killed_job)])
    assert proc.returncode == 2 and "damaged" in proc.stderr


def test_a_foreign_checkpoint_is_refused(killed_job, tmp_path):
    other = tmp_path / "other.job"
    shutil.copytree(killed_job, other)
    job = (other / "job.json").read_text().replace('"seed": 31337', '"seed": 7')
    (other / "job.json").write_text(job)
    proc = cli(["resume", str(other)])
    assert proc.returncode == 2 and "belongs to another job" in proc.stderr


def test_changed_weights_are_refused(killer_path, tiny_model, test_image, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "video.mp4"
    proc = cli(job_args(model, test_image, out, "original", 2.4), {"KILL_AFTER": "0"}, killer_path)
    assert proc.returncode == -9
    weights = next((model / "transformer").glob("*.safetensors"))
    os.utime(weights, ns=(0, 10**9))  # as if the file had been replaced
    proc = cli(["resume", str(out) + ".job"])
    assert proc.returncode == 2 and "model files changed" in proc.stderr


def test_a_new_job_does_not_overwrite_an_unfinished_one(killed_job, tiny_model, test_image):
    out = Path(str(killed_job).removesuffix(".job"))
    proc = cli(job_args(tiny_model, test_image, out, "original", 2.4))
    assert proc.returncode == 2 and "framepack resume" in proc.stderr
    assert (killed_job / "checkpoint.safetensors").exists()
