"""Read the user's image with checks that give one clear line each."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from framepack.errors import UserError

MAX_PIXELS = 64_000_000  # 8K x 8K; larger is a decompression bomb or a mistake


def load_image(path: str | Path) -> np.ndarray:
    """-> (H, W, 3) uint8 RGB, EXIF orientation applied."""
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
                rgb = ImageOps.exif_transpose(im).convert("RGB")
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"image {path} is too large to open safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UserError(f"{path} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"image {path} is corrupt or truncated: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()
