"""Memory benchmark (issue 4): the full-size transformer with random weights,
one section's steps at 640x608, for each offload policy and weight format, on
the real GPU and on emulated smaller cards.

Each configuration runs in a fresh process (peak RAM is per process), with
``torch.cuda.set_per_process_memory_fraction`` emulating the card size. It
reports seconds per step and per frame, peak VRAM, peak RAM, the ratio to the
resident run, and the ratio to the bf16 matrix peak, prints a table and
writes JSON (plus a PNG plot when matplotlib is installed).

    python benchmarks/memory_bench.py [--caps 0,6,8,12,16,24] [--policies ...] [--formats bf16,fp8] [--steps 3]

Needs CUDA and about 30 GB of RAM for the random weights (26 GB in bf16).
NOTE: written without a GPU at hand; not run yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (TFLOP/s) to report the share reached.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0, "3090": 71.0}

CHILD = r'''
import json, resource, sys, time
import torch
from accelerate import init_empty_weights
from diffusers import HunyuanVideoFramepackTransformer3DModel
from framepack.attention import build_attention, install_attention
from framepack.plugins import build_plugin_manager, collect_backends
from framepack.planning import packed_tokens
from framepack.quantize import apply_fp8_storage
from framepack.transformer import keep_output_head_fp32

policy_name, fmt, cap_gb, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
device = torch.device("cuda")
total = torch.cuda.get_device_properties(0).total_memory
if cap_gb > 0:
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total))
registry = collect_backends(build_plugin_manager())
with init_empty_weights():
    model = HunyuanVideoFramepackTransformer3DModel(has_image_proj=True, has_clean_x_embedder=True, image_proj_dim=1152)
model = model.to_empty(device="cpu").to(torch.bfloat16)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02, generator=g)
model.eval().requires_grad_(False)
sdpa = registry.get("attention", "sdpa").backend
install_attention(model, build_attention(sdpa, sdpa.options()))
keep_output_head_fp32(model)
if fmt == "fp8":
    apply_fp8_storage(model, torch.bfloat16)
backend = registry.get("offload", policy_name).backend
policy = backend.make_policy(backend.options(), device)
policy.prepare({"transformer": model})
h, w, lws = 80, 76, 9
r = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)
inputs = dict(hidden_states=r(1, 16, lws, h, w), timestep=torch.tensor([900.0], device=device).bfloat16(),
              encoder_hidden_states=r(1, 256, 4096), encoder_attention_mask=torch.ones(1, 256, dtype=torch.bool, device=device),
              pooled_projections=r(1, 768), image_embeds=r(1, 729, 1152), guidance=torch.tensor([10000.0], device=device).bfloat16(),
              indices_latents=torch.arange(1, 10, device=device), latents_clean=r(1, 16, 2, h, w),
              indices_latents_clean=torch.tensor([0, 10], device=device), latents_history_2x=r(1, 16, 2, h, w),
              indices_latents_history_2x=torch.tensor([11, 12], device=device), latents_history_4x=r(1, 16, 16, h, w),
              indices_latents_history_4x=torch.arange(13, 29, device=device))
times = []
try:
    with torch.inference_mode(), policy.stage("transformer"):
        for i in range(steps + 1):  # the first call warms up
            torch.cuda.synchronize(); t = time.perf_counter()
            model(**inputs, return_dict=False)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {str(exc)[:200]}"
tokens = packed_tokens(640, 608) + 729 + 256
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"policy": policy_name, "format": fmt, "cap_gb": cap_gb, "error": error,
                  "s_per_step": sorted(times)[len(times) // 2] if times else None,
                  "flops_per_step": 2 * params * tokens,
                  "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_ram_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", default="0,6,8,12,16,24", help="emulated card sizes in GB; 0 = the whole GPU")
    parser.add_argument("--policies", default="resident,model_swap,dynamic_swap,sequential,stream_prefetch")
    parser.add_argument("--formats", default="bf16,fp8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("memory_bench needs CUDA (it measures VRAM); see benchmarks/README.md")
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for cap in (float(c) for c in args.caps.split(",")):
        for fmt in args.formats.split(","):
            for policy in args.policies.split(","):
                proc = subprocess.run([sys.executable, "-c", CHILD, policy, fmt, str(cap), str(args.steps)],
                                      capture_output=True, text=True)
                lines = proc.stdout.strip().splitlines()
                row = json.loads(lines[-1]) if lines else {"policy": policy, "format": fmt, "cap_gb": cap,
                                                            "error": proc.stderr.strip()[-300:]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    peak = next((v for k, v in BF16_PEAK.items() if k in gpu), None)
    resident = {(r["format"], r["cap_gb"]): r["s_per_step"] for r in rows if r["policy"] == "resident" and r["s_per_step"]}
    print(f"\n{'cap':>4} {'format':>6} {'policy':>16} {'s/step':>8} {'s/frame':>8} {'VRAM GB':>8} {'RAM GB':>7} {'x resident':>10} {'% bf16 peak':>11}")
    for r in rows:
        s = r.get("s_per_step")
        base = resident.get((r["format"], 0.0))
        share = (r["flops_per_step"] / s / 1e12 / peak * 100) if s and peak else None
        # 25 steps per section of 36 new frames
        print(f"{r['cap_gb']:>4g} {r['format']:>6} {r['policy']:>16} "
              + (f"{s:>8.2f} {s * 25 / 36:>8.2f} {r['peak_vram_gb']:>8.1f} {r['peak_ram_gb']:>7.1f} "
                 f"{(s / base if base else float('nan')):>10.2f} {(share or float('nan')):>11.1f}" if s else f"  failed: {r.get('error')}"))
    out = args.json or Path(__file__).parent / "results" / f"memory-{gpu.replace(' ', '_')}-{time.strftime('%Y%m%d')}.json"
    report = {"benchmark": "memory", "device": gpu, "torch": torch.__version__, "python": platform.python_version(),
              "settings": {"size": "640x608", "steps": args.steps, "weights": "random"}, "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for policy in args.policies.split(","):
            pts = [(r["peak_vram_gb"], r["s_per_step"]) for r in rows if r["policy"] == policy and r.get("s_per_step")]
            if pts:
                ax.scatter(*zip(*pts), label=policy)
        ax.set_xlabel("peak VRAM (GB)")
        ax.set_ylabel("seconds per step")
        ax.set_title(f"FramePack transformer, 640x608, {gpu}")
        ax.legend()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has everything)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
