"""Attention backend `xformers`: xformers' memory_efficient_attention.

The module is called xformers_attn so that it never shadows the xformers
package. xformers takes (B, M, H, K), which is our (B, L, H, D). No masks:
the varlen entry packs the batch as one sequence of length total and passes
a ``BlockDiagonalMask`` (xformers' own varlen form, stable since 0.0.16).
Runs on any CUDA GPU it was built for, in float32 too.
"""

from __future__ import annotations


from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.attention.support import cuda_reason, dist_version, missing_module

NAME = "xformers"
INSTALL = "pip install framepack[xformers]"


def unavailable(hardware: HardwareInfo) -> str | None:
    return cuda_reason(hardware) or missing_module("xformers", INSTALL)


def version() -> str:
    return dist_version("xformers")


def _import():
    try:
        import xformers.ops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError as exc:
        raise PluginError(f"attention backend '{NAME}' needs `{INSTALL}` (xformers failed to import: {exc})") from exc
    return xformers.ops.memory_efficient_attention, BlockDiagonalMask


def make_kernel(options):
    attention, _ = _import()

    def xformers_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        if attn_mask is not None:
            raise ValueError(f"attention backend '{NAME}' cannot mask; call it through framepack.attention.processors.build_attention")
        return attention(query, key, value)

    return xformers_kernel


def make_varlen_kernel(options):
    attention, BlockDiagonalMask = _import()

    def xformers_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # query (total_q, H, D), key/value (total_k, H, D). from_seqlens wants
        # Python ints (older releases assert it): one small host sync, paid
        # only on masked batches.
        q_lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        k_lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        bias = BlockDiagonalMask.from_seqlens(q_lengths, k_lengths)
        # (1, total, H, D): the batch is one long sequence, the bias keeps samples apart.
        out = attention(query[None], key[None], value[None], attn_bias=bias)
        return out[0]  # (total_q, H, D)

    return xformers_varlen


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=False,
            unavailable_reason=unavailable,
            description="xformers memory_efficient_attention, CUDA",
            make_varlen_kernel=make_varlen_kernel,
            version=version,
        )
    )
