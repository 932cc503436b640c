"""Every speed and memory figure at full size, in one run (issue 16).

    bash benchmarks/gpu_check.sh --wheels DIR --out DIR     # on the GPU machine
    python benchmarks/gpu_check.py --out DIR [--dry-run] [--budget-s 480]

GPU time comes in short leases, so this is one script that measures, in order
of how much each figure is wanted, and records an error (and goes on) instead
of stopping when one measurement fails:

1. the full-size transformer (13B, bf16, random weights built on the GPU from
   the meta device: nothing on disk): seconds per step and per frame at
   640x608, window 9, for every attention kernel that imports, the FLOPs of
   one forward (counted by torch's FlopCounterMode with sdpa) and the share
   of the bf16 matrix peak, measured here with a large matmul, that it reaches;
2. step caches over one 25-step section: none (every call computed, with
   MagCache's magnitude ratios recorded on the way), TeaCache 0.15 and
   MagCache with its default thresholds on those ratios: calls computed and
   skipped and the seconds per frame that gives. Random weights make the
   skip pattern meaningless for quality; the cost of a skipped step is real;
3. the full-size VAE decode of one section (2 x window latent frames, as the
   original decodes), untiled and tiled: seconds and peak VRAM, next to the
   planner's estimate (framepack.engine.vae_memory);
4. the fp8 transformer (layerwise casting) and the NF4 one (bitsandbytes,
   quantised layer by layer on the GPU from the bf16 weights): peak VRAM,
   peak RAM and seconds per step;
5. the offload policies under emulated 6, 8, 12 and 24 GB cards
   (``torch.cuda.set_per_process_memory_fraction``), the weights in CPU RAM:
   peak VRAM and seconds per step, and stream_prefetch / dynamic_swap.

Writes ``gpu-check.json`` (device, versions, settings, every figure and every
error) and ``gpu-check.md`` into --out, atomically, after every measurement,
so a run cut short keeps what it measured. ``--dry-run`` runs every code path
on the CPU with tiny shapes (the test suite does), so a GPU run meets no
trivial bug. Exit status 0 unless the script itself is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

GIB = 2**30
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, SXM parts).
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "4090": 165.0,
                    "3090": 71.0, "A10G": 70.0}
CAPS_GB = (6, 8, 12, 24)
POLICIES = ("sequential", "dynamic_swap", "stream_prefetch", "model_swap")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one run measures: the real sizes, or the dry run's tiny ones."""

    transformer: dict
    vae: dict
    height: int
    width: int
    window: int
    steps: int
    repeat: int  # timed forwards per configuration after one warm-up
    text_tokens: int
    image_tokens: int
    matmul_n: int
    caps_gb: tuple
    vae_latent_frames: int  # one section's decode: 2 x window latent frames, as the original decodes
    weight_std: float  # of the random weights: large enough that a block's update survives bf16 rounding


def full_shapes() -> Shapes:
    from framepack.models.full import transformer_config, vae_config

    return Shapes(transformer=transformer_config(), vae=vae_config(), height=640, width=608, window=9, steps=25,
                  repeat=3, text_tokens=256, image_tokens=729, matmul_n=8192, caps_gb=CAPS_GB, vae_latent_frames=18,
                  weight_std=0.02)


def dry_shapes() -> Shapes:
    from framepack.models.full import transformer_config, vae_config

    transformer = {**transformer_config(), "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
                   "num_single_layers": 1, "num_refiner_layers": 1, "rope_axes_dim": (4, 6, 6),
                   "text_embed_dim": 32, "pooled_projection_dim": 32, "image_proj_dim": 32}
    vae = {**vae_config(), "block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4, "layers_per_block": 1}
    return Shapes(transformer=transformer, vae=vae, height=64, width=64, window=9, steps=4, repeat=1,
                  text_tokens=16, image_tokens=9, matmul_n=256, caps_gb=(6,), vae_latent_frames=3, weight_std=0.2)


class Check:
    """The report, the time budget, and one place where a failure becomes a record."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.dry_run = dry_run
        self.report: dict = {"benchmark": "gpu_check", "dry_run": dry_run, "started": _now(), "figures": {},
                             "errors": [], "skipped": []}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def measure(self, name: str, min_left_s: float = 0.0):
        """Run the block unless the budget is spent; record its error instead of raising."""
        if self.left_s() < min_left_s:
            self.report["skipped"].append({"what": name, "why": f"time budget: {self.left_s():.0f} s left, "
                                                               f"needs about {min_left_s:.0f}"})
            print(f"[gpu_check] skip {name}: time budget", flush=True)
            yield False
            self.save()
            return
        started = time.monotonic()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            yield True
        except Exception as exc:  # one figure failing must not lose the others
            self.error(name, exc)
        finally:
            print(f"[gpu_check] {name}: {time.monotonic() - started:.1f} s", flush=True)
            self.save()

    def error(self, what: str, exc: BaseException) -> None:
        self.report["errors"].append({"what": what, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                                      "traceback": traceback.format_exc(limit=6)[-2000:]})
        print(f"[gpu_check] {what} failed: {type(exc).__name__}: {str(exc).strip()[:200]}", flush=True)

    def put(self, section: str, key: str, value) -> None:
        self.report["figures"].setdefault(section, {})[key] = value

    def save(self) -> None:
        self.report["finished"] = _now()
        _write_atomic(self.out / "gpu-check.json", json.dumps(self.report, indent=2, default=str) + "\n")
        _write_atomic(self.out / "gpu-check.md", markdown(self.report))


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    from framepack.hardware import detect_hardware

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes", "sageattention", "triton",
                 "flash_attn", "xformers", "framepack"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception as exc:  # absent, or present and broken: both are facts of this machine
            versions[name] = f"not importable ({type(exc).__name__})"
    hw = detect_hardware()
    env = {"device": device.type, "name": _device_name(device), "ram_total_gb": hw.ram_total_gb,
           "vram_total_gb": hw.vram_total_gb, "compute_capability": hw.compute_capability, "versions": versions}
    return env


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def spec_peak_tflops(name: str) -> float | None:
    return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)


def matmul_peak(device: torch.device, n: int) -> float:
    """Measured bf16 matmul TFLOP/s (n x n x n): the ceiling a forward's share is taken of."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = statistics.median(_timed(lambda: a @ b, 10 if device.type == "cuda" else 2, device))
    return 2 * n**3 / seconds / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeat: int, device: torch.device) -> list[float]:
    fn()  # warm-up: compilation, autotuning, the allocator
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def _reset_peaks(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_vram_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ---------------------------------------------------------------- the transformer


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, std: float = 0.02) -> torch.nn.Module:
    """Random weights born on ``device`` in ``dtype`` (framepack.models.full.random_module)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.models.full import random_module

    return random_module(HunyuanVideoFramepackTransformer3DModel, config, device, dtype, std)


def section_inputs(shapes: Shapes, config: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """One F1 section's packed inputs (the token count is the same for both variants)."""
    from framepack.pipeline.sections import f1_layout

    g = torch.Generator(device).manual_seed(0)
    h, w = shapes.height // 8, shapes.width // 8

    def r(*shape):
        return torch.randn(shape, generator=g, device=device).to(dtype)

    layout = f1_layout(shapes.window)
    return dict(
        hidden_states=r(1, 16, shapes.window, h, w),
        timestep=torch.tensor([900.0], device=device, dtype=dtype),
        encoder_hidden_states=r(1, shapes.text_tokens, config["text_embed_dim"]),
        encoder_attention_mask=torch.ones(1, shapes.text_tokens, dtype=torch.bool, device=device),
        pooled_projections=r(1, config["pooled_projection_dim"]),
        image_embeds=r(1, shapes.image_tokens, config["image_proj_dim"]),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        indices_latents=layout.latent.to(device), latents_clean=r(1, 16, 2, h, w),
        indices_latents_clean=layout.clean.to(device), latents_history_2x=r(1, 16, 2, h, w),
        indices_latents_history_2x=layout.clean_2x.to(device), latents_history_4x=r(1, 16, 16, h, w),
        indices_latents_history_4x=layout.clean_4x.to(device),
    )


def attention_backends(hw) -> tuple[list, dict]:
    """(runnable attention backends, {name: why not} for the others), from the real plugin manager."""
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends

    registry = collect_backends(build_plugin_manager())
    runnable, not_here = [], {}
    for entry in registry.items("attention"):
        reason = entry.backend.unavailable_reason(hw)
        if reason:
            not_here[entry.backend.name] = reason
        else:
            runnable.append(entry.backend)
    runnable.sort(key=lambda b: (b.name != "sdpa", b.name))
    return runnable, not_here


def install_kernel(model: torch.nn.Module, backend) -> None:
    from framepack.attention.processors import build_attention, install_attention

    install_attention(model, build_attention(backend, backend.options()))


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs, return_dict=False)
    return int(counter.get_total_flops())


def step_seconds(model, inputs: dict, repeat: int, device: torch.device) -> list[float]:
    with torch.inference_mode():
        return _timed(lambda: model(**inputs, return_dict=False), repeat, device)


def frames_per_section(window: int) -> int:
    from framepack.pipeline.sections import pixel_frames_per_section

    return pixel_frames_per_section(window)


def measure_kernels(check: Check, model, inputs, shapes: Shapes, device, backends, not_here, flops, peak) -> None:
    frames = frames_per_section(shapes.window)
    check.put("kernels", "not_here", not_here)
    for backend in backends:
        with check.measure(f"kernel {backend.name}", min_left_s=20) as go:
            if not go:
                continue
            install_kernel(model, backend)
            _reset_peaks(device)
            times = step_seconds(model, inputs, shapes.repeat, device)
            step = statistics.median(times)
            row = {"s_per_step": step, "step_times_s": times, "s_per_frame": step * shapes.steps / frames,
                   "peak_vram_gb": _peak_vram_gb(device), "version": backend.version()}
            if flops:
                row["tflops"] = flops / step / 1e12
                if peak.get("measured_tflops"):
                    row["share_of_measured_peak"] = row["tflops"] / peak["measured_tflops"]
                if peak.get("spec_tflops"):
                    row["share_of_spec_peak"] = row["tflops"] / peak["spec_tflops"]
            check.put("kernels", backend.name, row)
    sdpa = next((b for b in backends if b.name == "sdpa"), None)
    if sdpa is not None:
        install_kernel(model, sdpa)  # what the later measurements run with


# ---------------------------------------------------------------- step caches


def sample_section(model, inputs: dict, cache, shapes: Shapes, device) -> float:
    """One section sampled as the engine's loop does (UniPC, cfg 1): seconds."""
    from framepack.pipeline.sampling.guidance import make_x0_model
    from framepack.pipeline.sampling.schedule import section_sigmas
    from framepack.pipeline.sampling.unipc import sample_unipc
    from framepack.pipeline.transformer import forward_velocity

    context = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
    h, w = shapes.height // 8, shapes.width // 8
    sigmas = section_sigmas(shapes.steps, shapes.window, h, w)
    noise = torch.randn((1, 16, shapes.window, h, w), generator=torch.Generator().manual_seed(1)).to(device)
    dtype = next(model.parameters()).dtype
    step_of = {"positive": 0, "negative": 0}

    def forward(**kw):
        return forward_velocity(model, **kw)

    def call(hidden_states, timestep, branch):
        step = step_of[branch]
        step_of[branch] += 1
        return cache(forward, branch=branch, step=step, steps=shapes.steps, hidden_states=hidden_states,
                     timestep=timestep, **context)

    cache.bind(model)
    cache.begin_section(shapes.steps)
    x0 = make_x0_model(call, cfg=1.0, rescale=0.0, dtype=dtype)
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        sample_unipc(x0, noise, sigmas)
    _sync(device)
    return time.perf_counter() - started


def measure_caches(check: Check, model, inputs, shapes: Shapes, device) -> None:
    from framepack.caching.blockcache import remove_block_gate
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
    from framepack.pipeline.calibrate import CalibrationRecorder, magcache_data

    registry = collect_backends(build_plugin_manager())
    frames = frames_per_section(shapes.window)
    per_section = 60.0 * shapes.steps / 25
    check.put("caches", "note", "random weights: the skip pattern says nothing about quality; "
                                "the seconds a skipped step saves are real")
    ratios = None
    with check.measure("cache none (recording MagCache ratios)", min_left_s=per_section) as go:
        if go:
            recorder = CalibrationRecorder()
            seconds = sample_section(model, inputs, recorder, shapes, device)
            check.put("caches", "none", {"computed": shapes.steps, "skipped": 0, "section_s": seconds,
                                         "s_per_frame": seconds / frames})
            ratios = magcache_data(recorder.measurements, shapes.steps)["ratios"]
            check.put("caches", "magcache_ratios_measured", ratios)
    configs = [("teacache 0.15", "teacache", {"rel_l1_thresh": 0.15})]
    if ratios:
        configs.append(("magcache defaults", "magcache", {"mag_ratios": ratios["positive"]}))
    for label, name, options in configs:
        with check.measure(f"cache {label}", min_left_s=per_section) as go:
            if not go:
                continue
            backend = registry.get("cache", name).backend
            cache = backend.make_cache(backend.options(**options) if options else backend.options())
            seconds = sample_section(model, inputs, cache, shapes, device)
            check.put("caches", label, {"computed": cache.counts.computed, "skipped": cache.counts.skipped,
                                        "section_s": seconds, "s_per_frame": seconds / frames,
                                        "options": options if name != "magcache" else "defaults, measured ratios"})
    remove_block_gate(model)


# ---------------------------------------------------------------- VAE


def measure_vae(check: Check, shapes: Shapes, device) -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack.engine.vae_memory import VaeGeometry, decode_peak_bytes

    from framepack.models.full import random_module

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = random_module(AutoencoderKLHunyuanVideo, shapes.vae, device, dtype)
    geometry = VaeGeometry.from_config(shapes.vae)
    latent_frames = shapes.vae_latent_frames
    latents = torch.randn((1, 16, latent_frames, shapes.height // 8, shapes.width // 8), device=device, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    for tiled in (False, True):
        label = "tiled" if tiled else "untiled"
        with check.measure(f"vae decode {label}", min_left_s=30) as go:
            if not go:
                continue
            if tiled:
                vae.enable_tiling(**geometry.tiling_kwargs())
            else:
                vae.disable_tiling()
            _reset_peaks(device)
            with torch.inference_mode():
                times = _timed(lambda: vae.decode(latents / vae.config.scaling_factor).sample, 1, device)
            estimate = decode_peak_bytes(geometry, latent_frames, shapes.height, shapes.width,
                                         torch.finfo(dtype).bits // 8, tiled, device.type)
            peak = _peak_vram_gb(device)
            row = {"seconds": statistics.median(times), "latent_frames": latent_frames,
                   "peak_vram_gb": peak, "weights_gb": weights / GIB,
                   "planner_estimate_above_weights_gb": estimate / GIB}
            if peak is not None:
                row["planner_error"] = (estimate / GIB) / (peak - weights / GIB) - 1
            check.put("vae", label, row)


# ---------------------------------------------------------------- weight formats


def measure_fp8(check: Check, shapes: Shapes, device) -> None:
    """The layerwise-cast fp8 transformer, as the engine runs it."""
    from framepack.hardware import PeakMemory
    from framepack.models.quantize import apply_fp8_storage

    with check.measure("format fp8", min_left_s=40) as go:
        if not go:
            return
        with PeakMemory() as memory:
            model = build_transformer(shapes.transformer, device, torch.bfloat16, shapes.weight_std)
            apply_fp8_storage(model, torch.bfloat16)
            _reset_peaks(device)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            inputs = section_inputs(shapes, shapes.transformer, device, torch.bfloat16)
            times = step_seconds(model, inputs, shapes.repeat, device)
        check.put("formats", "fp8", {"s_per_step": statistics.median(times), "step_times_s": times,
                                     "weights_gb": weights / GIB, "peak_vram_gb": memory.peak_vram_gb,
                                     "peak_ram_gb": memory.peak_ram_gb})
        del model, inputs


def to_nf4(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Swap the engine's NF4 set of Linears (framepack.models.quantize.NF4_KEEP) for
    bitsandbytes' Linear4bit, quantised on ``device`` one layer at a time, so the
    peak is the bf16 model, not the bf16 model plus its NF4 copy. Returns how many."""
    import bitsandbytes as bnb

    from framepack.models.quantize import quantized_parameter_names

    with torch.device("meta"):
        from diffusers import HunyuanVideoFramepackTransformer3DModel

        meta = HunyuanVideoFramepackTransformer3DModel.from_config(model.config)
    targets = {name[: -len(".weight")] for name in quantized_parameter_names(meta, "nf4")}
    del meta
    swapped = 0
    for name in sorted(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data.to(dtype), requires_grad=False, quant_type="nf4").to(device)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.to(device, dtype), requires_grad=False)
        setattr(parent, child, new)
        del old
        swapped += 1
    return swapped


def measure_nf4(check: Check, shapes: Shapes, device) -> None:
    from framepack.hardware import PeakMemory

    with check.measure("format nf4", min_left_s=60) as go:
        if not go:
            return
        model = build_transformer(shapes.transformer, device, torch.bfloat16, shapes.weight_std)
        swapped = to_nf4(model, device, torch.bfloat16)
        gc.collect()
        _reset_peaks(device)
        with PeakMemory() as memory:
            inputs = section_inputs(shapes, shapes.transformer, device, torch.bfloat16)
            times = step_seconds(model, inputs, shapes.repeat, device)
        held = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
        check.put("formats", "nf4", {"s_per_step": statistics.median(times), "step_times_s": times,
                                     "linears_quantised": swapped, "resident_vram_gb": held,
                                     "peak_vram_gb": memory.peak_vram_gb, "peak_ram_gb": memory.peak_ram_gb})
        del model, inputs


# ---------------------------------------------------------------- offload policies


def measure_offload(check: Check, shapes: Shapes, device) -> None:
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
    from framepack.hardware import PeakMemory, detect_hardware, limit_fraction

    registry = collect_backends(build_plugin_manager())
    hw = detect_hardware()
    cpu_model = None
    with check.measure("offload: the bf16 weights to CPU RAM", min_left_s=60) as go:
        if go:
            cpu_model = build_transformer(shapes.transformer, device, torch.bfloat16, shapes.weight_std).to("cpu")
            _reset_peaks(device)
    if cpu_model is None:
        return
    weights_gb = sum(p.numel() * p.element_size() for p in cpu_model.parameters()) / GIB
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    results: dict = {}
    # Policy by policy, every cap: a policy's set-up (pinning 26 GB for
    # stream_prefetch) is paid once; the cap only bounds the allocator.
    for name in POLICIES:
        entry = registry.get("offload", name)
        reason = entry.backend.unavailable_reason(hw) if entry else "not registered"
        caps = [cap for cap in shapes.caps_gb if not (name == "model_swap" and weights_gb > cap)]
        for cap in shapes.caps_gb:
            if reason:
                results[f"{name} @ {cap} GB"] = {"skipped": reason}
            elif cap not in caps:
                results[f"{name} @ {cap} GB"] = {"skipped": f"the whole transformer ({weights_gb:.1f} GB) "
                                                            f"does not fit {cap} GB"}
        if reason or not caps:
            continue
        with check.measure(f"offload {name}: prepare", min_left_s=30 + 15 * len(caps)) as go:
            if not go:
                continue
            policy = entry.backend.make_policy(entry.backend.options(), device)
            try:
                started = time.perf_counter()
                policy.prepare({"transformer": cpu_model})
                inputs = section_inputs(shapes, shapes.transformer, policy.execution_device, torch.bfloat16)
                prepare_s = time.perf_counter() - started
                for cap in caps:
                    with check.measure(f"offload {name} @ {cap} GB", min_left_s=15) as go_cap:
                        if not go_cap:
                            continue
                        if total:
                            torch.cuda.set_per_process_memory_fraction(limit_fraction(cap, total), device)
                        try:
                            _reset_peaks(device)
                            with PeakMemory() as memory, policy.stage("transformer"):
                                times = step_seconds(cpu_model, inputs, max(1, shapes.repeat - 1), device)
                            results[f"{name} @ {cap} GB"] = {
                                "policy": name, "cap_gb": cap, "s_per_step": statistics.median(times),
                                "step_times_s": times, "prepare_s": prepare_s, "peak_vram_gb": memory.peak_vram_gb,
                                "peak_ram_gb": memory.peak_ram_gb}
                        except Exception as exc:  # out of memory under a small cap is a figure too
                            results[f"{name} @ {cap} GB"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                            raise
                        finally:
                            if total:
                                torch.cuda.set_per_process_memory_fraction(1.0, device)
                            check.put("offload", "results", results)
            finally:
                with contextlib.suppress(Exception):
                    policy.release("transformer")
                del inputs
                _undo_offload_hooks(cpu_model)
                _reset_peaks(device)
    for cap in shapes.caps_gb:
        stream, swap = results.get(f"stream_prefetch @ {cap} GB", {}), results.get(f"dynamic_swap @ {cap} GB", {})
        if stream.get("s_per_step") and swap.get("s_per_step"):
            check.put("offload", f"stream_prefetch / dynamic_swap @ {cap} GB", stream["s_per_step"] / swap["s_per_step"])
    check.put("offload", "results", results)
    check.put("offload", "weights_gb", weights_gb)


def _undo_offload_hooks(model: torch.nn.Module) -> None:
    """Back to plain modules in CPU RAM, for the next policy."""
    with contextlib.suppress(Exception):
        from diffusers.hooks import HookRegistry

        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for hook_name in list(registry.hooks):
                    registry.remove_hook(hook_name, recurse=False)
    for module in model.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    model.to("cpu")
    left = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
    if left:
        raise RuntimeError(f"after removing the offload hooks {len(left)} parameters are not in CPU RAM, e.g. {left[0]}")


# ---------------------------------------------------------------- the report


def markdown(report: dict) -> str:
    f = report.get("figures", {})
    env = f.get("environment", {}).get("info", {})
    lines = [f"# GPU check{' (dry run, CPU, tiny shapes)' if report.get('dry_run') else ''}", "",
             f"{env.get('name', '?')}; torch {env.get('versions', {}).get('torch', '?')}; "
             f"started {report.get('started')}, finished {report.get('finished')}", ""]
    peak = f.get("peak", {})
    if peak:
        lines += [f"bf16 matmul: measured {_n(peak.get('measured_tflops'))} TFLOP/s, datasheet "
                  f"{_n(peak.get('spec_tflops'))}; one forward: {_n((peak.get('forward_flops') or 0) / 1e12)} TFLOP", ""]
    kernels = {k: v for k, v in f.get("kernels", {}).items() if isinstance(v, dict) and "s_per_step" in v}
    if kernels:
        lines += ["| kernel | s/step | s/frame | TFLOP/s | share of measured peak | peak VRAM GB |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {_n(v['s_per_step'])} | {_n(v['s_per_frame'])} | {_n(v.get('tflops'))} | "
                  f"{_n(v.get('share_of_measured_peak'))} | {_n(v.get('peak_vram_gb'))} |" for k, v in kernels.items()]
        lines.append("")
    caches = {k: v for k, v in f.get("caches", {}).items() if isinstance(v, dict) and "computed" in v}
    if caches:
        lines += ["| cache | computed | skipped | section s | s/frame |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['computed']} | {v['skipped']} | {_n(v['section_s'])} | {_n(v['s_per_frame'])} |"
                  for k, v in caches.items()]
        lines.append("")
    for section, keys in (("vae", ("seconds", "peak_vram_gb", "planner_estimate_above_weights_gb")),
                          ("formats", ("s_per_step", "peak_vram_gb", "peak_ram_gb"))):
        rows = f.get(section, {})
        if rows:
            lines += [f"| {section} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {k} | " + " | ".join(_n(v.get(key)) for key in keys) + " |" for k, v in rows.items()]
            lines.append("")
    offload = f.get("offload", {}).get("results", {})
    if offload:
        lines += ["| offload @ cap | s/step | peak VRAM GB | peak RAM GB | note |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_n(v.get('s_per_step'))} | {_n(v.get('peak_vram_gb'))} | {_n(v.get('peak_ram_gb'))} | "
                  f"{v.get('skipped', '')} |" for k, v in offload.items()]
        lines.append("")
    for e in report.get("errors", []):
        lines.append(f"- error in {e['what']}: {e['error']}")
    for s in report.get("skipped", []):
        lines.append(f"- skipped {s['what']}: {s['why']}")
    return "\n".join(lines) + "\n"


def _n(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--dry-run", action="store_true", help="every code path on the CPU with tiny shapes")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting measurements after this long")
    p.add_argument("--only", help="comma-separated: kernels,caches,vae,fp8,nf4,offload (default all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args.out, args.budget_s, args.dry_run)
    wanted = set((args.only or "kernels,caches,vae,fp8,nf4,offload").split(","))
    if args.dry_run:
        device, shapes = torch.device("cpu"), dry_shapes()
    elif not torch.cuda.is_available():
        check.error("setup", RuntimeError("torch sees no CUDA device (use --dry-run on a CPU)"))
        check.save()
        return 0
    else:
        device, shapes = torch.device("cuda"), full_shapes()
    check.report["settings"] = {**dataclasses.asdict(shapes), "budget_s": args.budget_s, "dtype": "bfloat16",
                                "cfg": 1.0, "batch": 1, "only": sorted(wanted)}
    with check.measure("environment") as go:
        if go:
            check.put("environment", "info", environment(device))
    from framepack.hardware import detect_hardware

    hw = detect_hardware()
    peak: dict = {"spec_tflops": spec_peak_tflops(_device_name(device)) if device.type == "cuda" else None}
    with check.measure("bf16 matmul peak") as go:
        if go:
            peak["measured_tflops"] = matmul_peak(device, shapes.matmul_n)
    check.put("peak", "measured_tflops", peak.get("measured_tflops"))
    check.put("peak", "spec_tflops", peak["spec_tflops"])

    model = inputs = None
    if wanted & {"kernels", "caches"}:
        with check.measure("build the transformer on the device") as go:
            if go:
                started = time.perf_counter()
                model = build_transformer(shapes.transformer, device, torch.bfloat16, shapes.weight_std)
                inputs = section_inputs(shapes, shapes.transformer, device, torch.bfloat16)
                check.put("transformer", "build_s", time.perf_counter() - started)
                check.put("transformer", "params", sum(p.numel() for p in model.parameters()))
                check.put("transformer", "resident_vram_gb", torch.cuda.memory_allocated(device) / GIB
                          if device.type == "cuda" else None)
    if model is not None:
        backends, not_here = attention_backends(hw)
        sdpa = next((b for b in backends if b.name == "sdpa"), None)
        flops = None
        with check.measure("FLOPs of one forward") as go:
            if go and sdpa is not None:
                install_kernel(model, sdpa)
                flops = forward_flops(model, inputs)
                check.put("peak", "forward_flops", flops)
        if "kernels" in wanted:
            measure_kernels(check, model, inputs, shapes, device, backends, not_here, flops, peak)
        if "caches" in wanted:
            measure_caches(check, model, inputs, shapes, device)
        del model, inputs
        _reset_peaks(device)
    if "vae" in wanted:
        with check.measure("vae") as go:
            if go:
                measure_vae(check, shapes, device)
        _reset_peaks(device)
    if "fp8" in wanted:
        measure_fp8(check, shapes, device)
        _reset_peaks(device)
    if "nf4" in wanted:
        measure_nf4(check, shapes, device)
        _reset_peaks(device)
    if "offload" in wanted:
        measure_offload(check, shapes, device)
    check.save()
    print((args.out / "gpu-check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
