"""System-RAM benchmark (issue 4): load the full-size models through the engine's own
loading code and measure peak and resident RAM, per weight format, on any machine.

It needs a full-size model folder; with no weights to download, write one with random
weights in the real layout (44 GB of disk, about 10 minutes):

    framepack make-full-model /data/framepack-full
    python benchmarks/ram_bench.py --model /data/framepack-full [--cases ...] [--json PATH]

Each case runs in a fresh process, so ``ru_maxrss`` is that case's own peak. Cases:

* ``transformer:bf16`` / ``transformer:fp8`` - the 13B transformer as the engine loads it
  (``framepack.pipeline.transformer.load_transformer``); fp8 goes through the meta-model lazy
  loader.
* ``text:fp16`` / ``text:nf4`` - Llama-3-8B + CLIP-L through the text-encoder plugin;
  nf4 is bitsandbytes 4-bit (the lowest profile's format), quantized on the CPU.
* ``stages:nf4+fp8`` - the lowest profile's order on a CPU: the text encoders (nf4) are
  loaded, released as the engine releases them, then the transformer (fp8) is loaded.
  Its peak is the larger stage's, not their sum, when the release works.

A case whose planner estimate exceeds 90 % of this machine's RAM is skipped with that
reason (it would be killed for memory, or swap). Next to each measurement the table shows
the planner's weight estimate (framepack.engine.planning) so the planner can be checked.

Columns: ``peak RSS`` is the kernel's high-water mark (ru_maxrss), which also counts
pages of the memory-mapped weight files being read; ``peak anon`` is the process's own
memory, sampled every 20 ms (what must fit in RAM); ``loaded: anon`` / ``file`` are the
two after loading. File-backed pages are clean page cache: the kernel drops them under
pressure and reads them again when touched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
CASES = ("transformer:fp8", "transformer:bf16", "text:nf4", "text:fp16", "stages:nf4+fp8")


def memory_gb() -> dict[str, float]:
    """Resident memory now, split: anonymous (the process's own allocations; what
    cannot be given back without swap) and file-backed (pages of memory-mapped
    weight files; clean, so the kernel can drop them under pressure and read them
    again, but counted in RSS and in what users see in `top`)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 2**20  # kB -> GB
    return {"rss_gb": fields.get("VmRSS", float("nan")), "anon_gb": fields.get("RssAnon", float("nan")),
            "file_gb": fields.get("RssFile", float("nan"))}


class PeakSampler(threading.Thread):
    """The kernel tracks only the total RSS peak (ru_maxrss); the anonymous peak is
    sampled here every 20 ms (a transient shorter than that can be missed)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon_gb = 0.0
        self.peak_file_gb = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.02):
            now = memory_gb()
            self.peak_anon_gb = max(self.peak_anon_gb, now["anon_gb"])
            self.peak_file_gb = max(self.peak_file_gb, now["file_gb"])

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _load_transformer(source, fmt: str):
    import torch

    from framepack.attention.processors import build_attention
    from framepack.engine.plugin_manager import build_plugin_manager, collect_backends
    from framepack.pipeline.transformer import load_transformer

    sdpa = collect_backends(build_plugin_manager()).get("attention", "sdpa").backend
    quantize = "fp8" if fmt == "fp8" else "none"
    return load_transformer(source, torch.bfloat16, build_attention(sdpa, sdpa.options()), quantize, torch.device("cpu"))


def _load_text(source, fmt: str):
    import torch

    from framepack_plugins.encoders import hunyuan_text

    return hunyuan_text.load(source, {}, torch.float16, "nf4" if fmt == "nf4" else "none")


def run_case(model: Path, case: str) -> dict:
    """One case in this process; returns its measurements."""
    from framepack.models.heap import release_free_heap
    from framepack.models.sources import ModelSource

    source = ModelSource("inverted", root=model)
    kind, fmt = case.split(":")
    stages = []
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()

    def mark(stage: str) -> None:
        stages.append({"stage": stage, "at_s": time.perf_counter() - start, **memory_gb()})

    if kind == "transformer":
        loaded = _load_transformer(source, fmt)
        mark("transformer")
    elif kind == "text":
        loaded = _load_text(source, fmt)
        mark("text")
    else:  # the lowest profile's stage order, with the engine's release in between
        text_fmt, transformer_fmt = fmt.split("+")
        loaded = _load_text(source, text_fmt)
        mark("text")
        del loaded
        gc.collect()
        release_free_heap()  # as framepack.pipeline.generate does after releasing the encoders
        mark("released")
        loaded = _load_transformer(source, transformer_fmt)
        mark("transformer")
    sampler.stop()
    del loaded
    return {"case": case, "peak_rss_gb": peak_rss_gb(), "peak_anon_gb": sampler.peak_anon_gb,
            "peak_file_gb": sampler.peak_file_gb, "load_s": time.perf_counter() - start, "stages": stages}


def estimate_gb(case: str) -> float:
    """The planner's weight bytes for what the case holds at once."""
    from framepack.engine.planning import KNOWN_PARAMS, _weight_bytes

    def part(kind: str, fmt: str) -> float:
        if kind == "transformer":
            fmt = "fp8" if fmt == "fp8" else "none"
            return _weight_bytes(KNOWN_PARAMS["transformer"], "bfloat16", fmt, KNOWN_PARAMS.get(f"transformer_{fmt}"))
        fmt = "nf4" if fmt == "nf4" else "none"
        return (_weight_bytes(KNOWN_PARAMS["text_encoder"], "float16", fmt, KNOWN_PARAMS.get(f"text_encoder_{fmt}"))
                + _weight_bytes(KNOWN_PARAMS["text_encoder_2"], "float16"))

    kind, fmt = case.split(":")
    if kind == "stages":
        text_fmt, transformer_fmt = fmt.split("+")
        return max(part("text", text_fmt), part("transformer", transformer_fmt)) / GIB
    return part(kind, fmt) / GIB


def machine_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a full-size model folder (framepack make-full-model)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.model, args.child)))
        return
    import torch

    ram = machine_ram_gb()
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            sys.exit(f"unknown case {case!r} (known: {', '.join(CASES)})")
        estimate = estimate_gb(case)
        if estimate > 0.9 * ram:
            row = {"case": case, "skipped": f"planner estimate {estimate:.1f} GB > 90 % of this machine's {ram:.1f} GB RAM"}
        else:
            proc = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--child", case],
                                  capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "case": case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
        row["estimate_gb"] = estimate
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'case':>16} {'peak RSS':>9} {'peak anon':>9} {'loaded: anon':>12} {'file':>5} {'planner':>7} {'load s':>7}   (GB)")
    for r in rows:
        if "peak_rss_gb" in r:
            last = r["stages"][-1]
            print(f"{r['case']:>16} {r['peak_rss_gb']:>9.1f} {r['peak_anon_gb']:>9.1f} {last['anon_gb']:>12.1f} "
                  f"{last['file_gb']:>5.1f} {r['estimate_gb']:>7.1f} {r['load_s']:>7.0f}")
        else:
            print(f"{r['case']:>18}  {r.get('skipped') or r.get('error')}")
    import diffusers
    import transformers

    out = args.json or Path(__file__).parent / "results" / f"ram-{platform.machine()}-{time.strftime('%Y%m%d')}.json"
    report = {
        "benchmark": "ram", "device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "ram_gb": ram, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "settings": {"model": "full-size random weights (framepack make-full-model)", "compute_dtype": "bf16/fp16"},
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
