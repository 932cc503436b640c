"""What switching LoRAs costs in a warm transformer: seconds and extra RAM.

For each model and weight format this loads the transformer as a job does
(framepack.pipeline.transformer.load_transformer), then times
framepack.models.lora.apply_loras for: the first LoRA A (its originals read
from the checkpoint), A -> B (same modules, other values), B -> none (restore)
and none -> A again, next to the time a reload from disk takes (what a switch
would cost without the kept originals). Extra RAM is the kept pre-merge copies
(``touched_bytes``) and the process's RSS growth across the first merge (which
also counts the touched weights themselves when they were still pages of the
memory-mapped checkpoint: a bf16 checkpoint loads lazily, and a merged weight
becomes the process's own memory).

Models: the tiny test model (all its block linears), and the full-size
transformer's width (3072, 24 heads, MLP 12288) with 2 double and 2 single
blocks instead of 20 and 40: the whole 13B transformer does not fit a 23 GB
CPU machine in bf16 next to its kept copies. Per block everything is the
same as at full size, so the full-size figures are the measured ones scaled by
the exact byte count of the full model's targeted weights (from its meta model),
and are marked ``estimated``.

    python benchmarks/lora_bench.py [--rank 32] [--skip-wide] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path


def lora_targets(model) -> dict[str, tuple[int, int]]:
    """Every linear of the double and single blocks (what Musubi-tuner trains by default)."""
    import torch

    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and ".norm" not in name}


def write_musubi_lora(path: Path, targets: dict, rank: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in targets.items():
        flat = "lora_unet_" + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) / inp**0.5).to(torch.bfloat16)
        tensors[f"{flat}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 1e-3).to(torch.bfloat16)
        tensors[f"{flat}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


def write_transformer(root: Path, config: dict, dtype) -> Path:
    """A model folder holding only a random-weight transformer (safetensors, real layout)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    g = torch.Generator().manual_seed(0)
    with init_empty_weights():  # filled tensor by tensor: no float32 copy of the whole model
        model = HunyuanVideoFramepackTransformer3DModel(**config).to(dtype)  # the checkpoint's dtype
    for name, param in list(model.named_parameters()):
        value = (torch.randn(param.shape, generator=g) * 0.02).to(dtype)
        set_module_tensor_to_device(model, name, "cpu", value=value)
    model.save_pretrained(root / "transformer", safe_serialization=True)
    del model
    gc.collect()
    return root


def measure(root: Path, dtype, quantize: str, rank: int, work: Path) -> dict:
    import torch

    from framepack.hardware import PeakMemory
    from framepack.models.heap import release_free_heap
    from framepack.models.lora import LoraRequest, apply_loras, plan_loras, touched_bytes
    from framepack.models.sources import ModelSource
    from framepack.pipeline.transformer import load_transformer, transformer_weight_shapes
    from framepack_plugins.attention.sdpa import sdpa_kernel

    def rss() -> int:
        gc.collect()
        release_free_heap()
        return PeakMemory.rss_bytes()

    source = ModelSource.from_arg(str(root), "original")
    started = time.perf_counter()
    model = load_transformer(source, dtype, sdpa_kernel, quantize)
    lazy_load_s = time.perf_counter() - started
    with torch.no_grad():  # a bf16 checkpoint loads as a lazy mmap; a job reads every page on its first step
        for p in model.parameters():
            p.detach().reshape(-1)[::1024].float().sum()
    load_s = time.perf_counter() - started
    targets = lora_targets(model)
    a = write_musubi_lora(work / f"a-{rank}.safetensors", targets, rank, 1)
    b = write_musubi_lora(work / f"b-{rank}.safetensors", targets, rank, 2)
    shapes = transformer_weight_shapes(source)
    plans = {}
    for path in (a, b):
        started = time.perf_counter()
        plans[path] = ([LoraRequest(path, 1.0)], plan_loras([LoraRequest(path, 1.0)], shapes))
        read_s = time.perf_counter() - started
    before = rss()
    timings = {}
    for label, path in (("first_A", a), ("A_to_B", b), ("B_to_none", None), ("none_to_A", a)):
        requests, plan = plans[path] if path is not None else ([], {})
        started = time.perf_counter()
        apply_loras(model, requests, plan)
        timings[label] = round(time.perf_counter() - started, 4)
        if label == "first_A":
            grown = rss() - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {
        "quantize": quantize, "dtype": str(dtype).removeprefix("torch."), "rank": rank,
        "targeted_modules": len(targets), "lora_file_mb": round(a.stat().st_size / 1e6, 2),
        "read_and_map_lora_s": round(read_s, 4), "reload_transformer_s": round(load_s, 4),
        "reload_transformer_lazy_s": round(lazy_load_s, 4),
        "switch_s": timings, "kept_originals_mb": round(touched_bytes(model) / 1e6, 2),
        "rss_growth_first_merge_mb": round(grown / 1e6, 2), "model_weights_mb": round(weights / 1e6, 2),
        "touched_bytes": touched_bytes(model),
    }
    del model
    gc.collect()
    return row


def full_size_touched_bytes(itemsize: int) -> int:
    """Bytes of the full 13B transformer's block linears (what the LoRA targets), from its meta model."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.models.full import transformer_config

    with init_empty_weights():
        model = HunyuanVideoFramepackTransformer3DModel(**transformer_config())
    return sum(out * inp * itemsize for out, inp in lora_targets(model).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--skip-wide", action="store_true", help="only the tiny model")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "lora-cpu.json")
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="framepack-lora-bench-"))
    try:
        rows = run_all(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the wide model folder is 2.7 GB
    result = {"benchmark": "lora switch", "machine": platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")


def run_all(args, work: Path) -> list[dict]:
    import torch

    from framepack.models.full import transformer_config
    from framepack.models.tiny import make_tiny_model

    rows = []
    tiny = make_tiny_model(work / "tiny")
    for quantize, dtype in (("none", torch.float32), ("none", torch.bfloat16), ("fp8", torch.bfloat16)):
        rows.append({"model": "tiny", **measure(tiny, dtype, quantize, 4, work)})
        print(json.dumps(rows[-1]))
    if not args.skip_wide:
        wide = write_transformer(work / "wide", {**transformer_config(), "num_layers": 2, "num_single_layers": 2},
                                 torch.bfloat16)
        full_bytes = full_size_touched_bytes(2)
        for quantize in ("none", "fp8"):
            row = {"model": "full width, 2+2 blocks", **measure(wide, torch.bfloat16, quantize, args.rank, work)}
            scale = full_bytes / row["touched_bytes"]
            row["full_size_estimated"] = {
                "blocks": "20 double + 40 single", "kept_originals_gb": round(full_bytes / 1e9, 2),
                "switch_s": {k: round(v * scale, 2) for k, v in row["switch_s"].items()},
            }
            rows.append(row)
            print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
