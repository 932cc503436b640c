"""Writers read back right, and segments join without re-encoding.

Tiny clips (64x48, a few frames) keep every encode in milliseconds. A join
is checked against the segments it was made from: the same packets, the
same decoded pixels, one frame count, rising timestamps.
"""

from __future__ import annotations

import importlib
import json
import struct
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from framepack.errors import ConfigError, FramepackError
from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
from framepack.output.segments import count_frames, remux_join

W, H, FPS = 64, 48, 30
WRITER_MODULES = {name: f"framepack_plugins.writers.{name}" for name in ("mp4", "webm", "png", "latents")}


def writer_module(name: str):
    return importlib.import_module(WRITER_MODULES[name])


def backends() -> dict:
    """The built-in writers, registered through the plugin hook as the engine
    does (modules not yet declared as entry points are added by hand)."""
    declared = {ep.value for ep in metadata.entry_points(group="framepack")}
    extra = [importlib.import_module(m) for m in WRITER_MODULES.values() if m not in declared]
    registry = collect_backends(build_plugin_manager(extra_plugins=extra))
    return {r.backend.name: r.backend for r in registry.items("writer")}


def clip(frames: int, seed: int, width: int = W, height: int = H) -> np.ndarray:
    """(T, H, W, 3) uint8 with moving structure, different per seed."""
    y, x = np.mgrid[0:height, 0:width]
    out = [
        np.stack([(x * 4 + 9 * t + 40 * seed) % 256, (y * 5 + 3 * t) % 256, (x + y + 7 * t + 11 * seed) % 256], axis=-1)
        for t in range(frames)
    ]
    return np.stack(out).astype(np.uint8) if out else np.zeros((0, height, width, 3), np.uint8)


def write_segment(backend, path: Path, frames: np.ndarray, options=None) -> Path:
    writer = backend.open(path, FPS, frames.shape[2], frames.shape[1], options or backend.options())
    writer.write(frames)
    writer.close()
    return path


def decode(path: Path) -> tuple[np.ndarray, dict]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, pts = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts * stream.time_base)
        info = {"fps": stream.average_rate, "size": (stream.width, stream.height), "pts": pts,
                "tags": {k.lower(): v for k, v in container.metadata.items()}}
    return np.stack(frames), info


def packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.dts is not None]


def test_builtin_writers_register_through_the_hook():
    found = backends()
    assert {"mp4", "webm", "png", "latents"} <= set(found)
    assert found["latents"].accepts == "latents" and found["latents"].save is not None
    for name in ("mp4", "webm", "png"):
        assert found[name].accepts == "frames" and found[name].open and found[name].join


# --- video segments and their join ------------------------------------------------


@pytest.mark.parametrize("name", ["mp4", "webm"])
def test_a_segment_reads_back_with_its_frames_fps_and_size(name, tmp_path):
    backend = backends()[name]
    path = write_segment(backend, tmp_path / f"0000{backend.suffix}", clip(7, 0))
    frames, info = decode(path)
    assert frames.shape == (7, H, W, 3)
    assert info["fps"] == FPS and info["size"] == (W, H)
    assert count_frames(path) == 7
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left


@pytest.mark.parametrize("name", ["mp4", "webm"])
@pytest.mark.parametrize("sizes", [[5], [4, 9, 1, 6]])
def test_join_is_a_stream_copy(name, sizes, tmp_path):
    # A one-frame segment has no B-frame delay while the others have one:
    # the join must still give rising decode timestamps.
    backend = backends()[name]
    segments = [write_segment(backend, tmp_path / f"{i:04d}{backend.suffix}", clip(n, i)) for i, n in enumerate(sizes)]
    for segment in segments:
        with av.open(str(segment)) as container:
            first = next(container.demux(video=0))
            assert first.is_keyframe
    out = tmp_path / f"joined{backend.suffix}"
    backend.join(segments, out, backend.options(), {"title": "a cat ✓", "comment": '{"k": "ü"}'})

    frames, info = decode(out)
    assert frames.shape == (sum(sizes), H, W, 3)
    assert info["fps"] == FPS and info["size"] == (W, H)
    assert all(a < b for a, b in zip(info["pts"], info["pts"][1:]))
    assert float(info["pts"][-1]) == pytest.approx((sum(sizes) - 1) / FPS, abs=1e-3)
    # No re-encode: the joined file holds the segments' packets, byte for
    # byte, and decodes to exactly their pixels.
    assert packets(out) == [p for s in segments for p in packets(s)]
    np.testing.assert_array_equal(frames, np.concatenate([decode(s)[0] for s in segments]))
    assert info["tags"]["title"] == "a cat ✓" and info["tags"]["comment"] == '{"k": "ü"}'
    with av.open(str(out)) as container:
        dts = [p.dts for p in container.demux(video=0) if p.dts is not None]
    assert all(a < b for a, b in zip(dts, dts[1:]))
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("name", ["mp4", "webm"])
def test_join_refuses_segments_it_cannot_copy(name, tmp_path):
    backend = backends()[name]
    a = write_segment(backend, tmp_path / f"a{backend.suffix}", clip(3, 0))
    b = write_segment(backend, tmp_path / f"b{backend.suffix}", clip(3, 1, width=32))
    out = tmp_path / f"out{backend.suffix}"
    with pytest.raises(FramepackError, match="without re-encoding: they differ in size"):
        backend.join([a, b], out, backend.options(), {})
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_mp4_segments_share_codec_parameters(tmp_path):
    # The avcC box (SPS/PPS) must be the same whatever the content and
    # length, or packets of later segments would decode with wrong headers.
    backend = backends()["mp4"]
    headers = set()
    for i, frames in enumerate([clip(1, 0), clip(9, 1), np.zeros((4, H, W, 3), np.uint8)]):
        with av.open(str(write_segment(backend, tmp_path / f"{i}.mp4", frames))) as container:
            headers.add(bytes(container.streams.video[0].codec_context.extradata))
    assert len(headers) == 1


def mp4_header_times(path: Path) -> dict[str, tuple[int, int]]:
    """(creation, modification) of an MP4's movie, track and media headers,
    in seconds since 1904 (0: none), read from its box tree."""
    data = path.read_bytes()
    found = {}

    def walk(start: int, end: int) -> None:
        while start < end:
            size, kind = struct.unpack_from(">I4s", data, start)
            body = start + 8
            if size == 1:  # a 64-bit size follows the type
                (size,) = struct.unpack_from(">Q", data, body)
                body += 8
            stop = start + size if size else end
            if kind in (b"moov", b"trak", b"mdia"):
                walk(body, stop)
            elif kind in (b"mvhd", b"tkhd", b"mdhd"):  # version, 3 flag bytes, then the times
                found[kind.decode()] = struct.unpack_from(">QQ" if data[body] == 1 else ">II", data, body + 4)
            start = stop

    walk(0, len(data))
    return found


def test_mp4_holds_no_clock_time_but_the_callers(tmp_path):
    # The same frames must give the same bytes, so no header may hold the
    # time of writing; the join's creation time is the one the job passes.
    backend = backends()["mp4"]
    segment = write_segment(backend, tmp_path / "0000.mp4", clip(3, 0))
    bare, dated = tmp_path / "bare.mp4", tmp_path / "dated.mp4"
    backend.join([segment], bare, backend.options(), {})
    backend.join([segment], dated, backend.options(), {"creation_time": "2024-05-06T07:08:09Z"})
    for path in (segment, bare):
        assert mp4_header_times(path) == {"mvhd": (0, 0), "tkhd": (0, 0), "mdhd": (0, 0)}
    utc = timezone.utc
    since_1904 = int((datetime(2024, 5, 6, 7, 8, 9, tzinfo=utc) - datetime(1904, 1, 1, tzinfo=utc)).total_seconds())
    stamp = (since_1904, since_1904)
    assert mp4_header_times(dated) == {"mvhd": stamp, "tkhd": stamp, "mdhd": stamp}


def test_aborted_segment_leaves_nothing(tmp_path):
    backend = backends()["mp4"]
    writer = backend.open(tmp_path / "0000.mp4", FPS, W, H, backend.options())
    writer.write(clip(3, 0))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# --- mp4 defaults: dark frames and colour --------------------------------------------


@pytest.mark.parametrize("name", ["mp4", "webm"])
@pytest.mark.parametrize("level", [0, 2, 6])
def test_black_and_near_black_stay_black(name, level, tmp_path):
    backend = backends()[name]
    frames = np.full((6, H, W, 3), level, np.uint8)
    frames[:, :, W // 2 :] = min(level * 2, 12)  # a faint edge, as in a dark scene
    decoded, _ = decode(write_segment(backend, tmp_path / f"dark{backend.suffix}", frames))
    error = decoded.astype(int) - frames
    assert np.abs(error).max() <= 2  # no grey lift, no blocks
    # No tint: the channels stay equal (a green cast would lift G alone).
    assert np.abs(decoded[..., 1].astype(int) - decoded[..., 0]).max() <= 1
    assert np.abs(decoded[..., 2].astype(int) - decoded[..., 1]).max() <= 1


@pytest.mark.parametrize("name", ["mp4", "webm"])
def test_colours_survive_with_bt709_limited_range_tags(name, tmp_path):
    backend = backends()[name]
    frames = np.zeros((4, H, W, 3), np.uint8)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]):
        frames[:, :, i * W // 4 : (i + 1) * W // 4] = colour  # 16-pixel bars: chroma blocks do not straddle them
    path = write_segment(backend, tmp_path / f"colour{backend.suffix}", frames)
    decoded, _ = decode(path)
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    with av.open(str(path)) as container:
        cc = container.streams.video[0].codec_context
        assert (int(cc.color_range), int(cc.colorspace), int(cc.color_primaries), int(cc.color_trc)) == (1, 1, 1, 1)
        assert cc.pix_fmt == "yuv420p"


def test_mp4_refuses_lossless_that_players_show_black():
    mp4 = writer_module("mp4")
    assert mp4.Mp4Options().crf == 16
    assert mp4.codec_options(mp4.Mp4Options())["profile"] == "high"
    with pytest.raises(ConfigError, match="crf 0 is lossless.*black clip.*png writer"):
        mp4.Mp4Options(crf=0)
    with pytest.raises(ConfigError, match="crf 52"):
        mp4.Mp4Options(crf=52)
    with pytest.raises(ConfigError, match="preset 'quick'"):
        mp4.Mp4Options(preset="quick")


def test_webm_options_are_checked():
    webm = writer_module("webm")
    with pytest.raises(ConfigError, match="crf 70"):
        webm.WebmOptions(crf=70)
    with pytest.raises(ConfigError, match="deadline 'fast'"):
        webm.WebmOptions(deadline="fast")


# --- png folders --------------------------------------------------------------------


def test_png_segments_join_into_a_numbered_folder(tmp_path):
    backend = backends()["png"]
    assert backend.suffix == ""
    chunks = [clip(3, 0), clip(1, 1), clip(4, 2)]
    segments = [write_segment(backend, tmp_path / f"{i:04d}", c) for i, c in enumerate(chunks)]
    assert sorted(p.name for p in segments[0].iterdir()) == ["000000.png", "000001.png", "000002.png"]
    record = {"format": "framepack-job/1", "extra": {"fps": FPS}}
    out = tmp_path / "video"
    backend.join(segments, out, backend.options(), {"comment": json.dumps(record), "title": "t"})

    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(8)] + ["metadata.json"]
    from PIL import Image

    got = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(8)])
    np.testing.assert_array_equal(got, np.concatenate(chunks))  # lossless
    assert json.loads((out / "metadata.json").read_text()) == record
    assert all(s.is_dir() for s in segments)  # linked, not moved: a failed join can run again
    assert not list(tmp_path.glob(".*partial*"))


def test_png_join_will_not_overwrite_a_folder(tmp_path):
    backend = backends()["png"]
    segment = write_segment(backend, tmp_path / "0000", clip(2, 0))
    out = tmp_path / "video"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FramepackError, match="already exists"):
        backend.join([segment], out, backend.options(), {})
    assert (out / "keep.txt").read_text() == "mine"


def test_png_abort_removes_the_partial_folder(tmp_path):
    backend = backends()["png"]
    writer = backend.open(tmp_path / "0000", FPS, W, H, backend.options())
    writer.write(clip(2, 0))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# --- latents ----------------------------------------------------------------------


def test_latents_round_trip(tmp_path):
    from safetensors import safe_open

    backend = backends()["latents"]
    latents = torch.randn(1, 16, 5, 6, 8, dtype=torch.bfloat16)
    path = tmp_path / "job.safetensors"
    backend.save(path, latents, {"comment": "{}", "title": "t"}, backend.options())
    with safe_open(str(path), framework="pt") as f:
        got = f.get_tensor("latents")
        assert f.metadata() == {"comment": "{}", "title": "t"}
    assert got.dtype == torch.float32 and got.shape == (1, 16, 5, 6, 8)
    torch.testing.assert_close(got, latents.float())
    with pytest.raises(ValueError, match="1, 16, T, h, w"):
        backend.save(path, torch.zeros(1, 4, 2, 2, 2), {}, backend.options())
    assert [p.name for p in tmp_path.iterdir()] == ["job.safetensors"]


# --- the inverted model: segments made end-first ----------------------------------


@pytest.mark.parametrize("name", ["mp4", "png"])
def test_segments_made_end_first_join_in_playback_order(name, tmp_path):
    # The inverted model makes the end of the video first: segment ids are
    # generation order, the join gets them reversed (framepack.output.outputs).
    backend = backends()[name]
    playback = [clip(3, 0), clip(5, 1), clip(2, 2)]
    generated = playback[::-1]
    ids = {}
    for gen_id, chunk in enumerate(generated):
        ids[gen_id] = write_segment(backend, tmp_path / f"{gen_id:04d}{backend.suffix}", chunk)
    out = tmp_path / f"video{backend.suffix}"
    backend.join([ids[i] for i in sorted(ids, reverse=True)], out, backend.options(), {})
    expected = np.concatenate(playback)
    if name == "png":
        from PIL import Image

        got = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])
        np.testing.assert_array_equal(got, expected)
    else:
        got, _ = decode(out)
        # Lossy, but every frame is closest to its own source frame.
        nearest = [int(np.argmin([np.abs(f.astype(int) - e).mean() for e in expected])) for f in got]
        assert nearest == list(range(len(expected)))


def test_remux_join_needs_segments(tmp_path):
    with pytest.raises(ValueError, match="no segments"):
        remux_join([], tmp_path / "x.mp4", "mp4", {})
