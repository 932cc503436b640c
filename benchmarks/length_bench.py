"""Does a longer video cost more memory, and does output time grow linearly?

Runs the tiny model (CPU) for several section counts and video lengths, each
in a fresh process, and reports the process's peak RSS and the seconds spent
writing output (segments and the final join) per section. Memory must stay
flat and writer time per section constant: nothing re-encodes earlier
sections and no pixels are held beyond the cross-fade edge. The goal it
checks: a 60-second video's peak RSS within 5 % of a 5-second one's.

    python benchmarks/length_bench.py [--sections 2,4,8,16] [--seconds 5,60] [--size 128x128] [--json PATH]
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

DRIVER = r'''
import json, resource, sys, time
from pathlib import Path
import framepack.output.outputs as outputs
from framepack.engine.assemble import assemble
from framepack.pipeline.generate import generate
from framepack.hardware import HardwareInfo
from framepack.pipeline.settings import JobSettings
from framepack.models.tiny import make_tiny_model

spent = [0.0]
def timed(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t
    return wrapper
outputs.SegmentOutputs.add = timed(outputs.SegmentOutputs.add)
outputs.SegmentOutputs.join = timed(outputs.SegmentOutputs.join)

model, image, out, seconds, size, variant = sys.argv[1:7]
hw = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)
engine = assemble(profile_name="cpu", hardware=hw, include_user_files=False)
h, w = (int(x) for x in size.split("x"))
settings = JobSettings(image=Path(image), prompt="waves", output=Path(out), model=model, seconds=float(seconds),
                       steps=1, size=(h, w), variant=variant)
t = time.perf_counter()
result = generate(settings, engine)
print(json.dumps({"sections": result.sections, "frames": result.frames, "writer_s": spent[0],
                  "total_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run_one(model: Path, image: Path, sections: int, size: str, variant: str, workdir: Path) -> dict:
    """A job of exactly ``sections`` sections (36 frames each at lws 9)."""
    return run_seconds(model, image, sections * 36 / 30, size, variant, workdir)  # section_count() == sections


def run_seconds(model: Path, image: Path, seconds: float, size: str, variant: str, workdir: Path) -> dict:
    """A job of ``seconds`` of video in a fresh process, so its peak RSS is its own."""
    out = workdir / f"len-{seconds:g}s.mp4"
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(model), str(image), str(out), str(seconds), size, variant],
                          capture_output=True, text=True, check=True)
    return {"seconds": round(seconds, 3), **json.loads(proc.stdout.strip().splitlines()[-1])}


def peak_ratio(rows: list[dict], long: float, short: float) -> float | None:
    """Peak RSS of the ``long`` video over the ``short`` one's (None unless both ran)."""
    peak = {r["seconds"]: r["peak_rss_mb"] for r in rows}
    if long not in peak or short not in peak:
        return None
    return peak[long] / peak[short]


def print_table(rows: list[dict]) -> None:
    print(f"{'seconds':>8} {'sections':>8} {'frames':>7} {'peak RSS MB':>12} {'writer s':>9} "
          f"{'writer s/section':>17} {'total s':>8}")
    for r in rows:
        print(f"{r['seconds']:>8g} {r['sections']:>8} {r['frames']:>7} {r['peak_rss_mb']:>12.0f} {r['writer_s']:>9.2f} "
              f"{r['writer_s'] / r['sections']:>17.3f} {r['total_s']:>8.1f}")


def versions() -> dict[str, str]:
    import av
    import diffusers
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
            "diffusers": diffusers.__version__, "libc": " ".join(platform.libc_ver()) or "unknown"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="2,4,8,16", help="section counts to run ('' for none)")
    parser.add_argument("--seconds", default="5,60", help="video lengths to run ('' for none); 5 and 60 give the ratio")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--variant", default="original", choices=("original", "f1"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "length-cpu.json")
    args = parser.parse_args()
    from PIL import Image

    from framepack.models.tiny import make_tiny_model

    counts = [int(n) for n in args.sections.split(",") if n]
    lengths = [float(s) for s in args.seconds.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        image = tmp / "in.png"
        Image.new("RGB", (160, 120), (90, 120, 200)).save(image)
        rows = [run_one(model, image, n, args.size, args.variant, tmp) for n in counts]
        rows += [run_seconds(model, image, s, args.size, args.variant, tmp) for s in lengths]
    print_table(rows)
    ratio = peak_ratio(rows, 60.0, 5.0)
    if ratio is not None:
        print(f"peak RSS 60 s / 5 s: {ratio:.3f} (goal: at most 1.05)")

    report = {"benchmark": "length", "device": f"cpu ({platform.processor() or platform.machine()})",
              "cpus": os.cpu_count(), **versions(),
              "settings": {"size": args.size, "variant": args.variant, "steps": 1, "model": "tiny random",
                           "fps": 30, "latent_window_size": 9, "sections": counts, "seconds": lengths,
                           "peak_rss": "ru_maxrss of a fresh process per row"},
              "date": time.strftime("%Y-%m-%d"), "results": rows, "peak_rss_ratio_60s_5s": ratio}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(f".{args.json.name}.partial")
    tmp_json.write_text(json.dumps(report, indent=2))
    os.replace(tmp_json, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
