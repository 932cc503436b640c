"""Turn a velocity-predicting transformer into an x0 (denoised) model with CFG.

The transformer predicts the flow-matching velocity v = noise - x0 at noise level
sigma, given x = (1 - sigma) * x0 + sigma * noise. Then x - sigma * v = x0, which
is what the UniPC sampler (data-prediction form) consumes.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["make_x0_model", "TransformerCall", "X0Model"]

# transformer_call(hidden_states, timestep, branch) -> velocity; branch is
# "positive" or "negative" (the caller picks the matching text conditioning).
TransformerCall = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
# model(x, sigma) -> x0, with x (B, C, T, H, W) and sigma (B,).
X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rescale_cfg(pred: torch.Tensor, pos: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023): pull pred's per-sample std back toward pos's.

    Stds are over every dim but the batch; the result is a blend, weight `rescale`
    on the fully rescaled prediction.
    """
    dims = list(range(1, pos.ndim))
    std_pos = pos.std(dim=dims, keepdim=True)
    std_cfg = pred.std(dim=dims, keepdim=True)
    # Keep this evaluation order: (pred * std_pos) / std_cfg, then the blend.
    return rescale * (pred * std_pos / std_cfg) + (1 - rescale) * pred


def make_x0_model(
    transformer_call: TransformerCall,
    *,
    cfg: float,
    rescale: float,
    dtype: torch.dtype,
) -> X0Model:
    """Wrap `transformer_call` as `model(x, sigma) -> x0` with classifier-free guidance.

    cfg == 1.0 skips the negative branch entirely (one transformer call per model
    call); otherwise pred = neg + cfg * (pos - neg). `dtype` is the transformer's
    compute dtype (bf16 in practice). The returned x0 has x's dtype.
    """

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.float()
        xd = x.to(dtype)
        # The transformer is conditioned on t = 1000 * sigma, in its own dtype.
        timestep = (sigma * 1000.0).to(dtype)

        pos = transformer_call(xd, timestep, "positive").float()
        if cfg == 1.0:
            # No guidance: the negative prediction drops out of pred exactly, so
            # do not spend a transformer call on it.
            neg = torch.zeros_like(pos)
        else:
            neg = transformer_call(xd, timestep, "negative").float()

        pred = neg + cfg * (pos - neg)
        if rescale != 0:
            pred = _rescale_cfg(pred, pos, rescale)

        # x0 = x - sigma * v. Parity: the original computes this from x already
        # rounded to the model dtype (xd), not from the float32 x; using x here
        # would change every step by up to half a bf16 ulp of x and drift away
        # from the original's latents.
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1, 1)
        x0 = xd.float() - pred.float() * sigma_b
        return x0.to(x.dtype)

    return model
