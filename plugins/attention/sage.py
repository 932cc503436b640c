"""Attention backend `sage`: SageAttention (quantized attention, thu-ml/SageAttention).

``sageattn`` quantizes Q and K to int8 (and, in SageAttention 2 on Ada and
Hopper, P and V to FP8), so it is lossy by design and states a tolerance for
the engine's self-check. Layout "NHD" is our (B, L, H, D). No masks.

SageAttention 1.0.x (the PyPI release) smooths K in place (``k -= mean``).
That does not change the output (softmax is shift-invariant per query row)
and the engine never reads a key after the kernel, so no defensive copy is
made; callers that reuse the key tensor should know.
"""

from __future__ import annotations



from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.attention.support import check_unmasked_half, cuda_reason, dist_version, missing_module

NAME = "sage"
INSTALL = "pip install framepack[sage]"

# Largest relative L2 error against float32 sdpa that the self-check accepts.
# The stored excerpts of the SageAttention papers did not include their
# accuracy tables, so this comes from the quantization itself:
# * int8 Q/K with a per-block scale max|x|/127 moves each score by ~1e-2,
#   about 1-2% relative error in the output;
# * FP8 e4m3 keeps 3 mantissa bits, so each P and V element is off by
#   2^-4/sqrt(3) = 3.6% rms. On random inputs (the self-check's problem:
#   near-uniform attention whose output is a cancelling sum) that passes
#   straight through: sqrt(2) * 3.6% = ~5% relative L2 on sm89/sm90.
# 0.08 keeps flakes away from that worst case and is still far below what a
# broken kernel gives (wrong layout or scale: 0.3 to 1.4). Exact bf16 kernels
# land around 3e-3 on the same problem.
TOLERANCE = 0.08


def unavailable(hardware: HardwareInfo) -> str | None:
    # A GPU newer than the installed release knows is caught by the self-check.
    return cuda_reason(hardware, min_cc=(8, 0)) or missing_module("sageattention", INSTALL)


def version() -> str:
    return dist_version("sageattention")


def _import():
    try:
        import sageattention
    except ImportError as exc:
        raise PluginError(f"attention backend '{NAME}' needs `{INSTALL}` (sageattention failed to import: {exc})") from exc
    return sageattention


def make_kernel(options):
    sageattn = _import().sageattn

    def sage_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        check_unmasked_half(NAME, query, attn_mask)
        return sageattn(query, key, value, tensor_layout="NHD", is_causal=False)

    return sage_kernel


def make_varlen_kernel(options):
    sageattn_varlen = _import().sageattn_varlen

    def sage_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # query (total_q, H, D), key/value (total_k, H, D), cu_seqlens int32 (B + 1,)
        check_unmasked_half(NAME, query, None)
        return sageattn_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False)

    return sage_varlen


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=False,
            unavailable_reason=unavailable,
            description="SageAttention (int8 QK, lossy by design), CUDA sm80+, fp16/bf16",
            make_varlen_kernel=make_varlen_kernel,
            version=version,
            tolerance=TOLERANCE,
        )
    )
