"""Bad input gives one clear line on stderr, exit code 2, and leaves no file behind.

Most cases run the CLI in-process through ``framepack.cli.main`` (fast) and
fail before any model is loaded; a few go as far as the tiny model, and two
run ``python -m framepack`` to prove the real exit code of the process.
Every case runs in an empty temporary working directory (``run_in_tmp``), so
"no output left behind" means: that folder holds no video, no latents and no
hidden ``.NAME.partial-*`` file afterwards.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import framepack.output.timeline
from framepack.cli import main
from framepack.pipeline.inputs import MAX_PIXELS

ERROR_PREFIX = "framepack: error:"
FAST = ["--size", "64x64", "--steps", "1", "--seconds", "1"]


# --------------------------------------------------------------------------- helpers


def generate_args(image: Path | str, *extra: str, quiet: bool = True) -> list[str]:
    args = ["generate", "--image", str(image), "--prompt", "a fox", "--output", "out.mp4"]
    return args + (["--quiet"] if quiet else []) + list(extra)


def leftovers(folder: Path) -> list[str]:
    """Anything a job might have written: videos, latents, hidden partial files."""
    found = set()
    for pattern in ("*.mp4", "*.safetensors", "*.npy", ".*.partial-*", "framepack_*"):
        found.update(p.name for p in folder.glob(pattern))
    return sorted(found)


def error_line(stderr: str) -> str:
    """The one `framepack: error:` line; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, stderr
    return lines[0]


def run_bad(argv: list[str], capsys, folder: Path, *words: str) -> str:
    """Run main(argv): exit 2, exactly one stderr line naming `words`, nothing written."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = error_line(captured.err)
    # With --quiet nothing else may reach stderr: the error is the whole story.
    assert captured.err.strip().splitlines() == [line]
    assert captured.out == ""
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert leftovers(folder) == []
    return line


def png_with_header_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """A copy of a real PNG whose IHDR claims another size (CRC fixed up), so
    only the header is large: the pixel data is still the small original's."""
    data = bytearray(src.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding fail loudly (an AssertionError is not a UserError,
    so main() would report an internal error and exit 1)."""
    from PIL import ImageFile

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"decoded {self.size} pixels before checking the size")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------------- the image


def test_missing_image(run_in_tmp, capsys):
    run_bad(generate_args("nope.png"), capsys, run_in_tmp, "nope.png", "not found")


def test_image_is_a_directory(run_in_tmp, capsys):
    (run_in_tmp / "pictures").mkdir()
    run_bad(generate_args("pictures"), capsys, run_in_tmp, "pictures", "not a file")


def test_image_is_empty(run_in_tmp, capsys):
    (run_in_tmp / "empty.png").write_bytes(b"")
    run_bad(generate_args("empty.png"), capsys, run_in_tmp, "empty.png", "empty", "0 bytes")


def test_text_file_named_png(run_in_tmp, capsys):
    (run_in_tmp / "notes.png").write_text("shopping list: eggs, milk\n")
    run_bad(generate_args("notes.png"), capsys, run_in_tmp, "notes.png", "not an image")


def test_truncated_png(run_in_tmp, capsys, test_image):
    data = test_image.read_bytes()
    (run_in_tmp / "cut.png").write_bytes(data[: len(data) // 2])
    run_bad(generate_args("cut.png"), capsys, run_in_tmp, "cut.png", "truncated")


def test_real_bomb_over_max_pixels_is_refused_before_decoding(run_in_tmp, capsys, no_decoding):
    # A valid 1-bit PNG: about 10 KB on disk, 81 MP once decoded (above
    # MAX_PIXELS, below Pillow's own warning threshold, so our check must catch it).
    side = 9000
    assert MAX_PIXELS < side * side < Image.MAX_IMAGE_PIXELS
    Image.new("1", (side, side)).save(run_in_tmp / "bomb.png")
    assert (run_in_tmp / "bomb.png").stat().st_size < 100_000
    line = run_bad(generate_args("bomb.png"), capsys, run_in_tmp, "bomb.png", f"{side}x{side}", "limit")
    assert f"{MAX_PIXELS / 1e6:.0f} MP" in line


@pytest.mark.parametrize(
    "width, height, words",
    [
        (8500, 8500, ("8500x8500", "limit")),  # over MAX_PIXELS only
        (10000, 10000, ("too large",)),  # over Pillow's warning threshold too
        (20000, 20000, ("too large",)),  # over Pillow's hard limit
    ],
)
def test_header_claiming_huge_size_is_refused_before_decoding(run_in_tmp, capsys, test_image, no_decoding, width, height, words):
    png_with_header_size(test_image, run_in_tmp / "huge.png", width, height)
    run_bad(generate_args("huge.png"), capsys, run_in_tmp, "huge.png", *words)


def test_bad_image_is_the_only_line_without_quiet(run_in_tmp, capsys):
    # A typo in the path should not be buried under the hardware/profile report.
    rc = main(generate_args("nope.png", quiet=False))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [error_line(err)]


# --------------------------------------------------------------------------- job settings


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--seconds", "0"], ("--seconds", "0", "positive")),
        (["--seconds", "-1"], ("--seconds", "-1", "positive")),
        (["--seconds", "nan"], ("--seconds", "nan", "positive")),
        (["--seconds", "inf"], ("--seconds", "inf")),
        (["--seconds", "100000"], ("--seconds", "100000", "limit")),
        (["--steps", "0"], ("--steps", "0", "between 1 and")),
        (["--cfg", "0.5"], ("--cfg", "0.5", "between 1 and")),
        (["--size", "100x100"], ("--size", "100x100", "multiples of 16")),
        (["--size", "abc"], ("--size", "abc", "HEIGHTxWIDTH")),
        (["--size", "64x64x64"], ("--size", "64x64x64", "HEIGHTxWIDTH")),
        (["--latents-out", "x.npy"], ("--latents-out", "x.npy", ".safetensors")),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_setting(run_in_tmp, capsys, test_image, extra, words):
    run_bad(generate_args(test_image, *extra), capsys, run_in_tmp, *words)


def test_unknown_variant_is_an_argparse_error(run_in_tmp, capsys, test_image):
    with pytest.raises(SystemExit) as exc:
        main(generate_args(test_image, "--variant", "bogus"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "original" in err and "f1" in err
    assert "Traceback" not in err
    assert leftovers(run_in_tmp) == []


# --------------------------------------------------------------------------- the model folder


def test_model_folder_missing_parts_names_all_of_them(run_in_tmp, capsys, test_image, tiny_model, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    line = run_bad(
        generate_args(test_image, "--model", str(broken), "--profile", "cpu", *FAST), capsys, run_in_tmp,
        str(broken), "incomplete", "vae/", "transformer/",
    )
    assert "missing" in line and ".safetensors" in line
    # Only the two broken parts are named.
    for part in ("text_encoder/", "image_encoder/", "tokenizer/"):
        assert part not in line


def test_model_is_a_file(run_in_tmp, capsys, test_image):
    (run_in_tmp / "weights.bin").write_bytes(b"\0" * 16)
    run_bad(generate_args(test_image, "--model", "weights.bin", "--profile", "cpu", *FAST), capsys, run_in_tmp,
            "--model", "weights.bin", "not a folder")


# --------------------------------------------------------------------------- profile files


def test_config_with_invalid_toml(run_in_tmp, capsys, test_image):
    (run_in_tmp / "bad.toml").write_text("[profiles.cpu\nattention = sdpa\n")
    run_bad(generate_args(test_image, "--config", "bad.toml", *FAST), capsys, run_in_tmp, "bad.toml", "not valid TOML")


def test_config_file_not_found(run_in_tmp, capsys, test_image):
    run_bad(generate_args(test_image, "--config", "missing.toml", *FAST), capsys, run_in_tmp, "missing.toml", "not found")


def test_local_profile_with_unknown_key(run_in_tmp, capsys, test_image):
    (run_in_tmp / "framepack.toml").write_text('[profiles.cpu]\nattension = ["sdpa"]\n')
    line = run_bad(
        generate_args(test_image, *FAST), capsys, run_in_tmp,
        str(Path.cwd() / "framepack.toml"), "[profiles.cpu]", "attension", "known keys",
    )
    for known in ("attention", "offload", "cache", "writers", "dtype", "priority"):
        assert known in line.split("known keys", 1)[1]


def test_local_profile_with_wrong_type(run_in_tmp, capsys, test_image):
    (run_in_tmp / "framepack.toml").write_text('[profiles.cpu]\npriority = "high"\n')
    run_bad(
        generate_args(test_image, *FAST), capsys, run_in_tmp,
        str(Path.cwd() / "framepack.toml"), "[profiles.cpu]", "priority", "integer", "'high'",
    )


# --------------------------------------------------------------------------- --profile and --set


def test_unknown_profile_lists_known_ones(run_in_tmp, capsys, test_image):
    line = run_bad(generate_args(test_image, "--profile", "nope", *FAST), capsys, run_in_tmp, "'nope'", "known profiles")
    for name in ("cpu", "apple-mps", "cuda-8gb", "cuda-80gb"):
        assert name in line


def test_unknown_attention_backend_lists_installed_ones(run_in_tmp, capsys, test_image):
    run_bad(
        generate_args(test_image, "--profile", "cpu", "--set", "attention=nope", *FAST), capsys, run_in_tmp,
        "[profiles.cpu] attention", "'nope'", "not registered", "installed attention backends:", "sdpa",
    )


def test_set_unknown_key(run_in_tmp, capsys, test_image):
    line = run_bad(
        generate_args(test_image, "--profile", "cpu", "--set", "bogus=1", *FAST), capsys, run_in_tmp,
        "--set bogus=1", "unknown key 'bogus'", "known keys",
    )
    assert "attention" in line.split("known keys", 1)[1]


def test_set_without_equals(run_in_tmp, capsys, test_image):
    run_bad(
        generate_args(test_image, "--profile", "cpu", "--set", "noequals", *FAST), capsys, run_in_tmp,
        "noequals", "KEY=VALUE",
    )


# --------------------------------------------------------------------------- the real process


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framepack", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_process_exit_code_for_bad_input(run_in_tmp, test_image):
    proc = _run_cli(generate_args(test_image, "--seconds", "0", quiet=False), run_in_tmp)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [error_line(proc.stderr)]
    assert "--seconds" in proc.stderr
    assert proc.stdout == ""
    assert leftovers(run_in_tmp) == []


def test_process_exit_code_for_usage_error(run_in_tmp, test_image):
    proc = _run_cli(generate_args(test_image, "--variant", "bogus"), run_in_tmp)
    assert proc.returncode == 2, proc.stderr
    assert "bogus" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- failures mid-job


def test_failure_after_sampling_leaves_no_output(run_in_tmp, capsys, test_image, tiny_model, monkeypatch):
    original_add = framepack.output.timeline.PixelTimeline.add
    calls = []

    def add_then_fail(self, pixels):
        calls.append(pixels.shape)
        original_add(self, pixels)  # the section was sampled and decoded
        raise RuntimeError("simulated crash after the first section")

    monkeypatch.setattr(framepack.output.timeline.PixelTimeline, "add", add_then_fail)
    rc = main(generate_args(test_image, "--model", str(tiny_model), "--profile", "cpu", "--variant", "f1", *FAST))
    err = capsys.readouterr().err
    assert rc == 1
    assert len(calls) == 1, "the job should have got as far as decoding a section"
    assert "simulated crash" in err
    assert not (run_in_tmp / "out.mp4").exists()
    assert leftovers(run_in_tmp) == []


def test_failure_while_finishing_the_file_leaves_no_output(run_in_tmp, capsys, test_image, tiny_model, monkeypatch):
    # Fail at the very last moment: the whole video is in the hidden partial
    # file and only the rename into place is left.
    import os
    import types

    import framepack.output.segments as segments

    seen = []

    def rename_fails(src, dst):
        if Path(dst).name != "out.mp4":
            return os.replace(src, dst)  # segment files go into place as usual
        seen.append((Path(src), Path(src).stat().st_size))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments, "os", types.SimpleNamespace(replace=rename_fails))
    rc = main(generate_args(test_image, "--model", str(tiny_model), "--profile", "cpu", *FAST))
    err = capsys.readouterr().err
    assert rc == 1
    assert "the disk is full" in err and "framepack resume" in err
    [(partial, size)] = seen
    assert partial.name.startswith(".out.mp4.partial-") and size > 0  # it really was written
    assert not partial.exists()
    assert leftovers(run_in_tmp) == []
    # Every section finished, so the job folder stays for `framepack resume`.
    assert (run_in_tmp / "out.mp4.job" / "checkpoint.safetensors").exists()
