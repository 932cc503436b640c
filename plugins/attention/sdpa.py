"""Attention backend `sdpa`: torch's scaled_dot_product_attention.

Runs everywhere torch does and takes masks, so it is every profile's last
fallback and the reference other kernels are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framepack.backends import AttentionBackend
from framepack.hookspecs import hookimpl


def sdpa_kernel(
    query: torch.Tensor,  # (B, Lq, H, D)
    key: torch.Tensor,  # (B, Lk, H, D)
    value: torch.Tensor,  # (B, Lk, H, D)
    attn_mask: torch.Tensor | None,  # bool, broadcastable to (B, H, Lq, Lk)
) -> torch.Tensor:
    # SDPA wants (B, H, L, D).
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2)


@hookimpl
def framepack_register_attention(register):
    register(
        AttentionBackend(
            name="sdpa",
            make_kernel=lambda options: sdpa_kernel,
            supports_mask=True,
            description="torch.nn.functional.scaled_dot_product_attention (any device)",
        )
    )
