"""Where every second of a framepack job goes: the engine's own cost next to the model's.

Four kinds of run, alternated (one of each per repeat, in turn, so a noisy
neighbour hits all kinds alike):

* ``cli``: a one-shot ``python -m framepack generate ... --json`` as a user
  runs it, in a fresh process. Wall, user and system CPU and minor page faults
  of the process (getrusage of the children), the job's own ``peak_ram_gb``,
  ``elapsed_s`` and ``stage_s`` (load, encode,
  sample, decode, write), and what is left: ``startup_s`` (process start,
  imports, engine assembly: wall - elapsed_s) and ``unstaged_s`` (inside the job
  but in no stage: planning, job folder, hooks: elapsed_s - sum(stage_s)).
* ``importtime``: the same CLI job under ``python -X importtime``: seconds of
  imports per top-level package, whenever they happen (also lazily, mid-job).
* ``warm``: one process of its own with a ``framepack.Pipeline`` (everything
  kept loaded) runs the job once to warm up, then, alternated: the job again (``warm``), the
  job again with the section loop's fixed mmap threshold switched off
  (``warm_heap``, framepack.models.heap), and the pure model compute
  (``compute``): the very transformer forwards and VAE decodes the job made,
  same modules, same inputs (recorded in the first job), timed directly.
* ``original`` (with ``--original-cmd``): any command, e.g. a harness running
  the original FramePack's worker loop on the same model folder. Measured like
  ``cli``; when its last stdout line is a JSON object, that is kept too.

A ``_thp`` suffix (``cli_thp``, ``warm_thp``, ``original_thp``) runs the same with
``THP_MEM_ALLOC_ENABLE=1``: PyTorch's switch for transparent huge pages, which
``framepack.models.heap.enable_huge_pages`` sets for an entry point. Without a
suffix the variable is removed from the environment.

    python benchmarks/overhead_bench.py [--model DIR] [--repeat 3] [--threads 1]
        [--original-cmd "python /scratch/run_orig.py {model} {image} {out}"] [--json PATH]

The job: a 64x64 image, 6 s (5 sections), 25 steps, cache none, the tiny model
(``framepack make-tiny-model``, made in a temporary folder unless ``--model``).
Prompt embeddings and parameter counts are cached under a private
``FRAMEPACK_CACHE_DIR`` that the first run fills (as a user's first job does);
``--cold-cache`` gives every CLI run an empty one. ``--threads N`` sets
OMP_NUM_THREADS/MKL_NUM_THREADS for every process: on a small shared machine
torch's default (one thread per core) makes each OpenMP barrier wait for a
descheduled thread, and per-call times swing by 10x. Results: a table, and JSON
(device, versions, settings, every run, medians) in
``benchmarks/results/overhead-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("load", "encode", "sample", "decode", "write")
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # framepack.models.heap.THP_ENV (not imported: this file runs before torch)

# In the warm process: record the transformer's and the VAE's calls of the first
# job (inputs cloned), then alternate warm jobs and direct replays of those calls.
WARM = r'''
import json, resource, sys, time, torch
from pathlib import Path
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
import framepack
import framepack.pipeline.generate as generate_module

cfg = json.loads(sys.argv[1])
calls, recording = [], [False]

def clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x

def recorder(cls, name):
    original = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        if recording[0]:
            calls.append((name, self, [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}))
        return original(self, *args, **kwargs)
    wrapper.__wrapped__ = original
    setattr(cls, name, wrapper)
    return original

forward = recorder(HunyuanVideoFramepackTransformer3DModel, "forward")
decode = recorder(AutoencoderKLHunyuanVideo, "decode")
fixed_loop = generate_module.run_sections
plain_loop = fixed_loop.__wrapped__  # the section loop without @fixed_mmap_threshold()

def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt

def measured(fn):
    u0, s0, f0 = usage()
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    u1, s1, f1 = usage()
    return out, {"wall_s": wall, "user_s": u1 - u0, "sys_s": s1 - s0, "minflt": f1 - f0}

pipe = framepack.Pipeline(model=cfg["model"], overrides=cfg["overrides"], keep_loaded="all")
job = dict(image=cfg["image"], prompt=cfg["prompt"], seconds=cfg["seconds"], steps=cfg["steps"],
           size=cfg["size"], overwrite=True)
recording[0] = True
_, first = measured(lambda: pipe.generate(output=str(Path(cfg["out"]) / "first.mp4"), **job))
recording[0] = False
n_fwd = sum(c[0] == "forward" for c in calls)
n_dec = sum(c[0] == "decode" for c in calls)
sfx = cfg["suffix"]
print(json.dumps({"kind": "warm_first" + sfx, **first, "forwards": n_fwd, "decodes": n_dec}), flush=True)

def replay():
    spent = {"forward": 0.0, "decode": 0.0}
    with torch.inference_mode():
        for name, module, args, kwargs in calls:
            fn = forward if name == "forward" else decode
            t = time.perf_counter()
            fn(module, *args, **kwargs)
            spent[name] += time.perf_counter() - t
    return spent

for rep in range(cfg["repeat"]):
    for kind in cfg["order"]:
        if kind == "compute":
            spent, row = measured(replay)
            row.update(transformer_s=spent["forward"], vae_decode_s=spent["decode"])
        else:
            generate_module.run_sections = plain_loop if kind == "warm_heap" else fixed_loop
            result, row = measured(lambda: pipe.generate(output=str(Path(cfg["out"]) / f"{kind}.mp4"), **job))
            generate_module.run_sections = fixed_loop
            row.update(elapsed_s=result.elapsed_s, stage_s=result.stage_s, loaded=result.loaded)
        print(json.dumps({"kind": kind + sfx, "repeat": rep, **row}), flush=True)
pipe.close()
'''


def _env(threads: int | None, cache_dir: Path, thp: bool = False) -> dict:
    env = dict(os.environ, FRAMEPACK_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    env.pop(THP_ENV, None)
    if thp:
        env[THP_ENV] = "1"  # what framepack.models.heap.enable_huge_pages() sets
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_process(cmd: list[str], env: dict, cwd: Path, timeout: float = 1800) -> dict:
    """Run ``cmd`` to the end; wall time and the load average before it."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    wall = time.perf_counter() - started
    return {"wall_s": wall, "rc": proc.returncode, "stdout": out, "stderr": err, "load_before": load}


def children_usage() -> tuple[float, float, int]:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measured_process(cmd: list[str], env: dict, cwd: Path) -> dict:
    """``run_process`` plus the child's CPU times and faults: what RUSAGE_CHILDREN
    gained once communicate() has reaped it (one child at a time)."""
    u0, s0, f0 = children_usage()
    row = run_process(cmd, env, cwd)
    u1, s1, f1 = children_usage()
    row.update(user_s=u1 - u0, sys_s=s1 - s0, minflt=f1 - f0)
    if row["rc"] != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({row['rc']}):\n{row['stderr'][-3000:]}")
    return row


def last_json(text: str):
    """The JSON object that ends ``text`` (the CLI prints an indented one; harnesses one line)."""
    text = text.strip()
    start = text.rfind("\n{")
    for candidate in ((text,) if text.startswith("{") else ()) + ((text[start + 1:],) if start >= 0 else ()):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def cli_command(model: Path, image: Path, out: Path, a) -> list[str]:
    return ["-m", "framepack", "generate", "--image", str(image), "--prompt", a.prompt, "--model", str(model),
            "--size", a.size, "--seconds", str(a.seconds), "--steps", str(a.steps), "--set", "cache=none",
            "--output", str(out), "--overwrite", "--json", "--quiet"]


def cli_row(raw: dict) -> dict:
    summary = last_json(raw["stdout"]) or {}
    stage = summary.get("stage_s", {})
    elapsed = summary.get("elapsed_s", 0.0)
    return {"wall_s": raw["wall_s"], "user_s": raw["user_s"], "sys_s": raw["sys_s"], "minflt": raw["minflt"],
            "elapsed_s": elapsed, "stage_s": stage, "startup_s": raw["wall_s"] - elapsed,
            "unstaged_s": elapsed - sum(stage.values()), "peak_ram_gb": summary.get("peak_ram_gb"),
            "load_before": raw["load_before"]}


def parse_importtime(stderr: str) -> dict[str, float]:
    """Seconds of imports per top-level package from ``-X importtime`` lines
    (``import time: self [us] | cumulative | name``): each module's own time,
    summed by the package it belongs to (``torch._dynamo`` counts for torch,
    wherever in the nesting it was imported)."""
    per: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, _, name = line[len("import time:"):].split("|", 2)
        top = name.strip().split(".")[0]
        per[top] = per.get(top, 0.0) + int(own) / 1e6
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def median_stage(rows: list[dict], stage: str):
    values = [r["stage_s"].get(stage) for r in rows if r.get("stage_s") and stage in r["stage_s"]]
    return statistics.median(values) if values else None


def device_info() -> dict:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": name, "cores": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
            "platform": platform.platform(), "libc": " ".join(platform.libc_ver())}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("framepack", "torch", "diffusers", "transformers", "accelerate", "av", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip() + " (+ working tree)"
    except OSError:
        pass
    return out


def make_inputs(workdir: Path, model: Path | None, size: str) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    h, w = (int(x) for x in size.split("x"))
    image = workdir / "start.png"
    Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8")).save(image)
    if model is None:
        from framepack.models.tiny import make_tiny_model

        model = workdir / "tiny-model"
        make_tiny_model(model)
    return model, image


def summarize(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["kind"], []).append(r)
    out = {}
    for kind, rows in by.items():
        s = {k: median(rows, k) for k in ("wall_s", "user_s", "sys_s", "minflt", "elapsed_s", "startup_s",
                                          "unstaged_s", "transformer_s", "vae_decode_s", "import_s")}
        s["stage_s"] = {st: median_stage(rows, st) for st in STAGES if median_stage(rows, st) is not None}
        s["n"] = len(rows)
        if kind == "importtime":
            tops = {}
            for r in rows:
                for pkg, sec in r["imports"].items():
                    tops.setdefault(pkg, []).append(sec)
            s["imports_by_package"] = {p: round(statistics.median(v), 3) for p, v in
                                       sorted(tops.items(), key=lambda kv: -statistics.median(kv[1]))[:15]}
        out[kind] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if v not in (None, {})}
    ratios = {}
    for sfx in ("", "_thp"):
        if f"compute{sfx}" in out:
            compute = out[f"compute{sfx}"]["transformer_s"] + out[f"compute{sfx}"]["vae_decode_s"]
            for warm in ("warm", "warm_heap"):
                if warm + sfx in out:
                    ratios[f"{warm}{sfx}_over_compute{sfx}"] = round(out[warm + sfx]["wall_s"] / compute, 4)
        for cli in ("cli", "cli_thp"):
            if cli in out and "original" + sfx in out:
                ratios[f"{cli}_over_original{sfx}"] = round(out[cli]["wall_s"] / out["original" + sfx]["wall_s"], 4)
    out["ratios"] = ratios
    return out


def print_table(summary: dict) -> None:
    def f(v):
        return "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    cols = ("wall_s", "user_s", "sys_s", "minflt", "startup_s", "unstaged_s") + STAGES + ("transformer_s", "vae_decode_s")
    print(f"{'run':<15}{'n':>3}" + "".join(f"{c.replace('_s', ''):>11}" for c in cols))
    for kind, s in summary.items():
        if kind == "ratios":
            continue
        vals = [s.get(c, s.get("stage_s", {}).get(c)) for c in cols]
        print(f"{kind:<15}{s['n']:>3}" + "".join(f"{f(v):>11}" for v in vals))
    for key, value in summary.get("ratios", {}).items():
        print(f"{key}: {value:.3f}")
    if "importtime" in summary:
        print("imports (s, median, by top-level package): " + ", ".join(
            f"{p} {t:.2f}" for p, t in summary["importtime"].get("imports_by_package", {}).items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model folder (default: a tiny one made in a temporary folder)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for every process (default: torch's)")
    p.add_argument("--size", default="64x64")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompt", default="a cat")
    p.add_argument("--kinds", default="cli,cli_thp,importtime,warm,warm_thp,original,original_thp",
                   help="comma-separated run kinds; a _thp suffix runs it with THP_MEM_ALLOC_ENABLE=1 "
                        "(framepack.models.heap.enable_huge_pages); original* only with --original-cmd")
    p.add_argument("--original-cmd", help="command for the comparison run; {model} {image} {out} {seconds} {steps} "
                   "{size} are filled in, run with the same environment and cwd")
    p.add_argument("--cold-cache", action="store_true", help="an empty FRAMEPACK_CACHE_DIR for every CLI run")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/overhead-cpu.json")
    p.add_argument("--note", help="free text stored with the results (e.g. how loaded the machine was)")
    a = p.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if not k.startswith("original") or a.original_cmd]

    with tempfile.TemporaryDirectory(prefix="framepack-overhead-") as tmp:
        work = Path(tmp)
        model, image = make_inputs(work, a.model, a.size)
        cache = work / "cache"
        runs: list[dict] = []

        def record(row: dict) -> None:
            runs.append(row)
            short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                     if k in ("kind", "repeat", "wall_s", "user_s", "sys_s", "elapsed_s", "startup_s", "unstaged_s",
                              "transformer_s", "vae_decode_s", "import_s")}
            print(json.dumps(short), file=sys.stderr, flush=True)

        for rep in range(a.repeat):
            for kind in kinds:
                base, thp = kind.removesuffix("_thp"), kind.endswith("_thp")
                cache_dir = work / f"cache-{kind}-{rep}" if a.cold_cache else cache
                run_env = _env(a.threads, cache_dir, thp)
                out = work / f"{kind}-{rep}.mp4"
                if base in ("cli", "importtime"):
                    flags = ["-X", "importtime"] if base == "importtime" else []
                    raw = measured_process([sys.executable, *flags, *cli_command(model, image, out, a)], run_env, work)
                    row = {"kind": kind, "repeat": rep, **cli_row(raw)}
                    if base == "importtime":
                        row["imports"] = parse_importtime(raw["stderr"])
                        row["import_s"] = sum(row["imports"].values())
                    record(row)
                elif base == "original":
                    outdir = work / f"{kind}-{rep}"
                    outdir.mkdir()
                    cmd = a.original_cmd.format(model=model, image=image, out=outdir, seconds=a.seconds,
                                                steps=a.steps, size=a.size.split("x")[0])
                    raw = measured_process(shlex.split(cmd), run_env, work)
                    row = {"kind": kind, "repeat": rep, "wall_s": raw["wall_s"], "user_s": raw["user_s"],
                           "sys_s": raw["sys_s"], "minflt": raw["minflt"], "load_before": raw["load_before"]}
                    own = last_json(raw["stdout"])
                    if own:
                        row["reported"] = own
                        if "stage_s" in own:
                            row["stage_s"] = {k: v for k, v in own["stage_s"].items() if k in STAGES}
                    record(row)
                elif base == "warm" and rep == 0:
                    # One process for every warm repeat; its runs alternate inside it.
                    cfg = {"model": str(model), "image": str(image), "prompt": a.prompt, "seconds": a.seconds,
                           "steps": a.steps, "size": a.size, "overrides": ["cache=none"], "out": str(work),
                           "repeat": a.repeat, "order": ["warm", "compute", "warm_heap"],
                           "suffix": "_thp" if thp else ""}
                    proc = measured_process([sys.executable, "-c", WARM, json.dumps(cfg)], run_env, work)
                    for line in proc["stdout"].splitlines():
                        if line.startswith("{"):
                            record(json.loads(line))
        summary = summarize(runs)

    result = {"benchmark": "overhead", "device": device_info(), "versions": versions(),
              "settings": {"size": a.size, "seconds": a.seconds, "steps": a.steps, "cache": "none",
                           "threads": a.threads, "repeat": a.repeat, "kinds": kinds, "cold_cache": a.cold_cache,
                           "original_cmd": _portable(a.original_cmd), "model": "tiny (framepack make-tiny-model)"
                           if a.model is None else str(a.model)},
              "note": a.note, "loadavg_end": os.getloadavg(), "summary": summary, "runs": runs}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = a.json.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp_path.replace(a.json)
    print_table(summary)
    print(f"wrote {a.json}")
    return 0


def _portable(cmd: str | None) -> str | None:
    """The command as recorded: this machine's interpreter and scratch paths
    reduced to their names, so the results say what ran, not where."""
    if not cmd:
        return cmd
    return " ".join(os.path.basename(w) if os.path.isabs(w) else w for w in cmd.split())


if __name__ == "__main__":
    sys.exit(main())
