"""Time every available attention kernel on FramePack's real attention problem.

    python benchmarks/attention_bench.py [--json PATH] [--kernels sdpa,flash,...]
        [--seq N] [--dtype bfloat16] [--device cuda|cpu] [--repeat N]
        [--transformer-step] [--step-repeat N]

One call: B 1, H 24, D 128 and L = 18,485 (the packed context at 640x608:
17,500 image tokens + 729 SigLIP tokens + 256 text tokens) unless --seq is
given. Each kernel is warmed up (flex compiles then), then timed --repeat
times; the median is reported with TFLOP/s (4 * B * H * L^2 * D flops) and
the error against float32 sdpa on the same inputs.

--transformer-step (CUDA only) builds the full 13B FramePack transformer
with random bf16 weights and times one forward at 640x608 with each kernel
installed the way the engine installs it.

Kernels come from the real plugin manager, so third-party ones are measured
too. Results go to a table and to JSON (default
benchmarks/results/attention-<device>-<date>.json), written atomically.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 24, 128
# The full-size FramePack transformer (HunyuanVideo 13B with FramePack's
# image projection and clean-latent embedders).
TRANSFORMER_CONFIG = dict(
    num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=20, num_single_layers=40,
    num_refiner_layers=2, text_embed_dim=4096, pooled_projection_dim=768, image_proj_dim=1152,
    has_image_proj=True, has_clean_x_embedder=True, guidance_embeds=True, rope_axes_dim=(16, 56, 56),
)  # fmt: skip
HEIGHT, WIDTH, WINDOW = 640, 608, 9  # the bucket a square image lands in; latent window 9
IMAGE_TOKENS, TEXT_TOKENS = 729, 256  # SigLIP 27x27; Llama prompt padded/cropped to 256


def packed_length(height: int = HEIGHT, width: int = WIDTH, window: int = WINDOW) -> int:
    """Tokens one transformer call attends over (batch 1, full 256-token
    prompt): 18,485 at 640x608."""
    from framepack.engine.planning import packed_tokens

    return packed_tokens(height, width, window) + IMAGE_TOKENS + TEXT_TOKENS


def load_backends():
    """The attention backends of the real plugin manager (built-ins and any
    third-party kernels installed)."""
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends

    return collect_backends(build_plugin_manager())


def timed(fn, repeat: int, device: torch.device) -> list[float]:
    """Seconds per call of fn(), `repeat` times, after one warm-up call."""
    fn()  # warm-up: compilation, autotuning, allocator
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def bench_kernel(backend, q, k, v, ref, repeat: int, device: torch.device) -> dict:
    """One attention call, (B, L, H, D) in and out, no mask."""
    kernel = backend.make_kernel(backend.options())
    out = kernel(q, k, v, None)
    diff = out.float() - ref
    b, length, heads, dim = q.shape
    times = timed(lambda: kernel(q, k, v, None), repeat, device)
    seconds = statistics.median(times)
    return {
        "ms_per_call": seconds * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "tflops": 4 * b * heads * length**2 * dim / seconds / 1e12,
        "rel_l2": float(diff.norm() / ref.norm()),
        "max_abs": float(diff.abs().max()),
    }


def build_transformer(device: torch.device, dtype: torch.dtype, config: dict = TRANSFORMER_CONFIG):
    """The 13B transformer with small random weights, built on `meta` so the
    float32 copy (52 GB) never exists: only the bf16 weights (26 GB) do."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.models.full import random_module

    return random_module(HunyuanVideoFramepackTransformer3DModel, config, device, dtype)


def transformer_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    """One section's inputs at 640x608, batch 1, F1 layout (the token count is the same for both variants)."""
    from framepack.pipeline.sections import f1_layout

    g = torch.Generator(device).manual_seed(0)
    h, w = HEIGHT // 8, WIDTH // 8

    def r(*shape):
        return torch.randn(shape, generator=g, device=device).to(dtype)

    layout = f1_layout(WINDOW)
    return dict(
        hidden_states=r(1, 16, WINDOW, h, w),
        timestep=torch.tensor([900.0], device=device),
        encoder_hidden_states=r(1, TEXT_TOKENS, 4096),
        encoder_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device),
        pooled_projections=r(1, 768),
        image_embeds=r(1, IMAGE_TOKENS, 1152),
        guidance=torch.tensor([10000.0], device=device).to(dtype),
        indices_latents=layout.latent.to(device),
        latents_clean=r(1, 16, 2, h, w),
        indices_latents_clean=layout.clean.to(device),
        latents_history_2x=r(1, 16, 2, h, w),
        indices_latents_history_2x=layout.clean_2x.to(device),
        latents_history_4x=r(1, 16, 16, h, w),
        indices_latents_history_4x=layout.clean_4x.to(device),
    )


def transformer_steps(backends: list, repeat: int, device: torch.device, dtype: torch.dtype) -> tuple[dict, str | None]:
    """{kernel: {"step_s", "peak_vram_gb"} or {"step_error"}}, or a reason it did not run."""
    if device.type != "cuda":
        return {}, "--transformer-step needs CUDA (the 13B model in bf16 is 26 GB)"
    from framepack.attention.processors import build_attention, install_attention

    free, _ = torch.cuda.mem_get_info()
    need = 26 + 8  # weights + activations at 18.5k tokens, GB (rough)
    if free / 2**30 < need:
        return {}, f"--transformer-step needs about {need} GB free VRAM, {free / 2**30:.1f} GB free"
    model = build_transformer(device, dtype)
    inputs = transformer_inputs(device, dtype)
    results = {}
    for backend in backends:
        try:
            install_attention(model, build_attention(backend, backend.options()))
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                times = timed(functools.partial(model, **inputs, return_dict=False), repeat, device)
            results[backend.name] = {
                "step_s": statistics.median(times),
                "step_times_s": times,
                "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30,
            }
        except Exception as exc:  # one kernel failing must not lose the others' numbers
            results[backend.name] = {"step_error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return results, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise


def fmt(value, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    head = f"{'kernel':<10} {'ms/call':>9} {'TFLOP/s':>8} {'rel err':>9} {'max abs':>9} {'step s':>7} {'peak GB':>8}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        note = r.get("reason") or r.get("step_error") or ""
        print(
            f"{r['kernel']:<10} {fmt(r.get('ms_per_call'), '9.2f')} {fmt(r.get('tflops'), '8.2f')}"
            f" {fmt(r.get('rel_l2'), '9.2e')} {fmt(r.get('max_abs'), '9.2e')} {fmt(r.get('step_s'), '7.3f')}"
            f" {fmt(r.get('peak_vram_gb'), '8.1f')}  {note}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="where to write results (default benchmarks/results/attention-<device>-<date>.json)")
    p.add_argument("--kernels", help="comma-separated names (default: every registered attention backend)")
    p.add_argument("--seq", type=int, help=f"sequence length (default {packed_length()}, the real 640x608 packing)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present, else cpu")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per kernel after one warm-up (median reported)")
    p.add_argument("--transformer-step", action="store_true", help="also time one full 13B transformer forward (CUDA)")
    p.add_argument("--step-repeat", type=int, default=3, help="timed forwards per kernel with --transformer-step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from framepack.hardware import detect_hardware

    hw = detect_hardware()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu" and hw.device != "cpu":
        hw = dataclasses.replace(hw, device="cpu", gpu_name=None, compute_capability=None)  # judge kernels for the CPU
    dtype = getattr(torch, args.dtype)
    length = args.seq or packed_length()

    registry = load_backends()
    names = args.kernels.split(",") if args.kernels else sorted(registry.names("attention"), key=lambda n: (n != "sdpa", n))
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn((1, length, HEADS, HEAD_DIM), generator=g, device=device).to(dtype) for _ in range(3))
    with torch.inference_mode():
        # float32 reference on the same (rounded) inputs: (B, H, L, D) for sdpa
        ref = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    print(f"device: {device_name(device)} ({device.type}); torch {torch.__version__}; {args.dtype}; "
          f"B 1, H {HEADS}, D {HEAD_DIM}, L {length}; median of {args.repeat}")  # fmt: skip
    rows, runnable = [], []
    for name in names:
        entry = registry.get("attention", name)
        row = {"kernel": name}
        rows.append(row)
        if entry is None:
            row.update(status="skipped", reason="not registered (plugin may not be installed)")
            continue
        backend = entry.backend
        reason = backend.unavailable_reason(hw)
        if reason:
            row.update(status="skipped", reason=reason)
            continue
        try:
            with torch.inference_mode():
                row.update(bench_kernel(backend, q, k, v, ref, args.repeat, device), status="ok")
            runnable.append(backend)
        except Exception as exc:
            row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        print(f"  {name}: {row.get('status')}", flush=True)

    step_note = None
    if args.transformer_step:
        del q, k, v, ref
        steps, step_note = transformer_steps(runnable, args.step_repeat, device, dtype)
        for row in rows:
            row.update(steps.get(row["kernel"], {}))
        if step_note:
            print(f"transformer step skipped: {step_note}")

    print()
    print_table(rows)
    import diffusers

    import framepack

    data = {
        "benchmark": "attention",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device), "torch_threads": torch.get_num_threads(),
                   "compute_capability": list(hw.compute_capability) if hw.compute_capability else None},
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "framepack": getattr(framepack, "__version__", ""),
            "kernels": {r.backend.name: r.backend.version() for r in registry.items("attention")},
        },
        "settings": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "seq": length, "seq_is_real_packing": args.seq is None,
                     "dtype": args.dtype, "repeat": args.repeat, "transformer_step": args.transformer_step,
                     "step_repeat": args.step_repeat, "transformer_step_skipped": step_note,
                     "flops_per_call": 4 * HEADS * length**2 * HEAD_DIM, "reference": "sdpa float32 on the same inputs"},
        "results": rows,
    }  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") if device.type == "cuda" else "cpu"
    path = args.json or Path(__file__).resolve().parent / "results" / f"attention-{slug}-{dt.date.today():%Y%m%d}.json"
    write_json_atomic(path, data)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
