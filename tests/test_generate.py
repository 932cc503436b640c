"""End-to-end generation on the tiny model: determinism, SPEC's section loop,
and the CLI writing a real MP4."""

from __future__ import annotations

import json
import subprocess
import sys

import av
import pytest
import torch
from safetensors.torch import load_file

from framepack.engine.assemble import assemble
from framepack.backends import CacheBackend
from framepack.pipeline.buckets import nearest_bucket
from framepack.pipeline.generate import generate
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.pipeline.settings import JobSettings
from framepack.pipeline.sections import inverted_paddings

CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)
SIZE = (64, 64)


class RecordingCache:
    """A step cache that computes everything and keeps each call's inputs."""

    def __init__(self) -> None:
        from framepack.caching.stepcache import CacheCounts

        self.calls: list[dict] = []
        self.counts = CacheCounts()
        self._section = -1

    def bind(self, transformer) -> None:
        pass

    def begin_section(self, steps: int) -> None:
        from framepack.caching.stepcache import CacheCounts

        self._section += 1
        self.counts = CacheCounts()

    def __call__(self, forward, *, branch, step, steps, **inputs):
        self.calls.append({"section": self._section, "branch": branch, "step": step,
                           **{k: v.detach().clone() for k, v in inputs.items()}})
        self.counts.computed += 1
        return forward(**inputs)


class RecorderPlugin:
    def __init__(self) -> None:
        self.cache = RecordingCache()

    @hookimpl
    def framepack_register_cache(self, register):
        register(CacheBackend(name="recorder", make_cache=lambda options: self.cache))


def run(tiny_model, image, tmp_path, overrides=(), plugins=(), **kw):
    defaults = dict(seconds=2.4, steps=2, size=SIZE, seed=31337, variant="original")
    defaults.update(kw)
    engine = assemble(profile_name="cpu", overrides=list(overrides), hardware=CPU, extra_plugins=list(plugins),
                      include_user_files=False)
    name = f"{defaults['variant']}_{defaults['seed']}_{len(list(tmp_path.iterdir()))}.mp4"
    settings = JobSettings(image=image, prompt="a cat walks", output=tmp_path / name, model=str(tiny_model), **defaults)
    return generate(settings, engine)


@pytest.mark.parametrize("variant", ["original", "f1"])
def test_same_seed_same_latents_other_seed_differs(tiny_model, test_image, tmp_path, variant):
    a = run(tiny_model, test_image, tmp_path, variant=variant)
    b = run(tiny_model, test_image, tmp_path, variant=variant)
    c = run(tiny_model, test_image, tmp_path, variant=variant, seed=7)
    assert a.latents.shape == (1, 16, 1 + 9 * a.sections, 8, 8)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    # Frame 0 of the video latents is the start image's latent in both variants,
    # whatever the seed.
    torch.testing.assert_close(a.latents[:, :, :1], c.latents[:, :, :1])


def test_inverted_section_loop_follows_spec(tiny_model, test_image, tmp_path):
    plugin = RecorderPlugin()
    seconds, lws = 6.0, 9  # 5 sections: paddings [3, 2, 2, 1, 0]
    result = run(tiny_model, test_image, tmp_path, overrides=["cache=recorder"], plugins=[plugin],
                 seconds=seconds, steps=1)
    S = result.sections
    assert S == 5
    final = result.latents  # playback order: start, last section, ..., first section
    start = final[:, :, :1]
    generated = [final[:, :, 1 + lws * (S - 1 - k): 1 + lws * (S - k)] for k in range(S)]  # generation order
    g = torch.Generator("cpu").manual_seed(31337)
    calls = [c for c in plugin.cache.calls if c["step"] == 0 and c["branch"] == "positive"]
    assert len(calls) == S
    for k, (padding, call) in enumerate(zip(inverted_paddings(S), calls)):
        # Indices: pre [1], blank [lws*p], latent [lws], post [1], 2x [2], 4x [16]
        post = 1 + lws * padding + lws
        assert call["indices_latents"].tolist() == list(range(1 + lws * padding, post))
        assert call["indices_latents_clean"].tolist() == [0, post]
        assert call["indices_latents_history_2x"].tolist() == [post + 1, post + 2]
        assert call["indices_latents_history_4x"].tolist() == list(range(post + 3, post + 19))
        # History before section k: newest first, then 19 zero frames.
        history = torch.cat(generated[:k][::-1] + [torch.zeros(1, 16, 19, 8, 8)], dim=2)
        torch.testing.assert_close(call["latents_clean"], torch.cat([start, history[:, :, :1]], dim=2))
        torch.testing.assert_close(call["latents_history_2x"], history[:, :, 1:3])
        torch.testing.assert_close(call["latents_history_4x"], history[:, :, 3:19])
        # Noise: one generator, drawn in section order.
        torch.testing.assert_close(call["hidden_states"], torch.randn((1, 16, lws, 8, 8), generator=g))
        assert call["timestep"].tolist() == [1000.0]
        assert call["guidance"].tolist() == [10000.0]
        # Text embeddings padded to 512 with a mask; cfg 1 runs no negative pass.
        assert call["encoder_hidden_states"].shape[1] == 512 and call["encoder_attention_mask"].dtype == torch.bool
    assert all(c["branch"] == "positive" for c in plugin.cache.calls)


def test_f1_section_loop_follows_spec(tiny_model, test_image, tmp_path):
    plugin = RecorderPlugin()
    lws = 9
    result = run(tiny_model, test_image, tmp_path, overrides=["cache=recorder"], plugins=[plugin],
                 variant="f1", seconds=3.6, steps=1)
    S = result.sections
    assert S == 3
    final = result.latents  # start, section 0, section 1, section 2
    start = final[:, :, :1]
    calls = [c for c in plugin.cache.calls if c["step"] == 0]
    for k, call in enumerate(calls):
        history = torch.cat([torch.zeros(1, 16, 19, 8, 8), final[:, :, : 1 + lws * k]], dim=2)
        assert call["indices_latents_clean"].tolist() == [0, 19]
        assert call["indices_latents_history_4x"].tolist() == list(range(1, 17))
        assert call["indices_latents_history_2x"].tolist() == [17, 18]
        assert call["indices_latents"].tolist() == list(range(20, 29))
        torch.testing.assert_close(call["latents_history_4x"], history[:, :, -19:-3])
        torch.testing.assert_close(call["latents_history_2x"], history[:, :, -3:-1])
        torch.testing.assert_close(call["latents_clean"], torch.cat([start, history[:, :, -1:]], dim=2))


def test_cfg_runs_a_negative_pass_per_step(tiny_model, test_image, tmp_path):
    plugin = RecorderPlugin()
    result = run(tiny_model, test_image, tmp_path, overrides=["cache=recorder"], plugins=[plugin],
                 seconds=1, steps=3, cfg=3.0, negative_prompt="blurry")
    branches = [c["branch"] for c in plugin.cache.calls]
    assert branches.count("positive") == branches.count("negative") == 3 * result.sections
    assert result.computed_steps == [6] * result.sections
    pos = next(c for c in plugin.cache.calls if c["branch"] == "positive")
    neg = next(c for c in plugin.cache.calls if c["branch"] == "negative")
    assert not torch.equal(pos["encoder_hidden_states"], neg["encoder_hidden_states"])


def test_model_swap_gives_the_same_latents_as_resident(tiny_model, test_image, tmp_path):
    resident = run(tiny_model, test_image, tmp_path, seconds=1)
    swapped = run(tiny_model, test_image, tmp_path, seconds=1, overrides=["offload=model_swap"])
    assert torch.equal(resident.latents, swapped.latents)


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.pix_fmt, stream.codec_context.name


@pytest.mark.parametrize("variant, seconds", [("original", 2.4), ("f1", 2.4)])
def test_cli_writes_a_playable_mp4(tiny_model, test_image, tmp_path, variant, seconds):
    out, lat = tmp_path / "video.mp4", tmp_path / "latents.safetensors"
    cmd = [sys.executable, "-m", "framepack", "generate", "--image", str(test_image), "--prompt", "waves",
           "--model", str(tiny_model), "--variant", variant, "--seconds", str(seconds), "--steps", "2",
           "--resolution", "128", "--output", str(out), "--latents-out", str(lat), "--json", "--profile", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    sections = summary["sections"]
    height, width = nearest_bucket(190, 200, 128)  # the test image is 200x190
    frames, rate, pix_fmt, codec = read_video(out)
    assert len(frames) == 36 * sections + 1 == summary["frames"]
    assert rate == 30 and pix_fmt == "yuv420p" and codec == "h264"
    assert frames[0].shape == (height, width, 3)
    latents = load_file(str(lat))["latents"]
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 9 * sections + 1, height // 8, width // 8)
    assert "profile: cpu" in proc.stderr and "section 2/2" in proc.stderr
    # The process's own memory peak, for benchmarks/memory_bench.py (no CUDA here: no VRAM entry).
    assert 0.2 < summary["peak_ram_gb"] < 8 and "peak_vram_gb" not in summary
    # The video, its latents and the job's record; the job folder is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.safetensors", "video.json", "video.mp4"]
