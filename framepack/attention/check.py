"""Self-check of an attention kernel before it is trusted with a video.

Kernels that install badly or misbehave on a GPU tend to produce black or
wrong frames rather than errors. Before a kernel is used on a device and
dtype, it runs on a small random problem (unmasked, key-padded and
refiner-masked, through the same mask handling the transformer uses) and is
compared with sdpa in float32. A NaN/Inf or an error over the tolerance
refuses it. Results are cached for the life of the process per kernel,
device, dtype and library version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from framepack.attention.masks import MaskedAttention

# Relative L2 error against float32 sdpa. Exact kernels in half precision land
# around 3e-3 (bf16) on this problem; the margin keeps flakes away while a
# broken kernel (errors of 0.1 to 1) cannot pass.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

_CACHE: dict[tuple[str, str, str, str], "CheckResult"] = {}


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    error: float | None  # worst relative L2 error over the cases, if it ran
    reason: str  # why it was refused, or a short summary


def _reference(q, k, v, mask):
    f = lambda x: x.float().transpose(1, 2)  # noqa: E731  (B, H, L, D) in float32
    return F.scaled_dot_product_attention(f(q), f(k), f(v), attn_mask=mask).transpose(1, 2)


def _cases(device: torch.device, dtype: torch.dtype):
    g = torch.Generator("cpu").manual_seed(20250417)
    b, lq, h, d = 2, 300, 2, 128  # 300: not a multiple of common tile sizes

    def r(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    q, k, v = r(b, lq, h, d), r(b, lq, h, d), r(b, lq, h, d)
    yield "unmasked", q, k, v, None
    key_mask = torch.arange(lq)[None] < torch.tensor([lq, 170])[:, None]
    yield "key padding", q, k, v, key_mask[:, None, None].to(device)
    n = torch.tensor([40, 0])
    m = torch.arange(64)[None] < n[:, None]
    refiner = (m[:, :, None] & m[:, None, :])[:, None].clone()
    refiner[:, :, :, 0] = True
    yield "refiner mask", q[:, :64], k[:, :64], v[:, :64], refiner.to(device)


def self_check(name: str, attention: MaskedAttention, device: torch.device, dtype: torch.dtype,
               version: str = "", tolerance: float | None = None) -> CheckResult:
    key = (name, str(device), str(dtype), version)
    if key in _CACHE:
        return _CACHE[key]
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE[dtype]
    worst = 0.0
    result = None
    try:
        with torch.inference_mode():
            for case, q, k, v, mask in _cases(device, dtype):
                out = attention(q, k, v, mask)
                if out.shape != q.shape:
                    result = CheckResult(False, None, f"{case}: output shape {tuple(out.shape)}, expected {tuple(q.shape)}")
                    break
                if not torch.isfinite(out).all():
                    result = CheckResult(False, None, f"{case}: output has NaN or Inf")
                    break
                ref = _reference(q, k, v, mask)
                error = float((out.float() - ref).norm() / ref.norm())
                worst = max(worst, error)
                if error > limit:
                    result = CheckResult(False, error, f"{case}: relative error {error:.1e} > {limit:.0e} against sdpa")
                    break
    except Exception as exc:  # a kernel that cannot run here must not take the job down
        result = CheckResult(False, None, f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    if result is None:
        result = CheckResult(True, worst, f"matches sdpa (relative error {worst:.1e} <= {limit:.0e})")
    _CACHE[key] = result
    return result


def clear_cache() -> None:
    _CACHE.clear()
