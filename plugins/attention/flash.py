"""Attention backend `flash`: FlashAttention 2 (the flash-attn package).

flash-attn takes (B, L, H, D) as it is, so the kernel is a direct call. It
cannot mask (``supports_mask=False``): the engine crops masked batches and
uses the varlen entry below, one call for the whole batch.

Needs CUDA on Ampere or newer (sm80+) and half precision inputs.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

import torch

from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl

NAME = "flash"
INSTALL = "pip install framepack[flash]"


def unavailable(hardware: HardwareInfo) -> str | None:
    # Hardware first: installing the library cannot fix a missing or old GPU.
    if hardware.device != "cuda":
        return "needs CUDA"
    cc = hardware.compute_capability
    # Unknown capability (simulated hardware without it): let the self-check decide.
    if cc is not None and cc < (8, 0):
        return f"needs sm80+ (this GPU is sm{cc[0]}{cc[1]})"
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash_attn is not installed ({INSTALL})"
    return None


def version() -> str:
    try:
        return metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return ""


def _import():
    try:
        import flash_attn
    except ImportError as exc:  # also a wheel built for another torch: "undefined symbol"
        raise PluginError(f"attention backend '{NAME}' needs `{INSTALL}` (flash_attn failed to import: {exc})") from exc
    return flash_attn


def _check(query: torch.Tensor, attn_mask) -> None:
    # Both are errors a user can reach (a float32 profile, a direct call);
    # flash-attn's own messages do not say what to change.
    if attn_mask is not None:
        raise ValueError(f"attention backend '{NAME}' cannot mask; call it through framepack.attention.build_attention")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend '{NAME}' needs float16 or bfloat16 inputs, got {query.dtype} "
            "(set the transformer dtype to bfloat16, or use attention = sdpa)"
        )


def make_kernel(options):
    flash_attn_func = _import().flash_attn_func

    def flash_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        _check(query, attn_mask)
        return flash_attn_func(query, key, value, dropout_p=0.0, causal=False)

    return flash_kernel


def make_varlen_kernel(options):
    flash_attn_varlen_func = _import().flash_attn_varlen_func

    def flash_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # query (total_q, H, D), key/value (total_k, H, D), cu_seqlens int32 (B + 1,)
        _check(query, None)
        return flash_attn_varlen_func(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, causal=False
        )

    return flash_varlen


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=False,
            unavailable_reason=unavailable,
            description="FlashAttention 2 (flash-attn), CUDA sm80+, fp16/bf16",
            make_varlen_kernel=make_varlen_kernel,
            version=version,
        )
    )
