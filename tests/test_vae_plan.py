"""The memory plan's VAE-decode term against real decodes, and what the plan does
where an untiled decode cannot fit (issue 10: 7.5 GB planned, 107 GB asked for)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from framepack.engine.profiles import load_profiles
from framepack.errors import UserError
from framepack.hardware import HardwareInfo
from framepack.models.sources import ModelSource
from framepack.engine.planning import KNOWN_PARAMS, GIB, check_fits, count_params, estimate, vae_geometry
from framepack.engine.vae_memory import VaeGeometry

ROOT = Path(__file__).resolve().parent.parent

# Decodes through the engine's VAE backend in a fresh process (the test's own heap
# would blur the numbers). Peak = RSS high-water mark during the decode (reset via
# /proc/self/clear_refs) minus RSS before it, with the heap trimmed first and the
# mmap threshold fixed as the section loop fixes it (framepack.models.heap).
WORKER = r"""
import gc, json, sys, torch
from framepack.models.heap import fixed_mmap_threshold, release_free_heap
from framepack.models.sources import ModelSource
from plugins.encoders.hunyuan_vae import load

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

root, cases = sys.argv[1], json.loads(sys.argv[2])
vae = load(ModelSource("original", root=root), None, torch.float32)
vae.decode(torch.randn(1, 16, 2, 2, 2))  # one-time allocations
peaks = []
for t, h, w, tiling, tiles in cases:
    torch.manual_seed(0)
    latents = torch.randn(1, 16, t, h // 8, w // 8)
    vae.set_tiling(tiling)
    if tiles:
        vae.vae.enable_tiling(**tiles)
    release_free_heap()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with torch.no_grad(), fixed_mmap_threshold():
        pixels = vae.decode(latents)
    peaks.append(status("VmHWM") - before)
    assert pixels.shape == (1, 3, 1 + 4 * (t - 1), h, w)
    del pixels, latents
    gc.collect()
print(json.dumps(peaks))
"""


def measure(root: Path, cases: list[tuple]) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(root), json.dumps(cases)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu_profile():
    return load_profiles(include_user_files=False).profiles["cpu"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc/self/clear_refs is Linux-only")
def test_planned_decode_is_within_25_percent_of_the_measured_peak(tiny_model, cpu_profile):
    """64 to 256 px untiled (5 latent frames, so diffusers' temporal tiling runs)
    and a tiled decode with 64-px tiles (nine of them at 128 px), as the CPU
    profile plans them for the tiny model."""
    source = ModelSource("original", root=tiny_model)
    params, vae = count_params(source), vae_geometry(source)
    small_tiles = dataclasses.replace(vae, tile_sample_min_height=64, tile_sample_min_width=64,
                                      tile_sample_stride_height=48, tile_sample_stride_width=48)
    jobs = [  # (size, latent window, geometry, tiling)
        (64, 2, vae, False), (128, 2, vae, False), (256, 2, vae, False), (128, 1, small_tiles, True),
    ]
    cases, planned = [], []
    for size, lws, geometry, tiling in jobs:
        plan = estimate(cpu_profile, "resident", params, size, size, 4 * lws + 1, lws, device="cpu",
                        vae=geometry, vae_tiling=tiling)
        assert plan.vae_tiling is tiling
        planned.append(plan.vae_decode_gb * GIB)
        cases.append((2 * lws + 1, size, size, tiling, geometry.tiling_kwargs() if geometry is small_tiles else None))
    measured = measure(tiny_model, cases)
    report = [f"{c[1]}px T={c[0]} tiling={c[3]}: planned {p / 2**20:.0f} MB, measured {m / 2**20:.0f} MB"
              for c, p, m in zip(cases, planned, measured)]
    assert all(abs(p / m - 1) <= 0.25 for p, m in zip(planned, measured)), report


def test_set_tiling_uses_the_tiles_the_plan_assumes(tiny_model):
    from plugins.encoders.hunyuan_vae import load

    import torch

    vae = load(ModelSource("original", root=tiny_model), None, torch.float32)
    vae.set_tiling(True)
    assert vae.vae.use_tiling
    assert {k: getattr(vae.vae, k) for k in VaeGeometry().tiling_kwargs()} == VaeGeometry().tiling_kwargs()
    vae.set_tiling(False)
    assert not vae.vae.use_tiling


def test_local_vae_config_is_read(tiny_model):
    assert vae_geometry(ModelSource("original", root=tiny_model)).block_out_channels == (8, 8, 8, 8)
    assert vae_geometry(ModelSource("original", root=None)) == VaeGeometry()


# -- 2048x2048, the largest size the CLI accepts ---------------------------------------


def test_2048_untiled_is_hundreds_of_gb_so_the_plan_tiles(cpu_profile, tiny_model):
    """The tiny model on the CPU: an untiled decode's causal mask alone is
    (5 * 256 * 256)^2 bytes as bool, 107 GB; the plan switches tiling on instead,
    and what is left fits a 32 GB machine."""
    source = ModelSource("original", root=tiny_model)
    params, vae = count_params(source), vae_geometry(source)
    untiled = estimate(cpu_profile, "resident", params, 2048, 2048, 145, device="cpu", vae=vae, vae_tiling=False)
    planned = estimate(cpu_profile, "resident", params, 2048, 2048, 145, device="cpu", vae=vae)
    n = 5 * 256 * 256
    assert untiled.vae_decode_gb * GIB >= 5 * n * n  # bool + float32 mask
    assert planned.vae_tiling and "VAE decode tiled" in " ".join(planned.notes) and "tiled" in planned.summary()
    assert planned.vae_decode_gb < untiled.vae_decode_gb / 50
    machine = HardwareInfo(device="cpu", ram_total_gb=32, ram_available_gb=30)
    check_fits(planned, machine, [])
    with pytest.raises(UserError, match="GB of system RAM but the machine has 32.0 GB"):
        check_fits(untiled, machine, [])


@pytest.mark.parametrize("name, offload", [("cuda-24gb", "stream_prefetch"), ("cuda-48gb", "model_swap"),
                                           ("cuda-80gb", "resident"), ("cuda-8gb", "stream_prefetch")])
def test_full_size_2048_never_plans_the_untiled_decode(name, offload):
    """Untiled, the real VAE at 2048x2048 needs hundreds of GB, more than any
    card: the plan tiles it, and the decode no longer sets the job's peak (at
    this size the transformer's activations do, which the smaller cards refuse)."""
    profile = load_profiles(include_user_files=False).profiles[name]
    untiled = estimate(profile, offload, KNOWN_PARAMS, 2048, 2048, 145, vae_tiling=False)
    tiled = estimate(profile, offload, KNOWN_PARAMS, 2048, 2048, 145, vae_tiling=True)
    plan = estimate(profile, offload, KNOWN_PARAMS, 2048, 2048, 145)
    assert untiled.vae_decode_gb > 300 and plan.vae_tiling and plan.vram_gb == tiled.vram_gb
    assert plan.vae_decode_gb < 8 and plan.vram_gb < untiled.vram_gb / 10
    h200 = HardwareInfo(device="cuda", vram_total_gb=139.8, ram_total_gb=1024, ram_available_gb=1000)
    with pytest.raises(UserError, match="GB of VRAM but the GPU has 139.8 GB"):
        check_fits(untiled, h200, [])  # refused before loading, never attempted
    if name == "cuda-80gb":
        check_fits(plan, HardwareInfo(device="cuda", vram_total_gb=79.2, ram_total_gb=256, ram_available_gb=250), [])


def test_tiling_is_on_exactly_where_it_lowers_the_peak():
    """At 64x64 tiles change nothing, so tiling stays off. At 640x608 the untiled
    decode (about 14 GB in fp16) is larger than the transformer's activations, so
    it would set even the everything-resident plan's peak: the plan tiles."""
    profile = load_profiles(include_user_files=False).profiles["cuda-80gb"]
    small = estimate(profile, "resident", KNOWN_PARAMS, 64, 64, 145)
    assert not small.vae_tiling
    forced = estimate(profile, "resident", KNOWN_PARAMS, 640, 608, 145, vae_tiling=False)
    auto = estimate(profile, "resident", KNOWN_PARAMS, 640, 608, 145)
    assert auto.vae_tiling and auto.vram_gb < forced.vram_gb
    assert 10 < forced.vae_decode_gb < 20 and auto.vae_decode_gb < 4


def test_the_profile_can_force_tiling_where_it_changes_nothing(cpu_profile):
    # (the cuda-8gb and cuda-16gb profiles set vae_tiling = true)
    tiled = dataclasses.replace(cpu_profile, vae_tiling=True)
    plan = estimate(tiled, "resident", KNOWN_PARAMS, 64, 64, 145, device="cpu")
    assert plan.vae_tiling and not any("would need" in n for n in plan.notes)
