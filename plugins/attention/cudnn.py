"""Attention backend `cudnn`: sdpa restricted to cuDNN's fused attention.

``sdpa`` lets torch pick among its kernels; this backend allows only
SDPBackend.CUDNN_ATTENTION, so when cuDNN cannot take the problem it fails
("No available kernel") instead of quietly running another kernel. It is
part of torch's CUDA build: nothing to install. No masks (the engine crops
masked batches and runs it per sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framepack.backends import AttentionBackend
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.attention.support import cuda_reason

NAME = "cudnn"


def unavailable(hardware: HardwareInfo) -> str | None:
    reason = cuda_reason(hardware, min_cc=(8, 0))
    if reason:
        return reason
    from torch.nn.attention import SDPBackend

    if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
        return f"needs a torch with SDPBackend.CUDNN_ATTENTION (this is torch {torch.__version__})"
    return None


def version() -> str:
    # torch and cuDNN together decide what runs; CPU builds have no cuDNN (None).
    cudnn = torch.backends.cudnn.version()
    return f"torch {torch.__version__}" + (f", cudnn {cudnn}" if cudnn else "")


def make_kernel(options):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn_kernel(query, key, value, attn_mask):  # (B, L, H, D) in and out
        if attn_mask is not None:
            raise ValueError(f"attention backend '{NAME}' cannot mask; call it through framepack.attention.processors.build_attention")
        if query.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend '{NAME}' needs float16 or bfloat16 inputs, got {query.dtype} "
                "(set the transformer dtype to bfloat16, or use attention = sdpa)"
            )
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    return cudnn_kernel


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name=NAME,
            make_kernel=make_kernel,
            supports_mask=False,
            unavailable_reason=unavailable,
            description="torch sdpa restricted to cuDNN fused attention, CUDA sm80+, fp16/bf16",
            version=version,
        )
    )
