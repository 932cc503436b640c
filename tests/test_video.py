"""PixelTimeline must give the frames the original's full-float buffer gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack.output.timeline import PixelTimeline, to_uint8_frames

OV = 33


def reference_append(history: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """SPEC 3: earlier pixels weighted linspace(1, 0, 33), later ones 1 - w."""
    w = torch.linspace(1, 0, OV).view(1, 1, -1, 1, 1)
    blended = w * history[:, :, -OV:] + (1 - w) * current[:, :, :OV]
    return torch.cat([history[:, :, :-OV], blended, current[:, :, OV:]], dim=2)


def chunk(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, frames, 4, 5), generator=g) * 2.4 - 1.2  # a little past [-1, 1]


@pytest.mark.parametrize("sections", [1, 2, 3, 6])
def test_back_growth_matches_reference(sections):
    chunks = [chunk(37 if i == 0 else 69, i) for i in range(sections)]  # F1 decode sizes
    reference = chunks[0]
    for c in chunks[1:]:
        reference = reference_append(reference, c)
    timeline = PixelTimeline(OV, "back")
    got = [timeline.add(c) for c in chunks] + [timeline.finish()]
    frames = np.concatenate([g for g in got if len(g)])
    assert frames.shape[0] == 36 * sections + 1
    np.testing.assert_array_equal(frames, to_uint8_frames(reference))


@pytest.mark.parametrize("sections", [2, 3, 5])
def test_front_growth_matches_reference(sections):
    # Inverted model: first decode 33 frames (the end of the video), middle
    # sections 69, the last 73; each new chunk comes before the old pixels.
    sizes = [33] + [69] * (sections - 2) + [73]
    chunks = [chunk(n, 10 + i) for i, n in enumerate(sizes)]
    reference = chunks[0]
    for c in chunks[1:]:
        reference = reference_append(c, reference)
    timeline = PixelTimeline(OV, "front")
    got = []
    for c in chunks:
        got.insert(0, timeline.add(c))
    got.insert(0, timeline.finish())
    frames = np.concatenate([g for g in got if len(g)])
    assert frames.shape[0] == 36 * sections + 1
    np.testing.assert_array_equal(frames, to_uint8_frames(reference))


def test_only_the_edge_stays_float():
    timeline = PixelTimeline(OV, "back")
    for i in range(4):
        timeline.add(chunk(37 if i == 0 else 69, i))
        assert timeline.edge.shape[2] == OV


def test_uint8_conversion_truncates_like_the_original():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 6, 1, 1).expand(1, 3, 6, 1, 1)
    got = to_uint8_frames(x)[:, 0, 0, 0].tolist()
    # clamp, *127.5 + 127.5, truncate toward zero
    assert got == [0, 0, 127, 254, 255, 255]
