"""What the GPU attention kernels share: why one cannot run here, its
library's version, and the input checks the kernels' own errors do not
explain."""

from __future__ import annotations

import importlib.util
from importlib import metadata

import torch

from framepack.hardware import HardwareInfo


def cuda_reason(hardware: HardwareInfo, min_cc: tuple[int, int] | None = None, major: int | None = None,
                label: str = "") -> str | None:
    """Hardware first: installing a library cannot fix a missing or old GPU.
    An unknown capability (simulated hardware) passes: the self-check decides."""
    if hardware.device != "cuda":
        return "needs CUDA"
    cc = hardware.compute_capability
    if cc is None:
        return None
    if min_cc is not None and cc < min_cc:
        return f"needs sm{min_cc[0]}{min_cc[1]}+ (this GPU is sm{cc[0]}{cc[1]})"
    if major is not None and cc[0] != major:
        wanted = label or f"an sm{major}x GPU"
        return f"needs {wanted}, this GPU is sm{cc[0]}{cc[1]}"
    return None


def missing_module(module: str, install: str) -> str | None:
    """'X is not installed (install hint)' without importing X."""
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed ({install})"


def dist_version(*distributions: str) -> str:
    """The first installed distribution's version, or "" (a self-check cache key)."""
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def check_unmasked_half(name: str, query: torch.Tensor, attn_mask) -> None:
    # Both are errors a user can reach (a float32 profile, a direct call);
    # the libraries' own messages do not say what to change.
    if attn_mask is not None:
        raise ValueError(f"attention backend '{name}' cannot mask; call it through framepack.attention.processors.build_attention")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend '{name}' needs float16 or bfloat16 inputs, got {query.dtype} "
            "(set the transformer dtype to bfloat16, or use attention = sdpa)"
        )
