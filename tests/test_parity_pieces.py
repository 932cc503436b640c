"""Seed-parity building blocks, each checked against SPEC.md's own statement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framepack.pipeline.buckets import BUCKETS_640, bucket_table, nearest_bucket, resize_and_center_crop
from framepack.output.timeline import crossfade_weights
from framepack.pipeline.sections import (
    f1_layout,
    inverted_layout,
    inverted_paddings,
    section_count,
    total_latent_frames,
    total_pixel_frames,
)

SPEC_640 = [(416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
            (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416)]  # fmt: skip


def test_640_table_is_the_spec_table():
    assert list(BUCKETS_640) == SPEC_640
    assert bucket_table(640) == BUCKETS_640


@pytest.mark.parametrize("bucket", SPEC_640)
def test_every_640_bucket_maps_to_itself(bucket):
    h, w = bucket
    assert nearest_bucket(h, w) == bucket
    # A scaled copy has the same aspect ratio, so it goes to the same bucket.
    assert nearest_bucket(h * 3, w * 3) == bucket


def test_square_tie_goes_to_the_later_entry():
    # |h*bw - w*bh| is 32*h for both (608,640) and (640,608); the later wins.
    assert nearest_bucket(512, 512) == (640, 608)
    assert nearest_bucket(1, 1) == (640, 608)


def test_nearest_is_smallest_cross_product_difference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(x) for x in rng.integers(16, 4000, size=2))
        metrics = [abs(h * bw - w * bh) for bh, bw in SPEC_640]
        best = min(metrics)
        expected = SPEC_640[max(i for i, m in enumerate(metrics) if m == best)]
        assert nearest_bucket(h, w) == expected


def test_other_resolutions_scale_to_multiples_of_16():
    for res in (128, 320, 512, 960):
        table = bucket_table(res)
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in table)
        assert len(set(table)) == len(table)
        # Portrait stays portrait, landscape stays landscape.
        assert table[0][0] < table[0][1] and table[-1][0] > table[-1][1]


def test_resize_and_center_crop_shape_and_content():
    image = np.zeros((300, 100, 3), dtype=np.uint8)
    image[:, :50] = 255  # left half white
    out = resize_and_center_crop(image, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # Width scales by 64/100 (the larger factor); the crop is vertical, so the
    # left/right split survives.
    assert out[:, :28].mean() > 250 and out[:, 36:].mean() < 5
    assert resize_and_center_crop(image, 300, 100) is image


@pytest.mark.parametrize(
    "seconds, expected",
    [(5, 4), (60, 50), (3, 2), (1, 1), (0.1, 1), (1.8, 2), (5.4, 4), (6.0, 5), (120, 100)],
)
def test_section_count_uses_bankers_rounding(seconds, expected):
    # seconds * 30 / 36: 3 s -> 2.5 -> 2 (banker's), 5.4 s -> 4.5 -> 4.
    assert section_count(seconds) == expected


def test_frame_counts():
    assert total_pixel_frames(4) == 145
    assert [total_pixel_frames(s) for s in (1, 2, 50)] == [37, 73, 1801]
    assert total_latent_frames(4) == 37


@pytest.mark.parametrize(
    "sections, expected",
    [
        (1, [0]),
        (2, [1, 0]),
        (3, [2, 1, 0]),
        (4, [3, 2, 1, 0]),
        (5, [3, 2, 2, 1, 0]),
        (6, [3, 2, 2, 2, 1, 0]),
        (7, [3, 2, 2, 2, 2, 1, 0]),
        (8, [3, 2, 2, 2, 2, 2, 1, 0]),
    ],
)
def test_inverted_paddings(sections, expected):
    assert inverted_paddings(sections) == expected


@pytest.mark.parametrize("padding", [0, 1, 2, 3])
def test_inverted_index_split(padding):
    lws = 9
    layout = inverted_layout(padding, lws)
    blank = lws * padding
    # pre [1] at 0, blank [lws*p], latent [lws], post [1], 2x [2], 4x [16]
    assert layout.latent.tolist() == list(range(1 + blank, 1 + blank + lws))
    post = 1 + blank + lws
    assert layout.clean.tolist() == [0, post]
    assert layout.clean_2x.tolist() == [post + 1, post + 2]
    assert layout.clean_4x.tolist() == list(range(post + 3, post + 19))
    for t in (layout.latent, layout.clean, layout.clean_2x, layout.clean_4x):
        assert t.ndim == 1  # diffusers' class needs 1-D indices


def test_f1_index_split():
    layout = f1_layout(9)
    # start [1], 4x [16], 2x [2], 1x [1], latent [lws]
    assert layout.clean.tolist() == [0, 19]
    assert layout.clean_4x.tolist() == list(range(1, 17))
    assert layout.clean_2x.tolist() == [17, 18]
    assert layout.latent.tolist() == list(range(20, 29))


def test_crossfade_weights():
    w = crossfade_weights(33)
    assert w.shape == (33,) and w[0] == 1 and w[-1] == 0
    assert torch.allclose(w[1:] - w[:-1], torch.full((32,), -1 / 32))
