"""Peak memory of one VAE decode, measured, next to the planner's estimate (issue 10).

At 2048x2048 the plan said 7.5 GB and diffusers' AutoencoderKLHunyuanVideo then
asked for 107 GB. This decodes random latents with the VAE backend the engine uses
(plugins/encoders/hunyuan_vae.py, float32 pixels out) at several sizes and latent
frame counts, with and without tiling, and reports the peak against
``framepack.engine.vae_memory.decode_peak_bytes``.

    python benchmarks/vae_decode_bench.py [--vaes tiny,medium,full] [--quick] [--json PATH]
    python benchmarks/vae_decode_bench.py --resume   # measure only the cases missing from --json
    python benchmarks/vae_decode_bench.py --replan   # after changing the estimate: new planned column

VAEs, all AutoencoderKLHunyuanVideo with random weights (the weights do not change
the memory): ``tiny`` is the test model's (8 channels, framepack.models.tiny), ``full``
the real config (128/256/512/512 channels, 2 layers per block, 246M parameters,
framepack.models.full.vae_config), ``medium`` the real layout at 32/64/128/128
channels. The full VAE is slow on a CPU (a 17-frame 64x64 decode took 38 s on 2
shared cores), so its tiled cases use 64-pixel tiles (stride 48): the tiling
code path is the same as with the default 256-pixel tiles.

Each case runs in a fresh process. Peak = the kernel's RSS high-water mark during
the decode (reset through /proc/self/clear_refs just before it) minus the RSS just
before, with the heap trimmed first and glibc's mmap threshold fixed as the section
loop fixes it (framepack.models.heap), so freed buffers go back to the OS at once. Linux only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20
HERE = Path(__file__).resolve().parent

# (vae, latent frames, height, width, tiling, tile size in pixels or None for the default)
FULL_CASES = [
    ("tiny", t, s, s, False, None) for t in (1, 2, 5) for s in (64, 128, 256)
] + [
    ("tiny", 5, 384, 384, False, None), ("tiny", 5, 512, 512, False, None), ("tiny", 10, 256, 256, False, None),
    ("tiny", 19, 128, 128, False, None), ("tiny", 19, 256, 256, False, None), ("tiny", 5, 320, 448, False, None),
    ("tiny", 5, 512, 512, True, None), ("tiny", 5, 256, 256, True, 64),
    ("medium", 2, 128, 128, False, None), ("medium", 5, 128, 128, False, None), ("medium", 5, 192, 256, False, None),
    ("medium", 19, 128, 128, False, None), ("medium", 5, 256, 256, True, 128),
    ("full", 1, 64, 64, False, None), ("full", 2, 64, 64, False, None), ("full", 1, 128, 128, False, None),
    ("full", 2, 96, 128, False, None), ("full", 5, 64, 64, False, None), ("full", 2, 128, 128, True, 64),
]
QUICK_CASES = [c for c in FULL_CASES if c[0] == "tiny" and c[2] <= 256 and not c[4]]
QUICK_CASES.append(("medium", 2, 128, 128, False, None))

WORKER = r'''
import json, sys, time
import torch
from framepack.models.heap import fixed_mmap_threshold, release_free_heap
from plugins.encoders.hunyuan_vae import HunyuanVae

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

case = json.loads(sys.argv[1])
torch.manual_seed(0)
from diffusers import AutoencoderKLHunyuanVideo
if case["vae"] == "tiny":
    from framepack.models.tiny import _build_vae
    model = _build_vae()
else:
    from framepack.models.full import vae_config
    config = vae_config()
    if case["vae"] == "medium":
        config["block_out_channels"] = (32, 64, 128, 128)
    model = AutoencoderKLHunyuanVideo(**config)
vae = HunyuanVae(model.eval())
sr = 8
latents = torch.randn(1, 16, case["t"], case["h"] // sr, case["w"] // sr)
vae.decode(torch.randn(1, 16, 2, 2, 2))  # one-time allocations (thread pools, oneDNN's caches)
vae.set_tiling(case["tiling"])
if case["tiling"] and case["tile"]:
    tile = case["tile"]
    model.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                        tile_sample_stride_height=tile * 3 // 4, tile_sample_stride_width=tile * 3 // 4)
release_free_heap()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
with torch.no_grad(), fixed_mmap_threshold():
    pixels = vae.decode(latents)
seconds = time.perf_counter() - start
peak = status("VmHWM") - before
print(json.dumps({"peak_bytes": peak, "seconds": seconds, "out_shape": list(pixels.shape),
                  "tiles": [model.tile_sample_min_height, model.tile_sample_min_width, model.tile_sample_min_num_frames,
                            model.tile_sample_stride_height, model.tile_sample_stride_width,
                            model.tile_sample_stride_num_frames]}))
'''


def geometry(name: str, tile: int | None):
    from framepack.models.full import vae_config
    from framepack.engine.vae_memory import VaeGeometry

    config = vae_config()
    if name == "tiny":
        config.update(block_out_channels=(8, 8, 8, 8), layers_per_block=1)
    elif name == "medium":
        config["block_out_channels"] = (32, 64, 128, 128)
    g = VaeGeometry.from_config(config)
    if tile:
        g = VaeGeometry(**{**g.__dict__, "tile_sample_min_height": tile, "tile_sample_min_width": tile,
                           "tile_sample_stride_height": tile * 3 // 4, "tile_sample_stride_width": tile * 3 // 4})
    return g


def run_case(case: tuple, timeout: float = 600) -> dict:
    vae, t, h, w, tiling, tile = case
    arg = json.dumps({"vae": vae, "t": t, "h": h, "w": w, "tiling": tiling, "tile": tile})
    proc = subprocess.run([sys.executable, "-c", WORKER, arg], capture_output=True, text=True, timeout=timeout,
                          cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vaes", default="tiny,medium,full")
    parser.add_argument("--quick", action="store_true", help="tiny VAE untiled up to 256 px and one medium case")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "vae-decode-cpu.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already measured in --json and measure only the others")
    parser.add_argument("--replan", action="store_true",
                        help="measure nothing: recompute the planned column of --json (after changing the estimate)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from framepack.engine.vae_memory import decode_peak_bytes

    def write(rows: list[dict]) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_report(rows, notes), indent=2) + "\n")

    def key(vae, t, h, w, tiling, tile):
        return (vae, t, h, w, tiling, tile or 256)

    def row_key(r):
        return key(r["vae"], r["latent_frames"], r["height"], r["width"], r["tiling"], r["tile_px"])

    previous = json.loads(args.json.read_text()) if (args.resume or args.replan) else {"results": [], "settings": {}}
    old, notes = previous["results"], previous["settings"].get("notes")
    done = {row_key(r): r for r in old}
    wanted = set(args.vaes.split(","))
    cases = [c for c in (QUICK_CASES if args.quick else FULL_CASES) if c[0] in wanted]
    if args.replan:
        cases = [(r["vae"], r["latent_frames"], r["height"], r["width"], r["tiling"],
                  None if r["tile_px"] == 256 else r["tile_px"]) for r in old]
    rows = []
    print(f"{'vae':7} {'T':>3} {'size':>9} {'tiling':>7} {'measured MB':>12} {'planned MB':>11} {'error':>7} {'s':>6}")
    started = time.perf_counter()
    for case in cases:
        vae, t, h, w, tiling, tile = case
        if key(*case) in done:
            row = dict(done.pop(key(*case)))
        else:
            measured = run_case(case)
            row = {"vae": vae, "latent_frames": t, "height": h, "width": w, "tiling": tiling,
                   "tile_px": tile or 256, "measured_peak_mb": round(measured["peak_bytes"] / MB, 1),
                   "seconds": round(measured["seconds"], 2), "out_shape": measured["out_shape"],
                   "diffusers_tiles": measured["tiles"]}
        planned = decode_peak_bytes(geometry(vae, tile), t, h, w, 4, tiling, device="cpu") / MB
        row.update(planned_peak_mb=round(planned, 1), error=round(planned / row["measured_peak_mb"] - 1, 3))
        rows.append(row)
        write(rows + list(done.values()))  # after every case, so --resume can pick up after a kill
        print(f"{vae:7} {t:>3} {f'{h}x{w}':>9} {('on' + (f' {tile}' if tile else '')) if tiling else 'off':>7} "
              f"{row['measured_peak_mb']:>12.1f} {planned:>11.1f} {row['error']:>+7.0%} {row['seconds']:>6.1f}",
              flush=True)
    rows += done.values()  # measured before, not in this case list
    write(rows)
    worst = max(abs(r["error"]) for r in rows)
    print(f"{len(rows)} cases in {time.perf_counter() - started:.0f} s; largest error {worst:.0%}; wrote {args.json}")
    return 0


def _report(rows: list[dict], notes: str | None) -> dict:
    import diffusers
    import torch

    return {
        "benchmark": "vae_decode", "device": f"cpu ({platform.machine()})", "cpus": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "libc": " ".join(platform.libc_ver()), "date": time.strftime("%Y-%m-%d"),
        "settings": {"dtype": "float32", "batch": 1, "weights": "random", "backend": "plugins/encoders/hunyuan_vae.py",
                     "peak": "VmHWM - VmRSS around vae.decode in a fresh process, heap trimmed, "
                             "mmap threshold fixed at 128 KiB (framepack.models.heap)",
                     "planned": "framepack.engine.vae_memory.decode_peak_bytes(device='cpu'), "
                                "1.06 x the tensors it counts + 4 MiB (FIT_SCALE, FIT_BYTES)",
                     **({"notes": notes} if notes else {})},
        "largest_error": max((abs(r["error"]) for r in rows if "error" in r), default=0.0), "results": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
