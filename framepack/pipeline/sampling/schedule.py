"""Noise schedule: the Flux-style shifted flow-matching sigmas FramePack uses.

A flow-matching sample at noise level sigma is x = (1 - sigma) * x0 + sigma * noise,
so sigma runs from 1 (pure noise) to 0 (data). The schedule takes a uniform grid
t in [1, 0] and applies the resolution-dependent "time shift"

    sigma(t) = e^mu / (e^mu + (1/t - 1)),

which for shift s = e^mu is s*t / (1 + (s - 1)*t): it keeps more steps at high
noise for long token sequences. mu grows linearly with the token count and is
clamped at log(7) (shift 7), which every FramePack resolution bucket reaches.

Parity: the expressions below are evaluated in the same order and the same
precision (Python floats for mu, float32 tensors for sigmas) as the original, so
the sigmas match it bit for bit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flux_mu", "flux_sigmas", "section_sigmas"]

# mu is linear in the sequence length through these two points ...
_SEQ_LO, _MU_LO = 256, 0.5
_SEQ_HI, _MU_HI = 4096, 1.15
# ... and never larger than log(7): a shift of at most 7.
_MU_MAX = math.log(7.0)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def flux_mu(seq_len: int) -> float:
    """The schedule's mu for `seq_len` tokens, clamped at log(7).

    Computed in Python floats in exactly this order (slope, intercept, value,
    clamp) so that it matches the original to the last bit.
    """
    k = (_MU_HI - _MU_LO) / (_SEQ_HI - _SEQ_LO)
    b = _MU_LO - k * _SEQ_LO
    mu = k * seq_len + b
    return min(mu, _MU_MAX)


def flux_sigmas(steps: int, mu: float) -> torch.Tensor:
    """`steps + 1` float32 sigmas from 1 down to exactly 0, time-shifted by e^mu.

    At t = 1 the shift term 1/t - 1 is 0, giving sigma 1; at t = 0 it is inf,
    giving sigma 0 exactly. Keep the expression in this form (not the
    algebraically equal s*t / (1 + (s-1)*t)): parity depends on the rounding.
    """
    _check_steps(steps)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    shift = math.exp(mu)
    return shift / (shift + (1 / t - 1))


def section_sigmas(steps: int, latent_frames: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """Sigmas for one FramePack section of `latent_frames` x `latent_h` x `latent_w` latents.

    The transformer patchifies 2x2 in space, so the token count is
    frames * h * w // 4.
    """
    _check_steps(steps)
    seq_len = latent_frames * latent_h * latent_w // 4
    return flux_sigmas(steps, flux_mu(seq_len))
