"""Memory benchmark (issue 4): the full-size models, for each offload policy and
weight format, on the real GPU and on emulated smaller cards.

No weights can be downloaded where it runs, so it reads a full-size random-weight folder
in the real layout (the engine loads it exactly as it loads the originals):

    framepack make-full-model /data/full            # 44 GB, a few minutes
    python benchmarks/memory_bench.py --model /data/full --mode step
    python benchmarks/memory_bench.py --model /data/full --mode whole --lengths 5,60

Modes (each configuration runs in a fresh process, so peaks are its own; a card size is
emulated with FRAMEPACK_VRAM_LIMIT_GB, i.e. ``torch.cuda.set_per_process_memory_fraction``):

* ``step``: the transformer as the engine loads it (``load_transformer``, so fp8 goes
  through the lazy loader and nf4 through bitsandbytes), placed by the offload policy,
  timed over ``--steps`` calls of one section at ``--size``: seconds per step and per
  frame, peak VRAM and RAM, ratio to the resident run, share of the bf16 matrix peak.
* ``whole``: ``framepack generate`` end to end (text encoders, image encoder, VAE,
  transformer, writer) for each length in ``--lengths`` seconds, with the profile the
  engine picks for the emulated card unless ``--policies`` / ``--formats`` override it:
  does it run, peak VRAM, peak RAM, wall time. ``--lengths 5,60`` checks that the
  peaks of a 60-second video stay within 5 % of a 5-second one.

Prints a table and writes JSON (device, versions, settings, rows) plus a PNG plot when
matplotlib is installed. ``--device cpu`` with a tiny model (``framepack
make-tiny-model``) runs the same code without a GPU (no VRAM, no caps), which is how
the test suite checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (TFLOP/s), to report the share a step reaches.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "3090": 71.0}
FRAMES_PER_SECTION = 36  # 4 * latent window 9
STEPS_PER_SECTION = 25


def step_case(model: Path, policy_name: str, fmt: str, cap_gb: float, steps: int, size: tuple[int, int], device_name: str) -> dict:
    """One transformer configuration, in this (fresh) process."""
    import torch

    from framepack.attention.processors import build_attention
    from framepack.hardware import detect_hardware, peak_memory_gb
    from framepack.models.sources import ModelSource
    from framepack.engine.planning import packed_tokens
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
    from framepack.pipeline.transformer import load_transformer

    if cap_gb > 0:
        os.environ["FRAMEPACK_VRAM_LIMIT_GB"] = str(cap_gb)
        detect_hardware()  # applies the cap before anything is allocated
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    registry = collect_backends(build_plugin_manager())
    sdpa = registry.get("attention", "sdpa").backend
    started = time.perf_counter()
    model = load_transformer(ModelSource("inverted", root=model), dtype, build_attention(sdpa, sdpa.options()), fmt, device)
    load_s = time.perf_counter() - started
    backend = registry.get("offload", policy_name).backend
    policy = backend.make_policy(backend.options(), device)
    policy.prepare({"transformer": model})
    inputs = _section_inputs(model.config, size, device, dtype)
    times, error = [], None
    try:
        with torch.inference_mode(), policy.stage("transformer"):
            for i in range(steps + 1):  # the first call warms up
                _sync(device)
                t = time.perf_counter()
                model(**inputs, return_dict=False)
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t)
    except Exception as exc:  # an out-of-memory at a small cap is a result, not a crash
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    tokens = packed_tokens(*size) + inputs["image_embeds"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    params = sum(p.numel() for p in model.parameters())
    return {"mode": "step", "policy": policy_name, "format": fmt, "cap_gb": cap_gb, "error": error, "load_s": load_s,
            "s_per_step": sorted(times)[len(times) // 2] if times else None, "step_times": times,
            "flops_per_step": 2 * params * tokens, "tokens": tokens, **peak_memory_gb()}


def _section_inputs(config, size: tuple[int, int], device, dtype) -> dict:
    """One section's packed inputs at ``size``: 9 new latent frames, 2 clean, 2 at 2x,
    16 at 4x, 256 text tokens and 729 SigLIP tokens (384 px / 14)."""
    import torch

    g = torch.Generator().manual_seed(0)
    h, w = size[0] // 8, size[1] // 8
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return dict(
        hidden_states=r(1, 16, 9, h, w), timestep=torch.tensor([900.0], device=device, dtype=dtype),
        encoder_hidden_states=r(1, 256, config.text_embed_dim),
        encoder_attention_mask=torch.ones(1, 256, dtype=torch.bool, device=device),
        pooled_projections=r(1, config.pooled_projection_dim), image_embeds=r(1, 729, config.image_proj_dim),
        guidance=torch.tensor([10000.0], device=device, dtype=dtype),
        indices_latents=torch.arange(1, 10, device=device), latents_clean=r(1, 16, 2, h, w),
        indices_latents_clean=torch.tensor([0, 10], device=device), latents_history_2x=r(1, 16, 2, h, w),
        indices_latents_history_2x=torch.tensor([11, 12], device=device), latents_history_4x=r(1, 16, 16, h, w),
        indices_latents_history_4x=torch.arange(13, 29, device=device),
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def whole_case(model: Path, policy: str, fmt: str, cap_gb: float, seconds: float, steps: int,
               size: tuple[int, int], device_name: str, workdir: Path) -> dict:
    """``framepack generate`` end to end in a child process."""
    from PIL import Image

    image = workdir / "start.png"
    if not image.exists():
        Image.new("RGB", (size[1], size[0]), (90, 120, 160)).save(image)
    output = workdir / f"{policy}-{fmt}-{cap_gb:g}-{seconds:g}.mp4"
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(model), "--image", str(image),
           "--prompt", "a boat drifts on a calm lake", "--seconds", str(seconds), "--steps", str(steps),
           "--size", f"{size[0]}x{size[1]}", "--output", str(output), "--json", "--quiet", "--no-prompt-cache"]
    if device_name == "cpu":
        cmd += ["--profile", "cpu"]
    if policy != "auto":
        cmd += ["--set", f"offload={policy}"]
    if fmt != "auto":
        cmd += ["--set", f"quantize.transformer={fmt}"]
    env = dict(os.environ)
    if cap_gb > 0:
        env["FRAMEPACK_VRAM_LIMIT_GB"] = str(cap_gb)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row = {"mode": "whole", "policy": policy, "format": fmt, "cap_gb": cap_gb, "seconds": seconds, "steps": steps,
           "wall_s": time.perf_counter() - started}
    if proc.returncode != 0:
        return {**row, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    summary = json.loads(proc.stdout)
    output.unlink(missing_ok=True)
    return {**row, "error": None, "profile": summary["profile"], "backends": summary["backends"],
            "frames": summary["frames"], "elapsed_s": summary["elapsed_s"],
            **{k: v for k, v in summary.items() if k.startswith("peak_")}}


def print_table(rows: list[dict], gpu: str) -> None:
    peak = next((v for k, v in BF16_PEAK.items() if k in gpu), None)
    steps = [r for r in rows if r["mode"] == "step"]
    if steps:
        resident = {r["format"]: r["s_per_step"] for r in steps if r["policy"] == "resident" and r["cap_gb"] == 0 and r["s_per_step"]}
        print(f"\n{'cap':>4} {'format':>6} {'policy':>16} {'s/step':>8} {'s/frame':>8} {'VRAM GB':>8} {'RAM GB':>7} {'x resident':>10} {'% bf16 peak':>11}")
        for r in steps:
            s = r["s_per_step"]
            if not s:
                print(f"{r['cap_gb']:>4g} {r['format']:>6} {r['policy']:>16}  failed: {r['error']}")
                continue
            base = resident.get(r["format"])
            share = r["flops_per_step"] / s / 1e12 / peak * 100 if peak else float("nan")
            print(f"{r['cap_gb']:>4g} {r['format']:>6} {r['policy']:>16} {s:>8.2f} {s * STEPS_PER_SECTION / FRAMES_PER_SECTION:>8.2f} "
                  f"{r.get('peak_vram_gb', 0):>8.1f} {r['peak_ram_gb']:>7.1f} {(s / base if base else float('nan')):>10.2f} {share:>11.1f}")
    whole = [r for r in rows if r["mode"] == "whole"]
    if whole:
        print(f"\n{'cap':>4} {'seconds':>7} {'profile':>12} {'offload':>16} {'VRAM GB':>8} {'RAM GB':>7} {'wall s':>7}")
        for r in whole:
            if r["error"]:
                print(f"{r['cap_gb']:>4g} {r['seconds']:>7g}  failed: {r['error'][-200:]}")
                continue
            print(f"{r['cap_gb']:>4g} {r['seconds']:>7g} {r['profile']:>12} {r['backends']['offload']:>16} "
                  f"{r.get('peak_vram_gb', 0):>8.1f} {r['peak_ram_gb']:>7.1f} {r['wall_s']:>7.0f}")


def plot(rows: list[dict], out: Path, gpu: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has everything)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for policy in sorted({r["policy"] for r in rows if r["mode"] == "step"}):
        pts = [(r.get("peak_vram_gb", 0), r["s_per_step"]) for r in rows
               if r["mode"] == "step" and r["policy"] == policy and r["s_per_step"]]
        if pts:
            ax.scatter(*zip(*pts), label=policy)
    ax.set_xlabel("peak VRAM (GB)")
    ax.set_ylabel("seconds per transformer step")
    ax.set_title(f"FramePack transformer, one section, {gpu}")
    ax.legend()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder (framepack make-full-model)")
    parser.add_argument("--mode", choices=("step", "whole", "both"), default="step")
    parser.add_argument("--caps", default="0,6,8,12,16,24", help="emulated card sizes in GB; 0 = the whole GPU")
    parser.add_argument("--policies", default=None,
                        help="offload policies (default: all for --mode step, 'auto' (the profile's) for whole)")
    parser.add_argument("--formats", default=None, help="transformer weight formats: none,fp8,nf4 (default: none,fp8 "
                        "for step; 'auto' (the profile's) for whole)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", default="640x608", help="HEIGHTxWIDTH")
    parser.add_argument("--lengths", default="5", help="video seconds for --mode whole, e.g. 5,60")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, metavar=("POLICY", "FORMAT", "CAP", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.child:
        policy, fmt, cap, device = args.child
        print(json.dumps(step_case(args.model, policy, fmt, float(cap), args.steps, size, device)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU here")
    caps = [float(c) for c in args.caps.split(",")]
    if device == "cpu" and any(caps):
        sys.exit("card sizes can only be emulated on a CUDA GPU: use --caps 0 with --device cpu")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="framepack-membench-") as work:
        for mode in (("step", "whole") if args.mode == "both" else (args.mode,)):
            policies = (args.policies or ("resident,model_swap,dynamic_swap,sequential,stream_prefetch" if mode == "step" else "auto")).split(",")
            formats = (args.formats or ("none,fp8" if mode == "step" else "auto")).split(",")
            for cap in caps:
                for fmt in formats:
                    for policy in policies:
                        if mode == "step":
                            rows.append(_run_step_child(args, policy, fmt, cap, device))
                        else:
                            for seconds in (float(s) for s in args.lengths.split(",")):
                                rows.append(whole_case(args.model, policy, fmt, cap, seconds, args.steps, size, device, Path(work)))
                        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_times"}), flush=True)
    print_table(rows, gpu)
    out = args.json or Path(__file__).parent / "results" / f"memory-{gpu.split(' (')[0].replace(' ', '_')}-{time.strftime('%Y%m%d')}.json"
    import diffusers

    report = {"benchmark": "memory", "device": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version(),
              "settings": {"model": str(args.model), "size": args.size, "steps": args.steps, "mode": args.mode,
                           "lengths": args.lengths, "weights": "random (framepack make-full-model)"},
              "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    plot(rows, out, gpu)
    print(f"wrote {out}")


def _run_step_child(args, policy: str, fmt: str, cap: float, device: str) -> dict:
    cmd = [sys.executable, __file__, "--model", str(args.model), "--steps", str(args.steps), "--size", args.size,
           "--child", policy, fmt, str(cap), device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"mode": "step", "policy": policy, "format": fmt, "cap_gb": cap, "s_per_step": None,
            "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}


if __name__ == "__main__":
    main()
