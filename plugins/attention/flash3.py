"""Attention backend `flash3`: FlashAttention 3 for Hopper (module flash_attn_interface).

FA3 is built from the hopper/ folder of github.com/Dao-AILab/flash-attention
(there is no framepack extra for it). Its module is ``flash_attn_interface``
whatever the distribution is called: "flash_attn_3" in current releases,
"flashattn-hopper" in the 2024 beta. The beta's functions always returned
``(out, softmax_lse)``; current ones return ``out`` unless asked for the lse,
so both shapes of result are accepted.

Layout (B, L, H, D) as it is; no masks (the engine crops and uses varlen).
"""

from __future__ import annotations


import torch

from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.attention.support import check_unmasked_half, cuda_reason, dist_version, missing_module

NAME = "flash3"
INSTALL = "build FlashAttention 3: `cd hopper && pip install .` in a clone of github.com/Dao-AILab/flash-attention"
DISTRIBUTIONS = ("flash_attn_3", "flash-attn-3", "flashattn-hopper")


def unavailable(hardware: HardwareInfo) -> str | None:
    # FA3 uses Hopper-only instructions (wgmma, TMA): sm90, not Ada or Blackwell.
    return cuda_reason(hardware, major=9, label="a Hopper GPU (sm90)") or missing_module("flash_attn_interface", INSTALL)


def version() -> str:
    return dist_version(*DISTRIBUTIONS)


def _import():
    try:
        import flash_attn_interface
    except ImportError as exc:
        raise PluginError(f"attention backend '{NAME}' needs FlashAttention 3 ({INSTALL}); import failed: {exc}") from exc
    return flash_attn_interface


def _out(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result  # (out, lse) in some releases


def make_kernel(options):
    flash_attn_func = _import().flash_attn_func

    def flash3_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        check_unmasked_half(NAME, query, attn_mask)
        return _out(flash_attn_func(query, key, value, causal=False))

    return flash3_kernel


def make_varlen_kernel(options):
    flash_attn_varlen_func = _import().flash_attn_varlen_func

    def flash3_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # query (total_q, H, D), key/value (total_k, H, D), cu_seqlens int32 (B + 1,).
        # The seven leading arguments are positional in every release.
        check_unmasked_half(NAME, query, None)
        return _out(
            flash_attn_varlen_func(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False)
        )

    return flash3_varlen


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=False,
            unavailable_reason=unavailable,
            description="FlashAttention 3 (flash_attn_interface), Hopper sm90 only, fp16/bf16",
            make_varlen_kernel=make_varlen_kernel,
            version=version,
        )
    )
