"""Attention backend `flex`: torch's flex_attention (torch >= 2.5).

flex_attention works in (B, H, L, D), so the kernel transposes in and out.
On CUDA it is compiled with torch.compile (a fused Triton kernel); eager
flex materialises the (B, H, Lq, Lk) score matrix, which is fine on the CPU
for short sequences and for tests, and hopeless at 18k tokens on a GPU.

It takes masks (``supports_mask=True``): the bool mask becomes a
``score_mod`` that sets masked scores to -inf, which is exactly what sdpa
does with a bool mask. The mask is indexed through its broadcast dimensions
rather than expanded, so a key-padding mask (B, 1, 1, Lk) stays Lk bytes per
sample instead of growing to B * H * Lq * Lk.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch

from framepack.backends import AttentionBackend
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl

NAME = "flex"


@dataclass(frozen=True)
class FlexOptions:
    # torch.compile the kernel on CUDA. Off = eager everywhere (debugging);
    # the CPU always runs eager.
    compile: bool = True


def _has_flex() -> bool:
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:  # a torch without torch.nn.attention at all
        return False


def unavailable(hardware: HardwareInfo) -> str | None:
    if not _has_flex():
        return f"needs torch >= 2.5 (this is torch {torch.__version__})"
    if hardware.device not in ("cuda", "cpu"):
        return f"runs on CUDA and CPU only, not {hardware.device}"
    return None


def version() -> str:
    return torch.__version__  # the kernel is torch's own


def mask_score_mod(mask: torch.Tensor):
    """bool mask broadcastable to (B, H, Lq, Lk), True = attend -> a score_mod."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # 4-D view, no copy
    # Index a size-1 (broadcast) dimension with 0 instead of expanding it.
    per_b, per_h, per_q, per_k = (size > 1 for size in m.shape)

    def score_mod(score, b, h, q_idx, kv_idx):
        keep = m[b if per_b else 0, h if per_h else 0, q_idx if per_q else 0, kv_idx if per_k else 0]
        return torch.where(keep, score, -float("inf"))

    return score_mod


def make_kernel(options: FlexOptions):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = None  # built on the first CUDA call, then reused

    def flex_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        nonlocal compiled
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, L, D)
        score_mod = None if attn_mask is None else mask_score_mod(attn_mask)
        if options.compile and q.is_cuda:
            if compiled is None:
                compiled = torch.compile(flex_attention)
            out = compiled(q, k, v, score_mod=score_mod)
        else:
            with warnings.catch_warnings():
                # Eager is deliberate here; torch warns about it on every first call.
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex_attention(q, k, v, score_mod=score_mod)
        return out.transpose(1, 2)

    return flex_kernel


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=True,
            unavailable_reason=unavailable,
            options=FlexOptions,
            description="torch flex_attention (compiled on CUDA, eager on CPU), takes masks",
            version=version,
        )
    )
