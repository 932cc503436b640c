"""Attention backend `flash`: FlashAttention 2 (the flash-attn package).

flash-attn takes (B, L, H, D) as it is, so the kernel is a direct call. It
cannot mask (``supports_mask=False``): the engine crops masked batches and
uses the varlen entry below, one call for the whole batch.

Needs CUDA on Ampere or newer (sm80+) and half precision inputs.
"""

from __future__ import annotations



from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.attention.support import check_unmasked_half, cuda_reason, dist_version, missing_module

NAME = "flash"
INSTALL = "pip install framepack[flash]"


def unavailable(hardware: HardwareInfo) -> str | None:
    return cuda_reason(hardware, min_cc=(8, 0)) or missing_module("flash_attn", INSTALL)


def version() -> str:
    return dist_version("flash-attn")


def _import():
    try:
        import flash_attn
    except ImportError as exc:  # also a wheel built for another torch: "undefined symbol"
        raise PluginError(f"attention backend '{NAME}' needs `{INSTALL}` (flash_attn failed to import: {exc})") from exc
    return flash_attn


def make_kernel(options):
    flash_attn_func = _import().flash_attn_func

    def flash_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        check_unmasked_half(NAME, query, attn_mask)
        return flash_attn_func(query, key, value, dropout_p=0.0, causal=False)

    return flash_kernel


def make_varlen_kernel(options):
    flash_attn_varlen_func = _import().flash_attn_varlen_func

    def flash_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # query (total_q, H, D), key/value (total_k, H, D), cu_seqlens int32 (B + 1,)
        check_unmasked_half(NAME, query, None)
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
