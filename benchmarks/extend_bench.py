"""What extending a video costs next to generating the same new seconds, and
whether it stays flat as the input grows.

On the tiny test model (CPU, warm ``Pipeline``), for each variant: a
framepack video of each input length is made once, then, alternating,
``generate`` of ``--seconds`` from an image and ``generate(extend=...)`` of
the same seconds after the input are timed. Reported per row: median wall
seconds, the stages of the last run (framepack.pipeline.warm.StageTimes),
the job's peak RSS and the output's frame count. The input is decoded frame by frame, so
peak RSS should not grow with its length; the wall time grows by the decode
and copy of the input only.

    python benchmarks/extend_bench.py [--size 64x64] [--inputs 2.4,24] [--seconds 2] [--repeat 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--inputs", default="2.4,24", help="input lengths in seconds, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds added (and generated for comparison)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "extend-cpu.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    import numpy as np
    import torch
    from PIL import Image

    from framepack import Pipeline, __version__
    from framepack.models.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny", seed=0)
        image = root / "start.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        common = dict(size=args.size, steps=args.steps, seed=1, overwrite=True, overrides=['writers=["mp4"]'])
        with Pipeline(model=model, profile="cpu") as pipe:
            for variant in ("original", "f1"):
                kw = dict(common, variant=variant)
                for length in (float(x) for x in args.inputs.split(",")):
                    source = root / f"input-{variant}-{length:g}.mp4"
                    made = pipe.generate(image, "a fox", output=source, seconds=length, **kw)
                    timings = {"generate": [], "extend": []}
                    last = {}
                    for _ in range(args.repeat):
                        for what in ("generate", "extend"):
                            started = time.perf_counter()
                            if what == "generate":
                                result = pipe.generate(image, "a fox runs", output=root / "plain.mp4",
                                                       seconds=args.seconds, **kw)
                            else:
                                result = pipe.generate(None, "a fox runs", extend=source, output=root / "longer.mp4",
                                                       seconds=args.seconds, **kw)
                            timings[what].append(time.perf_counter() - started)
                            last[what] = result
                    for what, result in last.items():
                        rows.append({
                            "variant": variant, "job": what, "input_s": length if what == "extend" else None,
                            "input_frames": made.frames if what == "extend" else None,
                            "seconds_added": args.seconds, "frames_out": result.frames,
                            "wall_s_median": round(statistics.median(timings[what]), 3),
                            "wall_s_all": [round(t, 3) for t in timings[what]],
                            "stage_s": result.stage_s, "peak_ram_gb": round(result.peak_ram_gb, 3),
                        })
                        print(json.dumps(rows[-1]))

    result = {"benchmark": "video extension", "machine": platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "framepack": __version__, "model": "tiny (random weights)",
              "settings": {"size": args.size, "steps": args.steps, "seconds": args.seconds, "repeat": args.repeat,
                           "writers": ["mp4"]},
              "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)

    print(f"\n{'variant':9} {'job':9} {'input':>8} {'frames out':>10} {'wall s':>7} {'peak RSS GB':>11}")
    for r in rows:
        where = f"{r['input_s']:g} s" if r["input_s"] is not None else "-"
        print(f"{r['variant']:9} {r['job']:9} {where:>8} {r['frames_out']:>10} {r['wall_s_median']:>7.2f} "
              f"{r['peak_ram_gb']:>11.3f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
