"""Run any attention kernel on masked inputs without handing it a mask.

Two mask shapes reach the kernels in the FramePack transformer:

* key padding, bool (B, 1, 1, Lk): every query row attends to the first n_b
  keys of its sample (diffusers builds this for batch > 1);
* the token refiner's mask, bool (B, 1, L, L) = m_i & m_j with column 0 forced
  true: rows < n_b attend to keys < n_b, padding rows attend to key 0 only
  (so their output is exactly v_0).

Both are prefixes, so a kernel without mask support gets the same result by
cropping keys per sample: with its varlen entry when it has one (one call for
the batch), else one call per sample. Any other mask is refused rather than
guessed at.
"""

from __future__ import annotations

import torch

from framepack.backends import AttentionKernel, VarlenKernel


class MaskPatternError(ValueError):
    pass


def _prefix_lengths(rows: torch.Tensor) -> list[int]:
    """(B, L) bool rows that must be prefixes -> their lengths."""
    lengths = rows.sum(dim=1)
    expected = torch.arange(rows.shape[1], device=rows.device)[None] < lengths[:, None]
    if not torch.equal(rows, expected):
        raise MaskPatternError("mask is not a prefix (right padding) mask")
    return [int(n) for n in lengths.tolist()]


def refiner_lengths(mask: torch.Tensor) -> list[int]:
    """Valid text lengths from the refiner's (B, 1, L, L) mask, checked."""
    b, _, lq, lk = mask.shape
    if lq != lk:
        raise MaskPatternError(f"expected a square refiner mask, got {tuple(mask.shape)}")
    lengths = []
    for i in range(b):
        n = int(mask[i, 0, 0].sum())  # row 0 is m_j when n >= 1; n = 0 and 1 give the same mask
        m = torch.arange(lk, device=mask.device) < n
        expected = m[:, None] & m[None, :]
        expected[:, 0] = True
        if not torch.equal(mask[i, 0], expected):
            raise MaskPatternError("mask is not the token refiner's padding mask")
        lengths.append(n)
    return lengths


class MaskedAttention:
    """The callable the attention processors use: kernel plus mask handling."""

    def __init__(self, kernel: AttentionKernel, supports_mask: bool, varlen: VarlenKernel | None = None) -> None:
        self.kernel = kernel
        self.supports_mask = supports_mask
        self.varlen = varlen

    def __call__(self, query, key, value, attn_mask):  # (B, L, H, D) -> (B, Lq, H, D)
        if attn_mask is None or self.supports_mask:
            return self.kernel(query, key, value, attn_mask)
        mask = attn_mask.expand(query.shape[0], *attn_mask.shape[1:])
        if mask.shape[2] == 1:
            return self._key_padding(query, key, value, _prefix_lengths(mask[:, 0, 0]))
        return self._refiner(query, key, value, refiner_lengths(mask))

    def _cropped(self, query, key, value, q_lengths: list[int], k_lengths: list[int]) -> list[torch.Tensor]:
        """Attention of query[b, :q_b] over key/value[b, :k_b] for each b, without masks."""
        if self.varlen is not None:
            def pack(x, lengths):
                return torch.cat([x[i, :n] for i, n in enumerate(lengths)])  # (total, H, D)

            def offsets(lengths):
                return torch.tensor([0, *lengths], device=query.device).cumsum(0).to(torch.int32)

            out = self.varlen(pack(query, q_lengths), pack(key, k_lengths), pack(value, k_lengths),
                              offsets(q_lengths), offsets(k_lengths), max(q_lengths), max(k_lengths))
            return list(out.split(q_lengths))
        return [
            self.kernel(query[i : i + 1, :nq], key[i : i + 1, :nk], value[i : i + 1, :nk], None)[0]
            for i, (nq, nk) in enumerate(zip(q_lengths, k_lengths))
        ]

    def _key_padding(self, query, key, value, lengths):
        lq = query.shape[1]
        return torch.stack(self._cropped(query, key, value, [lq] * len(lengths), lengths))

    def _refiner(self, query, key, value, lengths):
        # A sample with no text (n = 0) behaves as n = 1: row 0 attends to key 0.
        lengths = [max(n, 1) for n in lengths]
        out = value[:, :1].expand_as(query).clone()  # padding rows see only key 0 -> v_0
        for i, part in enumerate(self._cropped(query, key, value, lengths, lengths)):
            out[i, : lengths[i]] = part
        return out
