"""UniPC multistep sampler for flow matching, data (x0) prediction, variant "bh1".

Reference: W. Zhao, L. Bai, Y. Rao, J. Zhou, J. Lu, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models", NeurIPS
2023 (arXiv:2302.04867). Written from the paper's equations; the loop structure
(warm-up orders, one model call per step, returning the last x0 prediction) is
FramePack's, which seed parity requires.

The ODE. A flow-matching latent at noise level sigma is
x = (1 - sigma) x0 + sigma * noise, so x - x0 = sigma (noise - x0) and

    dx/dsigma = (x - x0(x, sigma)) / sigma.

In lambda = -log(sigma) this is dx/dlambda = x0 - x, whose variation-of-constants
solution from s to t, with h = lambda_t - lambda_s, is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda.

For constant x0 the integral is exact: x_t = (sigma_t/sigma_s) x_s - expm1(-h) x0.
UniPC Taylor-expands x0 in lambda around the last evaluation m0 and estimates the
derivatives from earlier x0 evaluations (divided differences D1_i). With
hh = -h and phi_1(z) = (e^z - 1)/z, phi_{n+1}(z) = (phi_n(z) - 1/n!)/z, the order
conditions on the weights a (paper, Thm. 3.1, data-prediction form) are

    sum_m a_m r_m^(i-1) = i! * hh * phi_{i+1}(hh) / B(h),    i = 1..k,

where r_m are the earlier points' lambda offsets in units of h. Variant bh1 takes
B(h) = hh. The predictor (UniP) uses only past points; the corrector (UniC) adds
the fresh evaluation at t as a point with r = 1, raising the order by one without
an extra model call: the evaluation at the predicted x_t is reused as the next
step's m0.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["sample_unipc"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], Any]

_MAX_ORDER = 3


def _check_sigmas(sigmas: torch.Tensor) -> None:
    """1-D, >= 2 entries, positive and strictly decreasing; the last may be 0."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got {shape}")
    s = sigmas.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
    if not bool((s[:-1] > 0).all()) or float(s[-1]) < 0:
        raise ValueError(
            f"sigmas must be positive except for a final 0, got {s.tolist()}"
        )


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to scale a batch of `like`-shaped tensors."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _weighted_sum(weights: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * terms[:, k]; weights (K,), terms (B, K, ...) -> (B, ...)."""
    return torch.einsum("k,bk...->b...", weights, terms)


def _order_conditions(rks: torch.Tensor, hh: torch.Tensor, order: int):
    """The UniPC linear system R a = b for bh1, plus phi_1 term expm1(hh).

    rks: (order,) lambda offsets of the points used, in units of h, last one 1.
    hh:  0-d, = -h.
    Returns h_phi_1 (0-d), B_h (0-d), R (order, order), b (order,) in rks' dtype.

    Row i (1-based) of R is rks**(i-1) (the i-th Taylor moment of the points);
    b_i = i! * hh * phi_{i+1}(hh) / B_h. h_phi_k walks through
    hh * phi_{i+1}(hh) by the recurrence phi_{n+1} = (phi_n - 1/n!) / z.
    """
    h_phi_1 = torch.expm1(hh)  # hh * phi_1(hh)
    h_phi_k = h_phi_1 / hh - 1  # hh * phi_2(hh)
    factorial = 1
    B_h = hh  # variant bh1: B(h) = hh (bh2 would use expm1(hh))
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial  # hh * phi_{i+2}(hh)
    R = torch.stack(rows)
    b = torch.stack(b).to(rks.dtype)
    return h_phi_1, B_h, R, b


def _uni_pc_update(
    model: Model,
    x: torch.Tensor,
    model_hist: list,
    t_hist: list,
    t: torch.Tensor,
    order: int,
):
    """One UniP predictor + UniC corrector step of order `order` from t_hist[-1] to t.

    x: (B, ...) the state at t_hist[-1]; model_hist / t_hist: earlier x0
    predictions (B, ...) and their times (B,), most recent last; t: (B,).
    Returns (x at t after correction, x0 prediction at the predicted x_t).
    """
    t_prev_0 = t_hist[-1]
    m0 = model_hist[-1]
    lambda_prev_0 = -torch.log(t_prev_0)  # (B,)
    lambda_t = -torch.log(t)  # (B,)
    h = lambda_t - lambda_prev_0  # (B,), > 0 since sigma decreases

    # Divided differences from the earlier points: rk_i is point i's lambda
    # offset in units of h (negative: it lies behind), and D1_i ~ h * dx0/dlambda
    # to first order.
    rks, D1s = [], []
    for i in range(1, order):
        lambda_prev_i = -torch.log(t_hist[-(i + 1)])
        rk = ((lambda_prev_i - lambda_prev_0) / h)[0]  # 0-d
        rks.append(rk)
        D1s.append((model_hist[-(i + 1)] - m0) / rk)
    # The corrector's extra point is the new evaluation at t itself: offset 1.
    # Float32 for float32 input (parity); x's dtype in general.
    rks.append(torch.ones((), dtype=h.dtype, device=h.device))
    rks = torch.stack(rks).to(device=x.device, dtype=x.dtype)  # (order,)

    hh = -h[0]
    h_phi_1, B_h, R, b = _order_conditions(rks, hh, order)

    D1s = torch.stack(D1s, dim=1) if D1s else None  # (B, order-1, ...)

    # Predictor weights over the past points: the leading (order-1) conditions.
    # For order 2 the single weight is b_1 = phi_2(hh) -> 1/2 as h -> 0; the
    # constant 1/2 is used (same order of accuracy).
    if order == 2:
        rhos_p = torch.tensor([0.5], dtype=x.dtype, device=x.device)
    elif order > 2:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
    # Corrector weights over past points plus the new one (all `order` conditions).
    if order == 1:
        rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device)
    else:
        rhos_c = torch.linalg.solve(R, b)

    # Exponential-integrator part (exact for constant x0):
    # x_t_ = (sigma_t / sigma_s) x - expm1(-h) m0.
    x_t_ = _bcast((t / t_prev_0).to(x.dtype), x) * x - h_phi_1 * m0

    # UniP: add the higher-order terms from the past divided differences.
    if D1s is not None:
        x_t = x_t_ - B_h * _weighted_sum(rhos_p, D1s)
    else:
        x_t = x_t_

    # The step's only model call, at the predicted state.
    model_t = model(x_t, t)

    # UniC: redo the step with the new evaluation as an extra point (r = 1).
    if D1s is not None:
        corr_res = _weighted_sum(rhos_c[:-1], D1s)
    else:
        corr_res = 0
    D1_t = model_t - m0
    x_t = x_t_ - B_h * (corr_res + rhos_c[-1] * D1_t)
    return x_t, model_t


def sample_unipc(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """Sample with UniPC-bh1 (order up to 3) on `sigmas`, calling `model` len(sigmas)-1 times.

    model(x, sigma) -> x0 prediction, with sigma of shape (B,). x: (B, ...) the
    state at sigmas[0]. Iteration i steps x to sigmas[i] (i >= 1) and evaluates
    the model there; the first `order - 1` steps warm up with orders 1, 2. The
    step to sigmas[-1] (normally 0) is never taken: the result is the last x0
    prediction, made at sigmas[-2]. callback, if given, gets
    {"x", "i", "denoised"} after every iteration.
    """
    _check_sigmas(sigmas)
    n = len(sigmas)
    order = min(_MAX_ORDER, n - 2)
    batch = x.shape[0]

    model_hist: list = []
    t_hist: list = []
    for i in range(n - 1):
        vec_t = sigmas[i].expand(batch)  # (B,)
        if i == 0:
            model_hist = [model(x, vec_t)]
            t_hist = [vec_t]
        else:
            step_order = i if i < order else order
            x, model_x = _uni_pc_update(model, x, model_hist, t_hist, vec_t, step_order)
            model_hist.append(model_x)
            t_hist.append(vec_t)
            model_hist = model_hist[-order:]
            t_hist = t_hist[-order:]
        if callback is not None:
            callback({"x": x, "i": i, "denoised": model_hist[-1]})
    return model_hist[-1]
