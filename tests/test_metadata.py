"""The job's record round-trips through every output and back into settings."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack import __version__
from framepack.errors import UserError
from framepack.pipeline.settings import JobSettings, settings_from_metadata
from framepack.output.metadata import (
    FORMAT,
    build_metadata,
    container_tags,
    format_metadata,
    model_info,
    read_metadata,
    sidecar_path,
    write_sidecar,
)
from framepack.models.sources import ModelSource

W, H, FPS = 64, 48, 30


def writer(name: str):
    module = importlib.import_module(f"framepack_plugins.writers.{name}")
    found = []
    module.framepack_register_writers(register=found.append)
    return found[0]


@pytest.fixture
def job(tmp_path, test_image) -> JobSettings:
    return JobSettings(
        image=test_image, prompt="a cat walks, «ünïcode» ✓", output=tmp_path / "out.mp4",
        negative_prompt="blurry", variant="f1", seconds=2.5, steps=7, seed=2**40 + 3, gs=9.5, cfg=1.5, rs=0.3,
        latent_window_size=5, resolution=320, size=(160, 224), latents_out=tmp_path / "out.safetensors",
        model="owner/model", prompt_cache=False,
    )


@pytest.fixture
def record(job) -> dict:
    return build_metadata(
        job, profile="cpu", backends={"attention": "sdpa", "writers": "mp4,webm"},
        model={"source": "hub repo owner/model", "fingerprint": "abc123"},
        extra={"fps": FPS, "width": W, "height": H, "frames": 5},
    )


def test_record_holds_what_a_rerun_needs(record, job):
    assert record["format"] == FORMAT == "framepack-job/1"
    assert record["engine"] == {"name": "framepack", "version": __version__}
    assert record["settings"]["seed"] == 2**40 + 3 and record["settings"]["negative_prompt"] == "blurry"
    assert Path(record["settings"]["image"]).is_absolute()
    assert record["inputs"]["image"]["sha256"] and len(record["inputs"]["image"]["sha256"]) == 64
    assert record["profile"] == "cpu" and record["backends"]["attention"] == "sdpa"
    assert record["model"]["fingerprint"] == "abc123"
    json.dumps(record)  # plain JSON all the way down


def test_settings_round_trip_to_an_equal_job(record, job):
    fields = settings_from_metadata(json.loads(json.dumps(record)))
    rerun = JobSettings(**fields)
    expected = {k: v for k, v in job.to_dict().items()}
    for key in ("image", "output", "latents_out"):
        expected[key] = str(Path(expected[key]).absolute())
    assert rerun.to_dict() == expected
    assert isinstance(rerun.size, tuple) and isinstance(rerun.image, Path)
    rerun.validate()


def frames(n: int) -> np.ndarray:
    return np.stack([np.full((H, W, 3), 20 * i, np.uint8) for i in range(n)])


@pytest.mark.parametrize("name", ["mp4", "webm", "png"])
def test_record_reads_back_from_each_output(name, record, tmp_path):
    backend = writer(name)
    seg = backend.open(tmp_path / f"0000{backend.suffix}", FPS, W, H, backend.options())
    seg.write(frames(3))
    seg.close()
    out = tmp_path / f"video{backend.suffix}"
    backend.join([seg.path], out, backend.options(), container_tags(record))
    assert read_metadata(out) == record


def test_video_tags_are_readable_without_parsing_json(record, tmp_path):
    import av

    backend = writer("mp4")
    seg = backend.open(tmp_path / "0000.mp4", FPS, W, H, backend.options())
    seg.write(frames(2))
    seg.close()
    backend.join([seg.path], tmp_path / "v.mp4", backend.options(), container_tags(record))
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert container.metadata["title"] == "a cat walks, «ünïcode» ✓"
        assert "seed 1099511627779" in container.metadata["description"]


def test_record_reads_back_from_latents_and_sidecar(record, tmp_path):
    path = tmp_path / "out.safetensors"
    writer("latents").save(path, torch.zeros(1, 16, 2, 3, 4), container_tags(record), None)
    assert read_metadata(path) == record
    sidecar = sidecar_path(tmp_path / "out.mp4")
    assert sidecar == tmp_path / "out.json"
    write_sidecar(sidecar, record)
    assert read_metadata(sidecar) == record
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["out.json", "out.safetensors"]


def test_files_without_a_record_are_user_errors(tmp_path, test_image):
    with pytest.raises(UserError, match="no such file"):
        read_metadata(tmp_path / "missing.mp4")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a video file framepack can read"):
        read_metadata(text)
    with pytest.raises(UserError, match="has no framepack metadata"):
        read_metadata(test_image)  # FFmpeg reads a PNG, but it carries no record
    other = tmp_path / "other.json"
    other.write_text('{"name": "something else"}')
    with pytest.raises(UserError, match="has no framepack metadata"):
        read_metadata(other)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="without metadata.json"):
        read_metadata(tmp_path / "folder")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_metadata(bad)


def test_video_from_elsewhere_has_no_record(tmp_path):
    import av

    path = tmp_path / "plain.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.metadata["comment"] = "made by hand"
        for packet in stream.encode(av.VideoFrame.from_ndarray(frames(1)[0], format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(UserError, match="has no framepack metadata"):
        read_metadata(path)


def test_a_newer_format_or_unknown_setting_is_named(record, tmp_path):
    newer = dict(record, format="framepack-job/2")
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(newer))
    with pytest.raises(UserError, match="newer than this framepack"):
        read_metadata(path)
    future = json.loads(json.dumps(record))
    future["settings"]["motion_strength"] = 0.7
    future["settings"]["zoom"] = 2
    with pytest.raises(UserError, match=r"does not know: motion_strength, zoom; upgrade"):
        settings_from_metadata(future)


def test_bad_setting_values_are_user_errors(record):
    broken = json.loads(json.dumps(record))
    broken["settings"]["seed"] = "42"
    with pytest.raises(UserError, match="'seed' = '42' is not a valid int"):
        settings_from_metadata(broken)
    broken = json.loads(json.dumps(record))
    del broken["settings"]["prompt"]
    with pytest.raises(UserError, match="lacks the settings prompt"):
        settings_from_metadata(broken)


def test_model_info_fingerprints_a_local_folder(tmp_path):
    root = tmp_path / "model"
    for part in ("transformer", "vae"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text("{}")
    source = ModelSource.from_arg(str(root), "f1")
    info = model_info(source, parts=("transformer", "vae"))
    assert info["variant"] == "f1" and info["parts"]["vae"] == f"{root.resolve()}/vae"
    assert len(info["fingerprint"]) == 64
    (root / "vae" / "config.json").write_text('{"changed": true}')
    assert model_info(source, parts=("transformer", "vae"))["fingerprint"] != info["fingerprint"]


def test_info_text_shows_the_essentials(record):
    text = format_metadata(record)
    assert "framepack " + __version__ in text and "seed: 1099511627779" in text
    assert "prompt: a cat walks" in text and "profile: cpu" in text and "fingerprint abc123" in text
