"""Section arithmetic and the packed-context index layouts (SPEC.md section 3).

Everything here is pure integer bookkeeping, so seed parity can be tested
without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FPS = 30
HISTORY_SPLIT = (1, 2, 16)  # frames of clean context at 1x, 2x and 4x compression


def section_count(seconds: float, latent_window_size: int = 9) -> int:
    """max(round(seconds * 30 / (lws * 4)), 1) with Python's banker's rounding:
    3 s gives 2 sections, 5 s gives 4, 60 s gives 50."""
    return int(max(round(seconds * FPS / (latent_window_size * 4)), 1))


def pixel_frames_per_section(latent_window_size: int) -> int:
    """New pixel frames one section of latents decodes to: 4*lws - 3."""
    return latent_window_size * 4 - 3


def total_pixel_frames(sections: int, latent_window_size: int = 9) -> int:
    """Frames in the finished video: 4*lws*S + 1 (36*S + 1 for lws 9), for both variants."""
    return 4 * latent_window_size * sections + 1


def total_latent_frames(sections: int, latent_window_size: int = 9) -> int:
    """Latent frames of the finished video: the start latent plus lws per section."""
    return latent_window_size * sections + 1


def inverted_paddings(sections: int) -> list[int]:
    """Padding (in windows) of each section of the inverted model, in
    generation order; the last one is 0. For more than 4 sections the
    original compresses the middle: [3] + [2]*(S-3) + [1, 0]."""
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


@dataclass(frozen=True)
class IndexLayout:
    """1-D frame indices of each part of the packed context of one section."""

    latent: torch.Tensor  # the lws frames being generated
    clean: torch.Tensor  # 1x clean context (two frames; more when an inverted job extends a video)
    clean_2x: torch.Tensor  # 2 frames
    clean_4x: torch.Tensor  # 16 frames


def inverted_layout(padding: int, latent_window_size: int = 9, pre: int = 1) -> IndexLayout:
    """Indices for the inverted anti-drifting model:
    arange(pre + lws*p + lws + 1 + 2 + 16) split into
    pre [pre], blank [lws*p], latent [lws], post [1], 2x [2], 4x [16].
    ``pre`` is 1 (the start latent) except when extending a video, whose
    last frames' latents all go before the section (framepack.pipeline.extend)."""
    sizes = [pre, latent_window_size * padding, latent_window_size, 1, 2, 16]
    pre_idx, _blank, latent, post, clean_2x, clean_4x = torch.arange(sum(sizes)).split(sizes)
    return IndexLayout(latent=latent, clean=torch.cat([pre_idx, post]), clean_2x=clean_2x, clean_4x=clean_4x)


def f1_layout(latent_window_size: int = 9) -> IndexLayout:
    """Indices for the F1 forward model: arange(1 + 16 + 2 + 1 + lws) split into
    start [1], 4x [16], 2x [2], 1x [1], latent [lws]."""
    sizes = [1, 16, 2, 1, latent_window_size]
    start, clean_4x, clean_2x, clean_1x, latent = torch.arange(sum(sizes)).split(sizes)
    return IndexLayout(latent=latent, clean=torch.cat([start, clean_1x]), clean_2x=clean_2x, clean_4x=clean_4x)
