"""benchmarks/memory_bench.py runs its real code path on CPU with the tiny model, so a
GPU run does not find its bugs first. (The numbers mean nothing here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_bench.py"


def test_memory_bench_step_and_whole_modes_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_model), "--device", "cpu", "--caps", "0", "--size", "64x64",
           "--steps", "1", "--mode", "both", "--policies", "resident,sequential", "--formats", "none,fp8",
           "--lengths", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["settings"]["size"] == "64x64"
    steps = [r for r in report["results"] if r["mode"] == "step"]
    whole = [r for r in report["results"] if r["mode"] == "whole"]
    assert {(r["policy"], r["format"]) for r in steps} == {(p, f) for p in ("resident", "sequential") for f in ("none", "fp8")}
    assert all(r["error"] is None and r["s_per_step"] > 0 and r["peak_ram_gb"] > 0.1 for r in steps)
    assert len(whole) == 4 and all(r["error"] is None and r["frames"] == 37 and r["profile"] == "cpu" for r in whole)
    assert {r["backends"]["offload"] for r in whole} == {"resident", "sequential"}
    assert "s/step" in proc.stdout and "wrote" in proc.stdout


def test_memory_bench_refuses_caps_without_cuda(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model), "--device", "cpu", "--caps", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "only be emulated on a CUDA GPU" in proc.stderr
