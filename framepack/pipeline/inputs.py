"""Read the user's image with checks that give one clear line each."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from framepack.errors import UserError
from framepack.notes import note

MAX_PIXELS = 64_000_000  # 8K x 8K; larger is a decompression bomb or a mistake

# Transparent pixels are shown on white: it is what image viewers, browsers and
# editors' exports show for a cut-out (a product shot, a logo, a sticker), so the
# start frame looks like the picture the user saw. The colour stored under alpha 0
# is arbitrary (often black), so dropping alpha, as Pillow's convert("RGB") does,
# shows garbage.
BACKGROUND = (255, 255, 255)
BACKGROUND_NAME = "white"

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def load_image(path: str | Path) -> np.ndarray:
    """-> (H, W, 3) uint8 RGB, EXIF orientation applied.

    How each Pillow mode becomes 8-bit RGB (grey modes are copied to R, G and B):

    * ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
      conversion (CMYK naively as (255 - C) * (255 - K) / 255; an embedded ICC
      profile is not applied).
    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, e.g. a 16-bit PNG): v >> 8.
      Pillow opens a 16-bit RGB(A) PNG or TIFF as 8-bit ``RGB``/``RGBA`` keeping the
      high byte, so this is the same rule.
    * ``I`` (32-bit integers): 16-bit (0..65535, then v >> 8) when any value is over
      255 or the file is a PGM (Pillow scales a PGM's maxval to 65535), else
      0..255; out-of-range values are clipped.
    * ``F`` (32-bit float): 0..1 when no value is over 1, else 0..255; rounded to
      the nearest integer and clipped; NaN becomes 0.
    * Alpha (``LA``, ``PA``, ``RGBA``, ``P``/``L``/``RGB``/16-bit grey with a
      transparent colour): composited on white, rounding to nearest, with a
      one-line note on stderr when any pixel is not opaque.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if not path.is_file():
        raise UserError(f"image {path} is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise UserError(
                        f"image {path} is {width}x{height} ({width * height / 1e6:.0f} MP), over the "
                        f"{MAX_PIXELS / 1e6:.0f} MP limit; downscale it first"
                    )
                im.load()
                fmt = im.format
                rgb, alpha = _to_rgb8(ImageOps.exif_transpose(im), fmt)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"image {path} is too large to open safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UserError(f"{path} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"image {path} is corrupt or truncated: {exc}") from exc
    if alpha is not None and (alpha < 255).any():
        note(f"image {path} has transparency; composited on {BACKGROUND_NAME}")
        rgb = _composite(rgb, alpha)
    return rgb


def _to_rgb8(im: Image.Image, fmt: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """-> ((H, W, 3) uint8 colour, (H, W) uint8 alpha or None); rules in load_image."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(im)  # (H, W) uint16 of the file's byte order, int32 or float32
        grey = _grey8(values, mode, fmt)
        alpha = None
        if "transparency" in im.info and mode != "F":  # a tRNS grey value, in the file's range
            alpha = np.where(values == im.info["transparency"], 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2), alpha
    if mode in _ALPHA_MODES or "transparency" in im.info:
        # Pillow turns a palette's or a colour key's transparency into alpha here.
        rgba = np.asarray((im.convert("LA") if mode == "La" else im).convert("RGBA"))
        return rgba[:, :, :3].copy(), rgba[:, :, 3].copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), None


def _grey8(values: np.ndarray, mode: str, fmt: str | None) -> np.ndarray:
    if mode == "F":
        v = np.nan_to_num(values.astype(np.float64), nan=0.0)
        if v.size and v.max() <= 1.0:
            v = v * 255.0
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    v = values.astype(np.int64)
    sixteen = mode.startswith("I;16") or fmt == "PPM" or (v.size and v.max() > 255)
    if sixteen:
        return (np.clip(v, 0, 65535) >> 8).astype(np.uint8)
    return np.clip(v, 0, 255).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over BACKGROUND, (c * a + bg * (255 - a)) / 255 rounded to nearest."""
    a = alpha.astype(np.uint32)[:, :, None]
    bg = np.asarray(BACKGROUND, dtype=np.uint32)
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)
