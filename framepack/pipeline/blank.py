"""The start frame of a text-to-video job (no --image): a flat colour or noise.

``noise`` is drawn from its own NumPy generator seeded with the job's seed, so
the same seed gives the same frame and the section loop's torch generator,
which draws each section's noise, is not touched.
"""

from __future__ import annotations

import numpy as np

# 128, not 127.5: the nearest uint8 to the VAE's zero ([-1, 1] scaling).
COLOURS = {"gray": 128, "black": 0, "white": 255}


def blank_image(kind: str, height: int, width: int, seed: int) -> np.ndarray:
    """-> (height, width, 3) uint8."""
    if kind == "noise":
        return np.random.Generator(np.random.PCG64(seed)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.full((height, width, 3), COLOURS[kind], dtype=np.uint8)
