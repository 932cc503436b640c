"""Does a longer video cost more memory, and does output time grow linearly?

Runs the tiny model (CPU) for several section counts, each in a fresh
process, and reports the process's peak RSS and the seconds spent writing
output (segments and the final join) per section. Memory must stay flat and
writer time per section constant: nothing re-encodes earlier sections and
no pixels are held beyond the cross-fade edge.

    python benchmarks/length_bench.py [--sections 2,4,8,16] [--json PATH]
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
import framepack.outputs as outputs
from framepack.assemble import assemble
from framepack.generate import generate
from framepack.hardware import HardwareInfo
from framepack.job import JobSettings
from framepack.tiny_model import make_tiny_model

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
    seconds = sections * 36 / 30  # section_count(seconds) == sections for lws 9
    out = workdir / f"len{sections}.mp4"
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(model), str(image), str(out), str(seconds), size, variant],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="2,4,8,16")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--variant", default="original", choices=("original", "f1"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "length-cpu.json")
    args = parser.parse_args()
    from PIL import Image

    from framepack.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        image = tmp / "in.png"
        Image.new("RGB", (160, 120), (90, 120, 200)).save(image)
        rows = [run_one(model, image, int(n), args.size, args.variant, tmp) for n in args.sections.split(",")]
    print(f"{'sections':>8} {'frames':>7} {'peak RSS MB':>12} {'writer s':>9} {'writer s/section':>17} {'total s':>8}")
    for r in rows:
        print(f"{r['sections']:>8} {r['frames']:>7} {r['peak_rss_mb']:>12.0f} {r['writer_s']:>9.2f} "
              f"{r['writer_s'] / r['sections']:>17.3f} {r['total_s']:>8.1f}")
    import av
    import torch

    report = {"benchmark": "length", "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
              "settings": {"size": args.size, "variant": args.variant, "steps": 1, "model": "tiny random"},
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.json.with_name(f".{args.json.name}.partial")
    tmp_json.write_text(json.dumps(report, indent=2))
    os.replace(tmp_json, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
