"""Attention processors that route every attention call of the FramePack
transformer through the engine's chosen kernel.

diffusers' dispatcher cannot be extended with new kernels, and the token
refiner's attention does not use it at all, so the engine sets its own
processor on every ``Attention`` module (the class has no
``set_attn_processor``). The math before and after the kernel is that of
diffusers' ``HunyuanVideoAttnProcessor2_0`` and ``AttnProcessor2_0``;
tests check the outputs are the same.

Kernel layout: (B, L, H, D) in and out; the mask is bool and broadcastable
to (B, H, Lq, Lk), True = attend.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from framepack.attention.masks import MaskedAttention
from framepack.backends import AttentionBackend, AttentionKernel


def _rope(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], n_text: int) -> torch.Tensor:
    """Rotary embedding on the image tokens only; the last n_text tokens are text."""
    if n_text == 0:
        return apply_rotary_emb(x, rotary, sequence_dim=1)
    return torch.cat([apply_rotary_emb(x[:, :-n_text], rotary, sequence_dim=1), x[:, -n_text:]], dim=1)


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, C) -> query, key, value (B, L, H, D)."""
    return tuple(proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))


class HunyuanBlockAttnProcessor:
    """For the 20 double-stream and 40 single-stream blocks."""

    def __init__(self, kernel: AttentionKernel) -> None:
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, L_img, C) or, for single blocks, image part only
        encoder_hidden_states: torch.Tensor | None = None,  # (B, L_txt, C)
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        single = attn.add_q_proj is None
        if single and encoder_hidden_states is not None:
            # Single-stream blocks project image and text together.
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        n_text_inline = encoder_hidden_states.shape[1] if single and encoder_hidden_states is not None else 0

        query, key, value = _qkv(attn, hidden_states)  # (B, L, H, D)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = _rope(query, image_rotary_emb, n_text_inline)
            key = _rope(key, image_rotary_emb, n_text_inline)

        if not single and encoder_hidden_states is not None:
            # Double-stream blocks project text with their own weights.
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)

        out = self.kernel(query, key, value, attention_mask)  # (B, L, H, D)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out, None  # not reached by the FramePack blocks; kept for completeness
        n_text = encoder_hidden_states.shape[1]
        out, enc_out = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            enc_out = attn.to_add_out(enc_out)
        return out, enc_out


class RefinerAttnProcessor:
    """For the token refiner's plain self-attention over the text tokens."""

    def __init__(self, kernel: AttentionKernel) -> None:
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, L_txt, C)
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # bool (B, 1, L, L)
        **kwargs,
    ) -> torch.Tensor:
        query, key, value = _qkv(attn, hidden_states)  # (B, L, H, D)
        out = self.kernel(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install_attention(transformer: torch.nn.Module, kernel: AttentionKernel) -> int:
    """Set the kernel on every Attention module; returns how many were set.

    Refiner attention lives under ``context_embedder``; every other Attention
    module is a transformer block's.
    """
    count = 0
    for name, module in transformer.named_modules():
        if isinstance(module, Attention):
            refiner = name.startswith("context_embedder.")
            module.set_processor(RefinerAttnProcessor(kernel) if refiner else HunyuanBlockAttnProcessor(kernel))
            count += 1
    return count


def build_attention(backend: AttentionBackend, options) -> MaskedAttention:
    """The kernel with the mask handling its capabilities call for."""
    varlen = backend.make_varlen_kernel(options) if backend.make_varlen_kernel is not None else None
    return MaskedAttention(backend.make_kernel(options), backend.supports_mask, varlen)
