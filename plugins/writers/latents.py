"""Writer `latents`: the finished latents as safetensors, to decode again
later (another VAE, tiling, a different writer) without sampling again.

Key ``latents``: float32 (1, 16, T, h, w) in playback order, the scaled
latents the transformer samples (divide by the VAE's scaling factor before
decoding). The job's record is in the file's string metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from framepack.backends import WriterBackend
from framepack.hookspecs import hookimpl
from framepack.output.writing import partial_path


def save(path: Path, latents: torch.Tensor, metadata: dict[str, str], options) -> None:
    from safetensors.torch import save_file

    if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != 16:
        raise ValueError(f"expected latents (1, 16, T, h, w), got {tuple(latents.shape)}")
    path = Path(path)
    tmp = partial_path(path)
    try:
        tensor = latents.detach().to("cpu", torch.float32).contiguous()
        save_file({"latents": tensor}, str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@hookimpl
def framepack_register_writers(register):
    register(
        WriterBackend(
            name="latents",
            suffix=".safetensors",
            save=save,
            accepts="latents",
            description="the finished latents as safetensors (float32, 1x16xTxhxw), to decode again later",
        )
    )
