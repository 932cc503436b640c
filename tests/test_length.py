"""Longer videos: flat peak memory and output time linear in length."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "length_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("length_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_flat_and_writer_time_linear(tiny_model, test_image, tmp_path):
    bench = load_bench()
    short = bench.run_one(tiny_model, test_image, 2, "64x64", "original", tmp_path)
    long = bench.run_one(tiny_model, test_image, 10, "64x64", "original", tmp_path)
    assert (short["sections"], long["sections"]) == (2, 10)
    assert long["frames"] == 36 * 10 + 1
    # Generous bounds (exact figures: benchmarks/results/length-cpu.json):
    # five times the video may not cost more than a little RSS ...
    assert long["peak_rss_mb"] - short["peak_rss_mb"] < 150, (short, long)
    # ... and writing it costs about five times as long, not 25 times.
    assert long["writer_s"] / long["sections"] < 3 * short["writer_s"] / short["sections"] + 0.05, (short, long)
