"""Do jobs drift when one process runs many? Six jobs in one warm Pipeline.

Users of other tools see the second run in a process slower than the first,
or RAM creeping up until the machine swaps. This runs JOBS jobs on the tiny
model (CPU) in one ``framepack.Pipeline`` and records, per job: wall time,
seconds per stage, the job's own peak RSS (sampled, framepack.hardware.
PeakMemory), the parts it loaded, and whether a repeated job's latents are
bit-identical to its first run. The goals: job 6's peak RSS within 5 % of
job 2's, its time within 15 % of the median of jobs 2-6, and after close()
RSS back within 5 % of before the pipeline was built.

    python benchmarks/repeat_bench.py [--jobs 6] [--size 64x64] [--steps 25] [--seconds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "repeat-cpu.json")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    import framepack
    from framepack import Pipeline
    from framepack.hardware import PeakMemory
    from framepack.models.heap import release_free_heap
    from framepack.models.tiny import make_tiny_model

    def rss_gb() -> float:
        gc.collect()
        release_free_heap()
        return PeakMemory.rss_bytes() / 2**30

    work = Path(tempfile.mkdtemp(prefix="framepack-repeat-"))
    model = make_tiny_model(work / "tiny")
    image = work / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (190, 200, 3), dtype=np.uint8)).save(image)
    # Warm the libraries in a throwaway pipeline so "before" is the process, not the imports.
    with Pipeline(model=model, profile="cpu", keep_loaded="none") as warmup:
        warmup.generate(image, "warm up", output=work / "warmup.mp4", size="64x64", steps=1, seconds=1)
    before = rss_gb()
    rows = []
    first = None
    pipe = Pipeline(model=model, profile="cpu", overrides=["cache=none"])
    for index in range(args.jobs):
        prompt = "a wave" if index % 2 == 0 else "a wave rolls in"  # repeated jobs and a second prompt
        started = time.perf_counter()
        result = pipe.generate(image, prompt, output=work / f"job{index}.mp4", size=args.size, steps=args.steps,
                               seconds=args.seconds, seed=7)
        wall = time.perf_counter() - started
        same = None
        if index == 0:
            first = result.latents
        elif prompt == "a wave":
            same = bool(torch.equal(result.latents, first))
        rows.append({"job": index + 1, "prompt": prompt, "wall_s": round(wall, 3), "stage_s": result.stage_s,
                     "peak_rss_gb": round(result.peak_ram_gb, 4), "loaded": result.loaded,
                     "latents_identical_to_job_1": same})
    held = rss_gb()
    pipe.close()
    after = rss_gb()

    later = [r["wall_s"] for r in rows[1:]]
    summary = {
        "job6_peak_over_job2": round(rows[-1]["peak_rss_gb"] / rows[1]["peak_rss_gb"], 4),
        "job6_time_over_median_2_6": round(rows[-1]["wall_s"] / statistics.median(later), 4),
        "rss_before_gb": round(before, 4), "rss_held_gb": round(held, 4), "rss_after_close_gb": round(after, 4),
        "after_close_over_before": round(after / before, 4),
        "repeats_bit_identical": all(r["latents_identical_to_job_1"] for r in rows if r["latents_identical_to_job_1"]
                                     is not None),
    }
    print(f"{'job':>3} {'wall s':>8} {'peak RSS GB':>12}  loaded")
    for r in rows:
        print(f"{r['job']:>3} {r['wall_s']:>8.2f} {r['peak_rss_gb']:>12.3f}  {', '.join(r['loaded']) or '-'}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    payload = {
        "benchmark": "repeat_bench", "device": "cpu", "machine": platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "framepack": framepack.__version__, "cpus": __import__("os").cpu_count(),
        "settings": {"jobs": args.jobs, "size": args.size, "steps": args.steps, "seconds": args.seconds,
                     "profile": "cpu", "cache": "none", "model": "tiny (framepack make-tiny-model)"},
        "jobs": rows, "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
