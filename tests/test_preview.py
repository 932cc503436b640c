"""Live preview: the original's latent-to-RGB map, and a rate-limited file writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from framepack.events import StepEvent
from framepack.engine.plugin_manager import build_plugin_manager
from framepack.output.preview import LATENT_RGB_BIAS, LATENT_RGB_FACTORS, PreviewWriter, latent_to_rgb


def original_fake_decode(latents: torch.Tensor) -> torch.Tensor:
    """The original's vae_decode_fake, restated: a 1x1x1 conv3d with the
    factors as weights, clamped to [0, 1]. (B, 16, T, h, w) -> (B, 3, T, h, w)."""
    weight = torch.tensor(LATENT_RGB_FACTORS).transpose(0, 1)[:, :, None, None, None]
    bias = torch.tensor(LATENT_RGB_BIAS)
    return torch.nn.functional.conv3d(latents, weight, bias=bias).clamp(0.0, 1.0)


def test_factors_are_the_16x3_hunyuan_map():
    assert np.asarray(LATENT_RGB_FACTORS).shape == (16, 3)
    assert LATENT_RGB_FACTORS[12] == (-0.2315, -0.1920, -0.1355)  # spot checks against ComfyUI's table
    assert LATENT_RGB_BIAS == (0.0259, -0.0192, -0.0761)


@pytest.mark.parametrize("frame", [-1, 0, 2])
def test_matches_the_original_fake_decode(frame):
    x0 = torch.randn(2, 16, 3, 6, 10, generator=torch.Generator().manual_seed(0)) * 3
    got = latent_to_rgb(x0, frame)
    reference = (original_fake_decode(x0)[0, :, frame].permute(1, 2, 0) * 255.0).to(torch.uint8).numpy()
    assert got.dtype == np.uint8 and got.shape == (6, 10, 3)
    np.testing.assert_array_equal(got, reference)


def test_all_frames_side_by_side_and_bf16():
    x0 = torch.randn(1, 16, 3, 4, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    strip = latent_to_rgb(x0, frame=None)
    assert strip.shape == (4, 15, 3)
    for t in range(3):
        np.testing.assert_array_equal(strip[:, 5 * t : 5 * (t + 1)], latent_to_rgb(x0, t))


def test_zero_latents_show_the_bias():
    got = latent_to_rgb(torch.zeros(1, 16, 1, 2, 2))
    assert got[0, 0].tolist() == [int(0.0259 * 255), 0, 0]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="B, 16, T, h, w"):
        latent_to_rgb(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(IndexError, match="outside the 2 latent frames"):
        latent_to_rgb(torch.zeros(1, 16, 2, 2, 2), frame=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(i: int, steps: int = 10, section: int = 0, x0=None) -> StepEvent:
    if x0 is None:
        x0 = torch.full((1, 16, 2, 3, 4), float(i))
    return StepEvent(section, 2, i, steps, 0.0, denoised=x0)


def test_writes_the_latest_preview_through_the_hook(tmp_path):
    path = tmp_path / "preview.png"
    preview = PreviewWriter(path, max_per_second=0)
    hook = build_plugin_manager(extra_plugins=[preview]).manager.hook
    x0 = torch.randn(1, 16, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    hook.framepack_on_step(event=step(0, x0=x0))
    image = np.asarray(Image.open(path))
    np.testing.assert_array_equal(image, latent_to_rgb(x0))
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no partial file left


def test_every_n_steps_and_each_sections_last(tmp_path):
    clock = FakeClock()
    preview = PreviewWriter(tmp_path / "p.png", every=4, max_per_second=0, clock=clock)
    written = []
    for i in range(10):
        before = preview.written
        preview.framepack_on_step(step(i))
        if preview.written > before:
            written.append(i)
    assert written == [3, 7, 9]


def test_never_more_than_max_per_second(tmp_path):
    clock = FakeClock()
    preview = PreviewWriter(tmp_path / "p.png", max_per_second=4, clock=clock)
    for i in range(20):  # 20 steps in one second
        preview.framepack_on_step(step(i, steps=100))
        clock.now += 0.05
    assert preview.written == 4
    preview.framepack_on_step(StepEvent(0, 1, 0, 1, 0.0, denoised=None))  # nothing attached: nothing to do
    assert preview.written == 4


def test_scale_and_a_failing_path_warns_once(tmp_path):
    preview = PreviewWriter(tmp_path / "p.png", max_per_second=0, scale=3)
    preview.framepack_on_step(step(0))
    assert Image.open(tmp_path / "p.png").size == (12, 9)
    broken = PreviewWriter(tmp_path / "missing" / "p.png", max_per_second=0)
    with pytest.warns(UserWarning, match="no more previews"):
        broken.framepack_on_step(step(0))
    broken.framepack_on_step(step(1))  # silent now, and the job goes on
    assert broken.written == 0 and broken.failed
