"""load_image: every image mode Pillow opens gives the right 8-bit RGB pixels.

Each expectation is worked out here with numpy from the values the test wrote
into the file, not through Pillow's conversions, so a mode that Pillow's
convert("RGB") gets wrong (16-bit grey became white, alpha was dropped) fails.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from framepack.pipeline.inputs import load_image

RNG = np.random.default_rng(1234)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over white, to nearest, in float (the engine uses integers)."""
    a = alpha.astype(np.float64)[..., None]
    return np.rint((rgb.astype(np.float64) * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def _png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write RGB at 16 bits).
    color_type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA; values (H, W[, C]) in 0..65535."""
    h, w = values.shape[:2]
    rows = values.reshape(h, w, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _image(values: np.ndarray, mode: str) -> Image.Image:
    """Pillow image of ``mode`` holding exactly these bytes (rows, then columns)."""
    return Image.frombytes(mode, (values.shape[1], values.shape[0]), np.ascontiguousarray(values).tobytes())


def _opened_mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


# -- 8-bit modes Pillow converts right; checked so that a rewrite keeps them ----------


def test_one_bit(tmp_path):
    bits = RNG.integers(0, 2, (9, 13)).astype(bool)
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert _opened_mode(path) == "1"
    np.testing.assert_array_equal(load_image(path), _grey3(np.where(bits, 255, 0)))


def test_palette(tmp_path):
    palette = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    index = RNG.integers(0, 16, (7, 11)).astype(np.uint8)
    im = _image(index, "P")
    im.putpalette(palette.ravel().tolist())
    path = tmp_path / "palette.png"
    im.save(path)
    assert _opened_mode(path) == "P"
    np.testing.assert_array_equal(load_image(path), palette[index])


def test_grey(tmp_path):
    grey = RNG.integers(0, 256, (8, 6)).astype(np.uint8)
    path = tmp_path / "grey.png"
    _image(grey, "L").save(path)
    np.testing.assert_array_equal(load_image(path), _grey3(grey))


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk(tmp_path, suffix):
    cmyk = RNG.integers(0, 256, (16, 16, 4)).astype(np.uint8)
    path = tmp_path / f"cmyk{suffix}"
    _image(cmyk, "CMYK").save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        stored = np.asarray(im).astype(np.float64)  # what the file holds (JPEG is lossy)
    c, m, y, k = (stored[..., i] for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=-1) / 255
    np.testing.assert_array_equal(load_image(path), np.rint(expected).astype(np.uint8))


def test_ycbcr(tmp_path):
    ycc = RNG.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    path = tmp_path / "ycbcr.tif"
    _image(ycc, "YCbCr").save(path)
    if _opened_mode(path) != "YCbCr":  # Pillow < 13 writes a YCbCr image's TIFF as RGB
        pytest.skip(f"this Pillow ({PIL.__version__}) cannot write a YCbCr TIFF to read back")
    y, cb, cr = (ycc[..., i].astype(np.float64) - (0, 128, 128)[i] for i in range(3))
    # JFIF's full-range matrix; Pillow computes it in fixed point, off by at most one level.
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    expected = np.clip(np.rint(rgb), 0, 255)
    assert np.abs(load_image(path).astype(int) - expected).max() <= 1


# -- modes that convert("RGB") got wrong ----------------------------------------------


def test_sixteen_bit_grey_png_is_not_white(tmp_path):
    values = RNG.integers(0, 65536, (10, 12)).astype(np.uint16)
    values[0, :4] = (0, 255, 256, 65535)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert _opened_mode(path) == "I;16"
    image = load_image(path)
    np.testing.assert_array_equal(image, _grey3(values >> 8))
    assert image[0, :4, 0].tolist() == [0, 0, 1, 255]


def test_hand_written_sixteen_bit_grey_png(tmp_path):
    values = RNG.integers(0, 65536, (5, 7))
    path = _png16(tmp_path / "grey16.png", values, color_type=0)
    np.testing.assert_array_equal(load_image(path), _grey3(values >> 8))


@pytest.mark.parametrize("order", ["<u2", ">u2"])
def test_sixteen_bit_grey_tiff_both_byte_orders(tmp_path, order):
    values = RNG.integers(0, 65536, (6, 9)).astype(order)
    path = tmp_path / "grey16.tif"
    _image(values, "I;16B" if order == ">u2" else "I;16").save(path)
    assert _opened_mode(path) == ("I;16B" if order == ">u2" else "I;16")
    np.testing.assert_array_equal(load_image(path), _grey3(values.astype(np.int64) >> 8))


def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path):
    values = RNG.integers(0, 65536, (6, 5, 3))
    path = _png16(tmp_path / "rgb48.png", values, color_type=2)
    assert _opened_mode(path) == "RGB"  # Pillow reads 48-bit PNGs as 8-bit RGB
    np.testing.assert_array_equal(load_image(path), (values >> 8).astype(np.uint8))


def test_sixteen_bit_pgm_opens_as_I_and_is_scaled(tmp_path):
    values = np.array([[0, 255, 256, 1000], [30000, 40000, 65280, 65535]])
    path = tmp_path / "grey16.pgm"
    path.write_bytes(b"P5\n4 2\n65535\n" + values.astype(">u2").tobytes())
    assert _opened_mode(path) == "I"
    # 255 is dark here: a PGM's I is 16-bit whatever its largest value.
    np.testing.assert_array_equal(load_image(path), _grey3(values >> 8))


@pytest.mark.parametrize("top", [255, 65535, 200_000])
def test_thirty_two_bit_integers(tmp_path, top):
    values = RNG.integers(-50, top + 1, (6, 8)).astype(np.int32)
    values[0, 0] = top
    path = tmp_path / "int32.tif"
    _image(values, "I").save(path)
    assert _opened_mode(path) == "I"
    if top <= 255:  # nothing over 255: taken as 8-bit
        expected = np.clip(values, 0, 255)
    else:  # 16-bit, larger values clipped
        expected = np.clip(values, 0, 65535) >> 8
    np.testing.assert_array_equal(load_image(path), _grey3(expected))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float(tmp_path, scale):
    values = (RNG.random((7, 5)) * scale).astype(np.float32)
    values[0, :2] = (0.0, scale)
    values[1, :2] = (-0.25 * scale, np.nan)
    path = tmp_path / "float.tif"
    _image(values, "F").save(path)
    assert _opened_mode(path) == "F"
    unit = np.nan_to_num(values.astype(np.float64) / scale, nan=0.0)  # 0..1 in both files
    expected = np.clip(np.rint(unit * 255), 0, 255)
    np.testing.assert_array_equal(load_image(path), _grey3(expected))


def test_float_over_one_is_0_to_255(tmp_path):
    values = np.array([[0.5, 1.0, 1.5, 300.0]], dtype=np.float32)
    path = tmp_path / "float.tif"
    _image(values, "F").save(path)
    np.testing.assert_array_equal(load_image(path)[..., 0], [[0, 1, 2, 255]])


# -- transparency ---------------------------------------------------------------------


def _assert_noted(capsys, path):
    err = capsys.readouterr().err
    assert err.strip() == f"framepack: note: image {path} has transparency; composited on white"


def test_rgba_is_composited_on_white(tmp_path, capsys):
    rgba = RNG.integers(0, 256, (9, 7, 4)).astype(np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    path = tmp_path / "rgba.png"
    _image(rgba, "RGBA").save(path)
    image = load_image(path)
    np.testing.assert_array_equal(image, _over_white(rgba[..., :3], rgba[..., 3]))
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 1].tolist() == rgba[0, 1, :3].tolist()
    _assert_noted(capsys, path)


def test_opaque_alpha_gives_no_note(tmp_path, capsys):
    rgb = RNG.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    path = tmp_path / "opaque.png"
    _image(np.dstack([rgb, np.full((4, 4), 255, np.uint8)]), "RGBA").save(path)
    np.testing.assert_array_equal(load_image(path), rgb)
    assert capsys.readouterr().err == ""


def test_grey_with_alpha(tmp_path, capsys):
    la = RNG.integers(0, 256, (6, 6, 2)).astype(np.uint8)
    path = tmp_path / "la.png"
    _image(la, "LA").save(path)
    assert _opened_mode(path) == "LA"
    np.testing.assert_array_equal(load_image(path), _over_white(_grey3(la[..., 0]), la[..., 1]))
    _assert_noted(capsys, path)


def test_sixteen_bit_rgba_png(tmp_path, capsys):
    values = RNG.integers(0, 65536, (5, 6, 4))
    path = _png16(tmp_path / "rgba64.png", values, color_type=6)
    high = values >> 8
    np.testing.assert_array_equal(load_image(path), _over_white(high[..., :3], high[..., 3]))
    _assert_noted(capsys, path)


def test_palette_with_per_entry_alpha(tmp_path, capsys):
    palette = RNG.integers(0, 256, (8, 3)).astype(np.uint8)
    alphas = np.array([0, 40, 128, 200, 255, 255, 255, 255], np.uint8)
    index = RNG.integers(0, 8, (6, 9)).astype(np.uint8)
    index[0, 0] = 0
    im = _image(index, "P")
    im.putpalette(palette.ravel().tolist())
    path = tmp_path / "palette_alpha.png"
    im.save(path, transparency=alphas.tobytes())
    assert _opened_mode(path) == "P"
    np.testing.assert_array_equal(load_image(path), _over_white(palette[index], alphas[index]))
    _assert_noted(capsys, path)


def test_gif_with_a_transparent_index(tmp_path, capsys):
    palette = RNG.integers(0, 256, (4, 3)).astype(np.uint8)
    index = RNG.integers(0, 4, (5, 5)).astype(np.uint8)
    index[2, 2] = 3
    im = _image(index, "P")
    im.putpalette(palette.ravel().tolist())
    path = tmp_path / "key.gif"
    im.save(path, transparency=3)
    expected = palette[index].copy()
    expected[index == 3] = 255
    np.testing.assert_array_equal(load_image(path), expected)
    _assert_noted(capsys, path)


def test_sixteen_bit_grey_with_a_transparent_value(tmp_path, capsys):
    values = RNG.integers(0, 65536, (4, 5)).astype(np.uint16)
    values[1, 1] = 4000
    path = tmp_path / "grey16_key.png"
    Image.fromarray(values).save(path, transparency=4000)
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.info["transparency"] == 4000
    expected = _grey3(values >> 8)
    expected[values == 4000] = 255
    np.testing.assert_array_equal(load_image(path), expected)
    _assert_noted(capsys, path)


# -- EXIF orientation -----------------------------------------------------------------

# How a viewer turns the stored pixels (H, W, 3) for each EXIF orientation tag.
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # rotated 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, k=1),  # rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation(tmp_path, orientation):
    # 16-pixel blocks of flat colour survive JPEG nearly unchanged; the expectation
    # is taken from the decoded stored pixels anyway, so only the turn is tested.
    blocks = RNG.integers(0, 256, (2, 3, 3)).astype(np.uint8)
    stored = np.kron(blocks, np.ones((16, 16, 1), np.uint8))  # (32, 48, 3), not square
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"turned{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as im:
        decoded = np.asarray(im.convert("RGB"))
    image = load_image(path)
    np.testing.assert_array_equal(image, ORIENTED[orientation](decoded))
    assert image.shape == ((48, 32, 3) if orientation >= 5 else (32, 48, 3))
