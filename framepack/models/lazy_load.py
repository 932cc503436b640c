"""Load a safetensors checkpoint into a model built on the meta device, one tensor
at a time, each straight into the dtype its parameter already has.

Why: ``from_pretrained(torch_dtype=bf16)`` followed by a cast to fp8 storage holds
the whole bf16 model (26 GB for the FramePack transformer) before halving it, which
is exactly the RAM a 16 GB machine does not have. Building the model on meta,
setting the storage dtypes first (diffusers' layerwise casting works on meta
modules) and then filling it from the memory-mapped shards keeps the peak at the
final size plus one tensor. Measured in benchmarks/ram_bench.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framepack.errors import FramepackError
from framepack.models.heap import release_free_heap


def checkpoint_files(where: str, subfolder: str | None, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of one model: a local folder, or a hub repo (downloaded
    into the hub cache, like from_pretrained does). Sharded checkpoints come with
    ``STEM.safetensors.index.json``; single ones are ``STEM.safetensors``."""
    index_name, single_name = f"{stem}.safetensors.index.json", f"{stem}.safetensors"
    local = Path(where) / (subfolder or "")
    if local.is_dir():
        index = local / index_name
        if index.is_file():
            return [local / name for name in _shard_names(index)]
        if (local / single_name).is_file():
            return [local / single_name]
        raise FramepackError(f"{local}: neither {index_name} nor {single_name} found")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        index = Path(hf_hub_download(where, index_name, subfolder=subfolder))
    except EntryNotFoundError:
        return [Path(hf_hub_download(where, single_name, subfolder=subfolder))]
    return [Path(hf_hub_download(where, name, subfolder=subfolder)) for name in _shard_names(index)]


def _shard_names(index: Path) -> list[str]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return sorted(set(weight_map.values()))


def load_into_meta_model(model: torch.nn.Module, files: list[Path], compute_dtype: torch.dtype) -> None:
    """Fill every meta tensor of ``model`` from ``files``.

    Each tensor is first rounded to ``compute_dtype`` and then to its parameter's
    own dtype, so the result is bit-identical to ``from_pretrained(torch_dtype=
    compute_dtype)`` followed by the same casts (double rounding included)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    expected = model.state_dict()
    seen = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name not in expected:
                    raise FramepackError(f"{path.name}: unexpected tensor {name!r} for {type(model).__name__}")
                target = expected[name]
                read = handle.get_tensor(name)
                if tuple(read.shape) != tuple(target.shape):
                    raise FramepackError(
                        f"{path.name}: {name} has shape {tuple(read.shape)}, the config says {tuple(target.shape)}"
                    )
                value = read.to(compute_dtype).to(target.dtype) if read.is_floating_point() else read
                if value.data_ptr() == read.data_ptr():
                    # No cast made a copy: a tensor left as a view of the memory-mapped
                    # file would keep the whole shard mapped, and every page read so far
                    # counted in the process's memory, for as long as the model lives.
                    value = value.clone()
                set_module_tensor_to_device(model, name, "cpu", value=value)
                seen.add(name)
        release_free_heap()  # after each shard: the freed source tensors' holes (framepack.models.heap)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FramepackError(f"checkpoint is missing {len(missing)} tensors: {shown}")
