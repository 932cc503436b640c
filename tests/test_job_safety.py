"""The job folder's guarantees (docs/output.md): framepack deletes only what
it wrote, never writes over an input, lets one process at a time work in a
job folder, and resumes only from files that check out, rebuilding what it
can and naming what it cannot.

Jobs that must be killed, paused or run side by side run as real processes
(tests.jobs); the rest run in-process through ``framepack.cli.main``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from framepack.cli import main
from tests.jobs import cli, flip_byte, frames_of, job_args, start_cli, write_killer_plugin

SECONDS = 3.6  # three sections of the inverted model: resume has middle sections to lose


@pytest.fixture(scope="module")
def killer_path(tmp_path_factory):
    return write_killer_plugin(tmp_path_factory.mktemp("killer"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fast_args(tiny_model, image, out, *extra):
    return ["generate", "--image", str(image), "--prompt", "a fox", "--model", str(tiny_model), "--size", "64x64",
            "--steps", "1", "--seconds", "1", "--profile", "cpu", "--quiet", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, test_image, tmp_path_factory):
    """latents and png frames of an uninterrupted run of the job the resume tests kill."""
    out = tmp_path_factory.mktemp("full") / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, "original", SECONDS))
    assert proc.returncode == 0, proc.stderr
    return load_file(str(out.with_suffix(".safetensors")))["latents"], frames_of(out.with_suffix(""))


@pytest.fixture(scope="module")
def killed_template(killer_path, tiny_model, test_image, tmp_path_factory):
    """A job SIGKILLed after its second section (index 1) finished, and a pristine copy of its folder."""
    out = tmp_path_factory.mktemp("killed") / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, "original", SECONDS), {"KILL_AFTER": "1"}, killer_path)
    assert proc.returncode == -9, proc.stderr
    pristine = out.parent.parent / (out.parent.name + "-pristine.job")
    shutil.copytree(Path(str(out) + ".job"), pristine)
    return out, pristine


@pytest.fixture
def killed(killed_template):
    """That killed job, as it was left: its record names its output, so each test
    gets the folder back in place and the outputs of the one before removed."""
    out, pristine = killed_template
    for path in out.parent.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    jobdir = Path(str(out) + ".job")
    shutil.copytree(pristine, jobdir)
    return out, jobdir


def assert_same(out: Path, expected) -> None:
    latents, pngs = expected
    assert torch.equal(load_file(str(out.with_suffix(".safetensors")))["latents"], latents)
    np.testing.assert_array_equal(frames_of(out.with_suffix("")), pngs)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("framepack: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# --- 1. data loss ------------------------------------------------------------------------


def test_a_job_dir_holding_user_files_is_refused_and_kept(tiny_model, test_image, run_in_tmp, capsys):
    work = run_in_tmp / "work"
    work.mkdir()
    (work / "thesis.txt").write_text("years of work")
    rc = main(fast_args(tiny_model, test_image, "out.mp4", "--job-dir", "work"))
    assert rc == 2
    assert "not a framepack job folder" in one_error_line(capsys.readouterr().err)
    assert (work / "thesis.txt").read_text() == "years of work"


def test_job_dir_dot_never_empties_the_current_folder(tiny_model, test_image, run_in_tmp, capsys):
    (run_in_tmp / "notes.txt").write_text("keep me")
    rc = main(fast_args(tiny_model, test_image, "out.mp4", "--job-dir", "."))
    assert rc == 2
    one_error_line(capsys.readouterr().err)
    assert (run_in_tmp / "notes.txt").read_text() == "keep me"


def test_an_empty_folder_is_used_and_left_in_place(tiny_model, test_image, run_in_tmp, capsys):
    (run_in_tmp / "scratch").mkdir()
    assert main(fast_args(tiny_model, test_image, "out.mp4", "--job-dir", "scratch")) == 0
    assert Path("out.mp4").exists()
    assert (run_in_tmp / "scratch").is_dir() and not any((run_in_tmp / "scratch").iterdir())


def test_removal_deletes_only_what_the_job_wrote(killed, tiny_model, uninterrupted):
    out, jobdir = killed
    (jobdir / "my-notes.txt").write_text("mine")
    (jobdir / "segments" / "png" / "README").write_text("also mine")
    done = cli(["resume", jobdir])
    assert done.returncode == 0, done.stderr
    assert_same(out, uninterrupted)
    left = sorted(p.relative_to(jobdir).as_posix() for p in jobdir.rglob("*"))
    assert left == ["my-notes.txt", "segments", "segments/png", "segments/png/README"]


@pytest.mark.parametrize("case", ["preview-is-image", "output-is-image", "latents-is-image", "job-dir-holds-image",
                                  "png-folder-holds-image", "output-in-model", "job-dir-is-output"])
def test_no_output_may_be_or_contain_an_input(case, tiny_model, test_image, run_in_tmp, capsys):
    images = run_in_tmp / "images"
    images.mkdir()
    image = images / {"output-is-image": "photo.mp4", "latents-is-image": "photo.safetensors"}.get(case, "photo.png")
    shutil.copyfile(test_image, image)
    model = run_in_tmp / "model"
    shutil.copytree(tiny_model, model)
    before = digest(image)
    extra = {
        "preview-is-image": ["--output", "out.mp4", "--preview", str(image)],
        "output-is-image": ["--output", str(image)],
        "latents-is-image": ["--output", "out.mp4", "--latents-out", str(image)],
        "job-dir-holds-image": ["--output", "out.mp4", "--job-dir", str(images)],
        "png-folder-holds-image": ["--output", str(images), "--set", 'writers=["png"]'],
        "output-in-model": ["--output", str(model / "transformer" / "video.mp4")],
        "job-dir-is-output": ["--output", "out.mp4", "--job-dir", "out.mp4"],
    }[case]
    args = fast_args(model, image, "unused.mp4")
    args = args[: args.index("--output")] + extra
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "never writes over what it reads" in line or "not a framepack job folder" in line, line
    assert digest(image) == before
    assert not (run_in_tmp / "out.mp4").exists() and not (model / "transformer" / "video.mp4").exists()


# --- 2. two jobs on one output ---------------------------------------------------------------


def test_a_second_job_or_resume_on_a_working_folder_is_refused(killer_path, tiny_model, test_image, tmp_path):
    out = tmp_path / "video"  # png only: the frame folder is the output
    pause = tmp_path / "pause"
    pause.mkdir()
    first = start_cli(job_args(tiny_model, test_image, out, "original", 2.4, writers=("png",), latents=False),
                      {"KILL_AFTER": "0", "PAUSE_DIR": str(pause)}, killer_path)
    try:
        deadline = time.monotonic() + 300
        while not (pause / "ready").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = cli(job_args(tiny_model, test_image, out, "original", 2.4, writers=("png",), latents=False)
                     + ["--seed", "7"])
        again = cli(["resume", str(out) + ".job"])
    finally:
        (pause / "go").write_text("")
        stdout, stderr = first.communicate(timeout=300)
    pid = (pause / "ready").read_text()
    for proc in (second, again):
        assert proc.returncode == 2, proc.stderr
        line = one_error_line(proc.stderr)
        assert f"another process (pid {pid}) is working in" in line
        assert "framepack resume" not in line  # never advise resuming a job that is running
    assert first.returncode == 0, stderr
    record = json.loads((tmp_path / "video.json").read_text())
    assert record["settings"]["seed"] == 31337
    assert len(list((tmp_path / "video").glob("*.png"))) == 73  # 2 sections, one job's frames


# --- 3. and 4. resume checks everything first ------------------------------------------------


def test_files_written_after_the_checkpoint_are_discarded(killed, uninterrupted):
    out, jobdir = killed
    # As if killed after section 2's segments and latents but before its checkpoint.
    shutil.copytree(jobdir / "segments" / "png" / "0001", jobdir / "segments" / "png" / "0002")
    shutil.copyfile(jobdir / "segments" / "mp4" / "0001.mp4", jobdir / "segments" / "mp4" / "0002.mp4")
    shutil.copyfile(jobdir / "latents" / "0001.safetensors", jobdir / "latents" / "0002.safetensors")
    (jobdir / "latents" / ".0002.safetensors.partial-99").write_bytes(b"half")
    done = cli(["resume", jobdir])
    assert done.returncode == 0, done.stderr
    assert_same(out, uninterrupted)


def test_damaged_or_missing_segments_are_rebuilt_from_the_latents(killed, uninterrupted):
    out, jobdir = killed
    flip_byte(jobdir / "segments" / "mp4" / "0001.mp4", 200)  # segment 0 is empty: its frames are the edge
    shutil.rmtree(jobdir / "segments" / "png" / "0001")
    done = cli(["resume", jobdir])
    assert done.returncode == 0, done.stderr
    assert_same(out, uninterrupted)
    assert len(frames_of(out)) == len(uninterrupted[1])


def test_lost_latents_name_the_section_and_recompute_from_there(killed, uninterrupted):
    out, jobdir = killed
    flip_byte(jobdir / "latents" / "0001.safetensors")
    proc = cli(["resume", jobdir])
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "section 1 is lost" in line and f"framepack resume {jobdir} --recompute-from 1" in line
    assert "section 1/" not in proc.stderr  # refused before computing anything
    done = cli(["resume", jobdir, "--recompute-from", "1"])
    assert done.returncode == 0, done.stderr
    assert_same(out, uninterrupted)


@pytest.mark.parametrize("damage", ["checkpoint-byte", "latents-byte", "latents-truncated", "section-counter",
                                    "job-json-type"])
def test_damaged_job_files_are_refused_naming_the_file(damage, killed):
    _, jobdir = killed
    ck = jobdir / "checkpoint.safetensors"
    if damage == "checkpoint-byte":
        flip_byte(ck, 7)
        named = "checkpoint.safetensors"
    elif damage == "latents-byte":
        flip_byte(jobdir / "latents" / "0000.safetensors")
        named = "0000.safetensors"
    elif damage == "latents-truncated":
        path = jobdir / "latents" / "0001.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        named = "0001.safetensors"
    elif damage == "section-counter":
        data = ck.read_bytes()
        assert b'\\"next_section\\": 2' in data
        ck.write_bytes(data.replace(b'\\"next_section\\": 2', b'\\"next_section\\": 1'))
        named = "checkpoint.safetensors"
    else:
        (jobdir / "job.json").write_text("[1, 2, 3]")
        named = "job.json"
    proc = cli(["resume", jobdir])
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert named in line and "damaged" in line, line
    assert (jobdir / "checkpoint.safetensors").exists()  # nothing removed that could still be resumed


def test_a_lost_checkpoint_is_rebuilt_from_the_section_latents(killed, uninterrupted):
    out, jobdir = killed
    flip_byte(jobdir / "checkpoint.safetensors", 3)
    proc = cli(["resume", jobdir])
    assert proc.returncode == 2 and "--recompute-from 2" in one_error_line(proc.stderr)
    done = cli(["resume", jobdir, "--recompute-from", "2"])
    assert done.returncode == 0, done.stderr
    assert_same(out, uninterrupted)


# --- 7. faults give one line ---------------------------------------------------------------


def test_invalid_utf8_prompt_is_one_line(tiny_model, test_image, run_in_tmp, capsys):
    args = fast_args(tiny_model, test_image, "out.mp4")
    args[args.index("a fox")] = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what Linux argv gives
    assert main(args) == 2
    assert "--prompt: not valid UTF-8" in one_error_line(capsys.readouterr().err)
    assert not any(run_in_tmp.glob("*.mp4*"))


def test_output_under_a_folder_that_cannot_be_written(tiny_model, test_image, run_in_tmp, capsys):
    assert main(fast_args(tiny_model, test_image, "/proc/out.mp4")) == 2
    assert "not writable" in one_error_line(capsys.readouterr().err)


def test_job_dir_that_is_a_file(tiny_model, test_image, run_in_tmp, capsys):
    Path("afile").write_text("x")
    assert main(fast_args(tiny_model, test_image, "out.mp4", "--job-dir", "afile")) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert Path("afile").read_text() == "x"


def test_a_full_disk_before_the_job_is_refused_up_front(tiny_model, test_image, run_in_tmp, capsys, monkeypatch):
    import framepack.pipeline.generate

    monkeypatch.setattr(framepack.pipeline.generate, "free_bytes", lambda path: 1000)
    assert main(fast_args(tiny_model, test_image, "out.mp4")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "not enough disk space" in line and "MB are free" in line
    assert sorted(p.name for p in run_in_tmp.iterdir()) == []


def test_a_disk_that_fills_mid_job_keeps_the_checkpoint(tiny_model, test_image, run_in_tmp, capsys, monkeypatch):
    import errno

    from framepack.output.jobdir import JobDir

    real = JobDir.save_section_latents

    def fill_up(self, index, latents):
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.section_latents_path(index)))
        return real(self, index, latents)

    monkeypatch.setattr(JobDir, "save_section_latents", fill_up)
    args = fast_args(tiny_model, test_image, "out.mp4")
    args[args.index("--seconds") + 1] = "2.4"
    assert main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "the disk is full" in line and "framepack resume" in line and "MB free" in line
    jobdir = run_in_tmp / "out.mp4.job"
    assert (jobdir / "checkpoint.safetensors").exists() and not Path("out.mp4").exists()
    monkeypatch.setattr(JobDir, "save_section_latents", real)
    assert main(["resume", str(jobdir), "--quiet"]) == 0
    assert Path("out.mp4").exists() and not jobdir.exists()


@pytest.mark.parametrize("record", [{"format": "framepack-job/1", "engine": [1], "settings": {}},
                                    {"format": "framepack-job/1", "settings": "seed 1"},
                                    {"format": "framepack-job/1", "inputs": {"image": 3}, "settings": {}},
                                    {"format": ["framepack-job/1"]}])
def test_crafted_metadata_is_one_line(record, run_in_tmp, capsys, test_image):
    Path("crafted.json").write_text(json.dumps(record))
    for argv in (["info", "crafted.json"], ["generate", "--from", "crafted.json", "--image", str(test_image),
                                             "--prompt", "x", "--quiet"]):
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err)


def test_crafted_metadata_inside_a_video(run_in_tmp, capsys):
    import av

    with av.open("crafted.mp4", "w") as container:
        container.metadata["comment"] = json.dumps({"format": "framepack-job/1", "extra": ["\x1b[2J"]})
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert main(["info", "crafted.mp4"]) == 2
    assert "'extra' must be a JSON object" in one_error_line(capsys.readouterr().err)


def test_make_full_model_on_a_full_disk(run_in_tmp, capsys, monkeypatch):
    import collections

    import framepack.models.full

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(framepack.models.full.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    assert main(["make-full-model", "full", "--parts", "text_encoder_2"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "needs 0.2 GB" in line and "0.0 GB are free" in line
    assert list(run_in_tmp.iterdir()) == []


# --- 8. paths and names ------------------------------------------------------------------


def test_relative_model_path_is_stored_absolute(tiny_model, test_image, run_in_tmp):
    shutil.copytree(tiny_model, run_in_tmp / "m")
    assert main(fast_args("m", test_image, "out.mp4")) == 0
    record = json.loads(Path("out.json").read_text())
    assert record["settings"]["model"] == str((run_in_tmp / "m").resolve())


@pytest.mark.parametrize("name, made", [("clip.webm", ["clip.webm", "clip.json"]),
                                        ("take.2024.01.final", ["take.2024.01.final.mp4", "take.2024.01.final.json"]),
                                        ("take.2024.01.final.mp4", ["take.2024.01.final.mp4",
                                                                    "take.2024.01.final.json"])])
def test_the_extension_picks_the_writer_and_dots_stay(name, made, tiny_model, test_image, run_in_tmp):
    assert main(fast_args(tiny_model, test_image, name)) == 0
    assert sorted(p.name for p in run_in_tmp.iterdir()) == sorted(made)
    video = run_in_tmp / made[0]
    import av

    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.name == ("vp9" if name.endswith(".webm") else "h264")


@pytest.mark.parametrize("name", ["clip.gif", "clip.mkv", "clip.mov"])
def test_an_unknown_video_extension_is_refused(name, tiny_model, test_image, run_in_tmp, capsys):
    assert main(fast_args(tiny_model, test_image, name)) == 2
    assert "does not write" in one_error_line(capsys.readouterr().err)
    assert list(run_in_tmp.iterdir()) == []


def test_an_existing_output_gets_a_new_name_unless_overwrite(tiny_model, test_image, run_in_tmp, capsys):
    Path("out.mp4").write_bytes(b"my old video")
    assert main(fast_args(tiny_model, test_image, "out.mp4")) == 0
    assert "out.mp4 exists; writing" in capsys.readouterr().err
    assert Path("out.mp4").read_bytes() == b"my old video" and Path("out-1.mp4").stat().st_size > 1000
    assert main(fast_args(tiny_model, test_image, "out.mp4", "--overwrite")) == 0
    assert Path("out.mp4").read_bytes() != b"my old video"
    Path("lat.safetensors").write_bytes(b"x")
    assert main(fast_args(tiny_model, test_image, "new.mp4", "--latents-out", "lat.safetensors")) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)


# --- 10. SIGTERM is Ctrl-C ------------------------------------------------------------------


def test_sigterm_leaves_a_partial_video_and_says_so(killer_path, tiny_model, test_image, tmp_path):
    out = tmp_path / "video.mp4"
    proc = cli(job_args(tiny_model, test_image, out, "f1", 2.4), {"KILL_AFTER": "0", "KILL_SIGNAL": "SIGTERM"},
               killer_path)
    assert proc.returncode == 1, proc.stderr
    assert f"continue with: framepack resume {out}.job" in proc.stderr
    assert "no output was written" not in proc.stderr
    assert (tmp_path / "video.partial.mp4").exists() and not out.exists()
