"""Decoded pixels of the video so far, with the 33-frame cross-fade.

Only the frames at the open edge stay in float (the next cross-fade will
blend them); every other frame is final and kept as uint8, a quarter of the
original's float buffer.
"""

from __future__ import annotations

import numpy as np
import torch



def crossfade_weights(overlap: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights on the EARLIER pixels of a 33-frame cross-fade: linspace(1, 0, overlap);
    the later pixels get 1 - w."""
    return torch.linspace(1, 0, overlap, dtype=dtype)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8, as the original
    writes them: clamp, scale by 127.5, shift, truncate."""
    x = (torch.clamp(pixels.float(), -1.0, 1.0) * 127.5 + 127.5).to(torch.uint8)
    return x[0].permute(1, 2, 3, 0).contiguous().numpy()


class PixelTimeline:
    """Grows at the back (F1) or at the front (inverted model)."""

    def __init__(self, overlap: int, grows_at: str) -> None:
        if grows_at not in ("front", "back"):
            raise ValueError(f"grows_at must be 'front' or 'back', got {grows_at!r}")
        self.overlap = overlap
        self.grows_at = grows_at
        self.edge: torch.Tensor | None = None  # (1, 3, <=overlap, H, W) float32, not final yet
        self.final_frames = 0

    def add(self, pixels: torch.Tensor) -> np.ndarray:
        """Add a decoded chunk (1, 3, T, H, W); return the frames that became
        final, (N, H, W, 3) uint8 in playback order. For front growth these
        come before every frame returned earlier."""
        pixels = pixels.float().cpu()
        if self.edge is not None:
            pixels = self._blend(pixels)
        keep = min(self.overlap, pixels.shape[2])
        if self.grows_at == "back":
            final, self.edge = pixels[:, :, : pixels.shape[2] - keep], pixels[:, :, pixels.shape[2] - keep :]
        else:
            final, self.edge = pixels[:, :, keep:], pixels[:, :, :keep]
        self.final_frames += final.shape[2]
        return to_uint8_frames(final)

    def _blend(self, pixels: torch.Tensor) -> torch.Tensor:
        ov = self.overlap
        if pixels.shape[2] < ov or self.edge.shape[2] < ov:
            raise ValueError(f"cross-fade needs {ov} frames on both sides, got {pixels.shape[2]} and {self.edge.shape[2]}")
        w = crossfade_weights(ov).view(1, 1, -1, 1, 1)  # on the earlier frames
        if self.grows_at == "back":
            blended = w * self.edge + (1 - w) * pixels[:, :, :ov]
            return torch.cat([blended, pixels[:, :, ov:]], dim=2)
        blended = w * pixels[:, :, -ov:] + (1 - w) * self.edge
        return torch.cat([pixels[:, :, :-ov], blended], dim=2)

    def finish(self, before: torch.Tensor | None = None) -> np.ndarray:
        """The edge frames, now final. ``before``: frames (1, 3, overlap, H, W)
        that come before a front-grown timeline (an extended video's input): the
        edge fades in from them with the same cross-fade."""
        if self.edge is None:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        edge = self.edge
        if before is not None:
            if self.grows_at != "front" or before.shape[2] != self.overlap or edge.shape[2] != self.overlap:
                raise ValueError(f"a fade-in needs {self.overlap} frames before a front-grown timeline, "
                                 f"got {before.shape[2]} before and {edge.shape[2]} at the edge")
            w = crossfade_weights(self.overlap).view(1, 1, -1, 1, 1)
            edge = w * before.float() + (1 - w) * edge
        frames = to_uint8_frames(edge)
        self.final_frames += self.edge.shape[2]
        self.edge = None
        return frames
