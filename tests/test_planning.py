"""Memory planning: estimates for the full-size model and refusing jobs that cannot fit."""

from __future__ import annotations

import json

import pytest

from framepack.cli import main
from framepack.engine.profiles import load_profiles
from framepack.errors import UserError
from framepack.hardware import HardwareInfo
from framepack.engine.planning import KNOWN_PARAMS, Plan, check_fits, count_params, estimate, packed_tokens
from framepack.models.sources import ModelSource

GIB = 1024**3


def test_packed_tokens_at_640x608_is_the_spec_number():
    assert packed_tokens(640, 608) == 17_500  # SPEC 7: about 17,500 image tokens


def test_local_configs_are_counted_without_loading_weights(tiny_model):
    counts = count_params(ModelSource("original", root=tiny_model))
    assert 0 < counts["transformer_block"] < counts["transformer"] < 10_000_000
    assert set(counts) == set(KNOWN_PARAMS)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles(include_user_files=False).profiles


def plan(profiles, name, offload, seconds_frames=145, size=(640, 608)):
    return estimate(profiles[name], offload, KNOWN_PARAMS, *size, seconds_frames)


def test_estimates_order_the_policies_sensibly(profiles):
    resident = plan(profiles, "cuda-80gb", "resident")
    swap = plan(profiles, "cuda-48gb", "model_swap")
    stream = plan(profiles, "cuda-24gb", "stream_prefetch")
    dynamic = plan(profiles, "cuda-24gb", "dynamic_swap")
    # Everything resident: transformer + Llama + the rest, roughly 45 GB in bf16/fp16.
    assert 40 < resident.vram_gb < 60
    assert 26 < swap.vram_gb < resident.vram_gb  # the transformer alone is 24 GB
    # Prefetch keeps a few blocks more; at this tier the untiled VAE decode
    # can dominate both, so they may tie.
    assert dynamic.vram_gb <= stream.vram_gb < 12
    # Streaming keeps all weights in RAM; resident only what is being loaded.
    assert stream.ram_gb > resident.ram_gb


def test_nf4_low_tier_fits_a_16_gb_laptop(profiles):
    low = plan(profiles, "cuda-8gb", "stream_prefetch")
    assert low.vram_gb < 6 and low.ram_gb < 16, low


@pytest.mark.parametrize("inverted", [True, False])
def test_planned_peaks_do_not_grow_with_length(profiles, inverted):
    """Sections stream to disk, so a 60-second plan is the 5-second one."""
    short = estimate(profiles["cuda-24gb"], "stream_prefetch", KNOWN_PARAMS, 640, 608, 145, inverted=inverted)
    long = estimate(profiles["cuda-24gb"], "stream_prefetch", KNOWN_PARAMS, 640, 608, 1801, inverted=inverted)
    assert (short.ram_gb, short.vram_gb) == (long.ram_gb, long.vram_gb)


def test_a_6gb_laptop_is_refused_resident_and_told_what_fits(profiles):
    laptop = HardwareInfo(device="cuda", gpu_name="RTX 3060 Laptop", compute_capability=(8, 6),
                          vram_total_gb=5.8, vram_free_gb=5.6, ram_total_gb=16, ram_available_gb=14)
    too_big = plan(profiles, "cuda-80gb", "resident")
    fits = Plan("stream_prefetch", 5.0, 15.0, ())
    with pytest.raises(UserError) as err:
        check_fits(too_big, laptop, [("cuda-8gb", fits), ("cuda-24gb", Plan("stream_prefetch", 7.0, 40.0, ()))])
    message = str(err.value)
    assert f"{too_big.vram_gb:.1f} GB of VRAM" in message and "5.8 GB" in message
    assert "profiles that would fit: cuda-8gb (--profile NAME)" in message


def test_the_cli_refuses_before_loading_anything(monkeypatch, capsys, test_image, tmp_path, tiny_model):
    # A simulated 6 GB card with the everything-resident profile, at the full
    # model's size: the tiny folder's configs are swapped for the real counts.
    monkeypatch.setattr("framepack.engine.planning.count_params", lambda source: dict(KNOWN_PARAMS))
    monkeypatch.setenv("FRAMEPACK_HARDWARE", json.dumps(
        {"device": "cuda", "gpu_name": "RTX 3060 Laptop", "compute_capability": "8.6", "vram_total_gb": 5.8,
         "ram_total_gb": 64}))
    loads = []
    # Where generate looks it up: patching framepack.pipeline.transformer before generate is
    # imported would leave the stand-in bound in generate for every later test in the process.
    import framepack.pipeline.generate as generate

    monkeypatch.setattr(generate, "load_transformer", lambda *a, **k: loads.append(1))
    rc = main(["generate", "--image", str(test_image), "--prompt", "x", "--model", str(tiny_model),
               "--profile", "cuda-80gb", "--output", str(tmp_path / "o.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "GB of VRAM but the GPU has 5.8 GB" in err and "cuda-8gb" in err
    assert not loads and list(tmp_path.iterdir()) == []
