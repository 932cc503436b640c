"""The same frames and settings give the same video, byte for byte, in any
process on any machine. A resumed job joins segments written by two
processes (perhaps on two machines) and must give exactly the file of an
uninterrupted run.

What used to vary: x264's slices followed the CPU count (PyAV asks for one
slice thread per CPU), x264 picked an intra search by CPU features,
swscale did the RGB -> YUV conversion its own way, and Matroska wrote a
random SegmentUID. So the two writer processes here run on different CPU
sets (one CPU, and all of them), and x264 is also run on its plain C code,
standing in for a CPU without the SIMD this one has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from framepack.output.segments import VideoSegmentWriter, remux_join

# 128 rows are 8 macroblock rows: enough for x264 to cut two slices on two
# CPUs, which is how the CPU count used to reach the bitstream.
W, H, FPS = 160, 128, 30
SPLITS = [6, 1, 9]  # frames per segment; the one-frame segment has no B-frame delay
METADATA = {"creation_time": "2024-05-06T07:08:09.000000Z", "title": "a wave", "comment": '{"seed": 31337}'}

CHILD = textwrap.dedent('''
    import importlib, json, os, sys
    from pathlib import Path
    args = json.loads(sys.argv[1])
    if args["cpus"] and hasattr(os, "sched_setaffinity"):
        # Before FFmpeg loads: encoders count the CPUs they may run on.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args["cpus"]])
    import numpy as np
    module = importlib.import_module("framepack_plugins.writers." + args["name"])
    options = module.WebmOptions() if args["name"] == "webm" else module.Mp4Options()
    out = Path(args["out"])
    y, x = np.mgrid[0:args["height"], 0:args["width"]]
    rng = np.random.default_rng(7)  # grain, so the encoder has real decisions to make
    t0, segments = 0, []
    for i, n in enumerate(args["splits"]):
        frames = np.stack([np.stack([(x * 3 + 5 * t) % 256, (y * 2 + 7 * t) % 256, (x + y + 3 * t) % 256], -1)
                           for t in range(t0, t0 + n)])
        frames = np.clip(frames + rng.integers(-12, 13, frames.shape), 0, 255).astype(np.uint8)
        path = out / f"{i:04d}{args['suffix']}"
        writer = module.open_segment(path, 30, args["width"], args["height"], options)
        writer.write(frames)
        writer.close()
        segments.append(path)
        t0 += n
    module.join(segments, out / ("joined" + args["suffix"]), options, args["metadata"])
''')


def write_in_child(name: str, out: Path, cpus: int | None) -> Path:
    out.mkdir()
    suffix = {"mp4": ".mp4", "webm": ".webm"}[name]
    args = {"name": name, "out": str(out), "cpus": cpus, "width": W, "height": H, "splits": SPLITS,
            "suffix": suffix, "metadata": METADATA}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def decode(path: Path, fmt: str = "rgb24") -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format=fmt) for f in container.decode(video=0)])


@pytest.fixture(scope="module", params=["mp4", "webm"])
def two_runs(request, tmp_path_factory):
    """The same segments and join written by two processes: one on a single
    CPU, one on every CPU this process may use."""
    name = request.param
    root = tmp_path_factory.mktemp(f"runs-{name}")
    return name, write_in_child(name, root / "one-cpu", 1), write_in_child(name, root / "all-cpus", None)


def test_two_processes_write_identical_segments_and_joins(two_runs):
    name, a, b = two_runs
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == len(SPLITS) + 1 and files == sorted(p.name for p in b.iterdir())
    differ = [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
    assert not differ, f"{name}: {differ} differ between a one-CPU and an all-CPU process"
    joined = next(f for f in files if f.startswith("joined"))
    np.testing.assert_array_equal(decode(a / joined), decode(b / joined))


def test_a_resumed_job_joins_to_the_uninterrupted_file(two_runs):
    # Resumed: the first segments come from the killed process, the rest
    # from the one that resumed it; the join must not tell them apart.
    name, a, b = two_runs
    suffix = "." + name
    segments = [a / f"0000{suffix}", a / f"0001{suffix}", b / f"0002{suffix}"]
    resumed = a.parent / f"resumed{suffix}"
    remux_join(segments, resumed, name, METADATA, {"movflags": "+faststart"} if name == "mp4" else None)
    assert resumed.read_bytes() == (a / f"joined{suffix}").read_bytes()


def test_mp4_is_the_same_on_a_cpu_without_simd(tmp_path):
    # asm=0 runs x264's plain C code: what a CPU without this one's SSSE3 /
    # AVX2 would run. x264-params is applied after the writer's own.
    from framepack_plugins.writers import mp4

    y, x = np.mgrid[0:H, 0:W]
    rng = np.random.default_rng(3)
    frames = np.stack([np.stack([(x * 3 + 5 * t) % 256, (y * 2 + 7 * t) % 256, (x * y + t) % 256], -1)
                       for t in range(12)])
    frames = np.clip(frames + rng.integers(-12, 13, frames.shape), 0, 255).astype(np.uint8)
    options = mp4.codec_options(mp4.Mp4Options())
    plain_c = dict(options, **{"x264-params": options["x264-params"] + ":asm=0"})
    files = []
    for label, codec_options in (("simd", options), ("plain-c", plain_c)):
        writer = VideoSegmentWriter(tmp_path / f"{label}.mp4", "mp4", "libx264", FPS, W, H, codec_options)
        writer.write(frames)
        writer.close()
        files.append((tmp_path / f"{label}.mp4").read_bytes())
    assert files[0] == files[1]


# --- the colour conversion -----------------------------------------------------------

KR, KB = Fraction("0.2126"), Fraction("0.0722")  # BT.709
KG = 1 - KR - KB


def round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)) // 1)


def bt709_limited(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) RGB -> Y (H, W), Cb and Cr (H/2, W/2) by the textbook
    formula in exact fractions: E' = Kr R' + Kg G' + Kb B' (R' = R / 255),
    Y = 16 + 219 E', Cb = 128 + 224 (B' - E') / 1.8556, Cr = 128 + 224
    (R' - E') / 1.5748; chroma as the mean over each 2x2 block."""
    h, w, _ = rgb.shape

    def parts(px):
        r, g, b = (Fraction(int(c), 255) for c in px)
        e = KR * r + KG * g + KB * b
        return e, (b - e) / (2 * (1 - KB)), (r - e) / (2 * (1 - KR))

    p = [[parts(rgb[i, j]) for j in range(w)] for i in range(h)]
    y = np.array([[round_half_up(16 + 219 * p[i][j][0]) for j in range(w)] for i in range(h)])
    chroma = []
    for k in (1, 2):
        block = [[sum(p[2 * i + di][2 * j + dj][k] for di in (0, 1) for dj in (0, 1)) / 4 for j in range(w // 2)]
                 for i in range(h // 2)]
        chroma.append(np.array([[round_half_up(128 + 224 * c) for c in row] for row in block]))
    return y, chroma[0], chroma[1]


# Y of (10, 51, 54) is exactly 52.5: one of the 38 colours whose Y is a tie
# (Cb and Cr never are: their divisors hold 2 once, the numerators 2**3).
TIE = (10, 51, 54)


def colour_chart() -> np.ndarray:
    """(8, 28, 3): flat 2x2 blocks of known colours, blocks of mixed pixels
    (where the chroma mean matters), then seeded random pixels."""
    flat = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128),
            (255, 255, 0), (0, 255, 255), (255, 0, 255), (1, 2, 3), (254, 253, 252), (200, 30, 30), TIE]
    img = np.zeros((8, 28, 3), np.uint8)
    for n, colour in enumerate(flat):
        img[0:2, 2 * n : 2 * n + 2] = colour
    img[2:4, 0:2] = [[(255, 0, 0), (0, 0, 255)], [(0, 255, 0), (255, 255, 255)]]
    img[2:4, 2:4] = [[(0, 0, 0), (0, 0, 1)], [(0, 16, 0), (0, 16, 1)]]
    img[2:4, 4:] = np.random.default_rng(0).integers(0, 256, (2, 24, 3))
    img[4:] = np.random.default_rng(1).integers(0, 256, (4, 28, 3))
    return img


def planes(yuv: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (H * 3/2, W) yuv420p array -> Y (H, W), Cb, Cr (H/2, W/2)."""
    flat = yuv.reshape(-1)
    n = h * w
    return flat[:n].reshape(h, w), flat[n : n + n // 4].reshape(h // 2, w // 2), flat[n + n // 4 :].reshape(h // 2, w // 2)


def test_conversion_is_the_bt709_limited_range_formula():
    from framepack.output.segments import rgb_to_yuv420p

    img = colour_chart()
    y, cb, cr = planes(rgb_to_yuv420p(img), *img.shape[:2])
    want_y, want_cb, want_cr = bt709_limited(img)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(cb, want_cb)
    np.testing.assert_array_equal(cr, want_cr)
    # The published 8-bit BT.709 limited-range values of black, white and
    # the primaries, so formula and code cannot both be wrong the same way.
    table = {0: (16, 128, 128), 1: (235, 128, 128), 2: (63, 102, 240), 3: (173, 42, 26), 4: (32, 240, 118)}
    for n, want in table.items():
        assert (y[0, 2 * n], cb[0, n], cr[0, n]) == want
    assert y[0, 24] == 53  # 52.5, rounded half up (half to even would give 52)


def test_every_colour_stays_in_range():
    # All 2**24 colours through Y, and chroma blocks mixing them; the exact
    # integer arithmetic must not overflow anywhere (int32 inside).
    from framepack.output.segments import rgb_to_yuv420p

    levels = np.arange(256, dtype=np.uint8)
    img = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(4096, 4096, 3)
    y, cb, cr = planes(rgb_to_yuv420p(img), 4096, 4096)
    assert (y.min(), y.max()) == (16, 235)  # every colour is a pixel here, black and white too
    assert 16 <= min(cb.min(), cr.min()) and max(cb.max(), cr.max()) <= 240  # blocks mix neighbouring colours
    rng = np.random.default_rng(2)
    for i, j in rng.integers(0, 2048, (40, 2)):  # spot checks against the formula
        block = img[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        want_y, want_cb, want_cr = bt709_limited(block)
        np.testing.assert_array_equal(y[2 * i : 2 * i + 2, 2 * j : 2 * j + 2], want_y)
        assert (cb[i, j], cr[i, j]) == (want_cb[0, 0], want_cr[0, 0])


def test_the_encoder_gets_exactly_those_values(tmp_path):
    # Through the writer into a lossless codec and back: what reaches the
    # encoder is the formula's yuv420p, not a conversion of FFmpeg's own.
    img = colour_chart()
    frames = np.stack([img, img[:, ::-1]])
    path = tmp_path / "lossless.mkv"
    writer = VideoSegmentWriter(path, "matroska", "ffv1", FPS, img.shape[1], img.shape[0], {})
    writer.write(frames)
    writer.close()
    decoded = decode(path, "yuv420p")
    assert decoded.shape == (2, img.shape[0] * 3 // 2, img.shape[1])
    for got, frame in zip(decoded, frames):
        for plane, want in zip(planes(got, *img.shape[:2]), bt709_limited(frame)):
            np.testing.assert_array_equal(plane, want)
