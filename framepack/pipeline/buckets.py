"""Resolution buckets and the resize-then-centre-crop the original applies."""

from __future__ import annotations

import numpy as np
from PIL import Image

# (height, width) buckets of the original for base resolution 640.
BUCKETS_640: tuple[tuple[int, int], ...] = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)  # fmt: skip


def bucket_table(resolution: int = 640) -> tuple[tuple[int, int], ...]:
    """Buckets for a base resolution.

    640 is the original's exact table. Other bases scale it and round each
    side to a multiple of 16 (8 for the VAE times 2 for the patch size); this
    is our extension, documented in docs/algorithm.md.
    """
    if resolution == 640:
        return BUCKETS_640
    if resolution < 64:
        raise ValueError(f"resolution {resolution} is too small (minimum 64)")
    scale = resolution / 640
    table: list[tuple[int, int]] = []
    for h, w in BUCKETS_640:
        bucket = (max(16, round(h * scale / 16) * 16), max(16, round(w * scale / 16) * 16))
        if bucket not in table:
            table.append(bucket)
    return tuple(table)


def nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The bucket nearest in aspect ratio: smallest |h*bw - w*bh|; on a tie the
    later entry wins (so a square image goes to 640x608 at base 640)."""
    best, best_metric = None, None
    for bh, bw in bucket_table(resolution):
        metric = abs(height * bw - width * bh)
        if best_metric is None or metric <= best_metric:
            best, best_metric = (bh, bw), metric
    assert best is not None
    return best


def resize_and_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale by the larger of the two factors with Lanczos, then centre-crop.

    image: (H, W, 3) uint8 -> (height, width, 3) uint8.
    """
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image
    pil = Image.fromarray(image)
    scale = max(width / src_w, height / src_h)
    new_w, new_h = int(round(src_w * scale)), int(round(src_h * scale))
    pil = pil.resize((new_w, new_h), Image.LANCZOS)
    # Float box on purpose: PIL rounds it the same way the original's did.
    box = ((new_w - width) / 2, (new_h - height) / 2, (new_w + width) / 2, (new_h + height) / 2)
    return np.array(pil.crop(box))
