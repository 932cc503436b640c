"""Tests for framepack.pipeline.sampling: schedule, CFG wrapper and the UniPC sampler.

The UniPC references are closed-form solutions of the flow-matching ODE
dx/dsigma = (x - x0(x, sigma)) / sigma for models whose x0 is known analytically.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from framepack.pipeline.sampling import (
    flux_mu,
    flux_sigmas,
    make_x0_model,
    sample_unipc,
    section_sigmas,
)

BUCKETS_640 = [
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
]


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("hw", BUCKETS_640)
def test_section_sigmas_640_buckets_use_shift_7(hw):
    H, W = hw
    lh, lw = H // 8, W // 8
    steps = 25
    sig = section_sigmas(steps, 9, lh, lw)

    # Every bucket has enough tokens for mu to clamp at log 7 (shift 7).
    assert flux_mu(9 * lh * lw // 4) == math.log(7.0)
    assert sig.dtype == torch.float32
    assert sig.shape == (steps + 1,)
    assert sig[0].item() == 1.0
    assert sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())

    # Shift s maps t -> s t / (1 + (s-1) t); independent float64 evaluation.
    t = 24 / 25
    expected = 7 * t / (1 + 6 * t)
    assert abs(sig[1].item() - expected) < 1e-6
    # A mid-schedule point too.
    t = 12 / 25
    assert abs(sig[13].item() - 7 * t / (1 + 6 * t)) < 1e-6


def test_flux_mu_on_the_line_below_the_clamp():
    # Line through (256, 0.5) and (4096, 1.15): slope 0.65 / 3840.
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flux_mu(2176) == pytest.approx(0.5 + 0.65 * (2176 - 256) / 3840, abs=1e-12)
    # Far beyond the line's crossing of log 7 it is clamped.
    assert flux_mu(10**6) == math.log(7.0)


def test_flux_sigmas_small_mu_matches_closed_form():
    mu = flux_mu(1024)
    s = math.exp(mu)
    sig = flux_sigmas(10, mu)
    ts = np.linspace(1.0, 0.0, 11)
    for k, t in enumerate(ts[:-1]):
        assert abs(sig[k].item() - s * t / (1 + (s - 1) * t)) < 1e-6
    assert sig[-1].item() == 0.0


def test_section_sigmas_is_flux_sigmas_of_token_count():
    got = section_sigmas(7, 3, 10, 14)
    want = flux_sigmas(7, flux_mu(3 * 10 * 14 // 4))
    assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [0, -3])
def test_section_sigmas_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match=str(steps)):
        section_sigmas(steps, 9, 80, 80)


# ---------------------------------------------------------------- guidance


class FakeTransformer:
    """Returns fixed velocities per branch and records every call."""

    def __init__(self, pos, neg=None):
        self.pos, self.neg = pos, neg
        self.calls = []

    def __call__(self, hidden_states, timestep, branch):
        self.calls.append((branch, hidden_states.clone(), timestep.clone()))
        out = self.pos if branch == "positive" else self.neg
        return out.to(hidden_states.dtype)


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_cfg_one_skips_negative_branch():
    shape = (2, 3, 2, 4, 5)
    tr = FakeTransformer(_rand(*shape, seed=1), neg=None)  # neg would crash if used
    model = make_x0_model(tr, cfg=1.0, rescale=0.0, dtype=torch.float32)
    x = _rand(*shape, seed=2)
    sigma = torch.tensor([0.7, 0.3])
    for k in range(3):
        model(x, sigma)
        assert len(tr.calls) == k + 1
    assert all(branch == "positive" for branch, _, _ in tr.calls)
    x0 = model(x, sigma)
    expected = x - tr.pos * sigma.view(2, 1, 1, 1, 1)
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-6)


def test_cfg_combines_branches():
    shape = (2, 3, 2, 4, 5)
    pos, neg = _rand(*shape, seed=3), _rand(*shape, seed=4)
    tr = FakeTransformer(pos, neg)
    cfg = 3.5
    model = make_x0_model(tr, cfg=cfg, rescale=0.0, dtype=torch.float32)
    x = _rand(*shape, seed=5)
    sigma = torch.tensor([0.9, 0.2])
    x0 = model(x, sigma)

    assert [b for b, _, _ in tr.calls] == ["positive", "negative"]
    for _, hs, ts in tr.calls:
        assert torch.equal(hs, x)
        assert torch.allclose(ts, torch.tensor([900.0, 200.0]))
    xn, pn, nn_ = x.double().numpy(), pos.double().numpy(), neg.double().numpy()
    pred = nn_ + cfg * (pn - nn_)
    expected = xn - pred * np.array([0.9, 0.2]).reshape(2, 1, 1, 1, 1)
    np.testing.assert_allclose(x0.numpy(), expected, rtol=0, atol=1e-5)
    assert x0.dtype == torch.float32


def _pred_from_x0(x, x0, sigma):
    return (x.double() - x0.double()) / sigma.double().view(-1, 1, 1, 1, 1)


def test_rescale_one_restores_positive_std():
    shape = (2, 3, 2, 4, 5)
    pos, neg = _rand(*shape, seed=6), 3.0 * _rand(*shape, seed=7)
    model = make_x0_model(FakeTransformer(pos, neg), cfg=5.0, rescale=1.0, dtype=torch.float32)
    x = _rand(*shape, seed=8)
    sigma = torch.tensor([0.8, 0.5])
    pred = _pred_from_x0(x, model(x, sigma), sigma).numpy()
    for b in range(2):
        assert pred[b].std(ddof=1) == pytest.approx(pos[b].double().numpy().std(ddof=1), rel=1e-4)
    # Without rescale the std is far from the positive one (the test can fail).
    pred0 = _pred_from_x0(
        x, make_x0_model(FakeTransformer(pos, neg), cfg=5.0, rescale=0.0, dtype=torch.float32)(x, sigma), sigma
    ).numpy()
    assert abs(pred0[0].std(ddof=1) / pos[0].numpy().std(ddof=1) - 1) > 0.5


def test_rescale_partial_blend_matches_formula():
    shape = (2, 3, 2, 4, 5)
    pos, neg = _rand(*shape, seed=9), _rand(*shape, seed=10)
    cfg, rs = 4.0, 0.7
    model = make_x0_model(FakeTransformer(pos, neg), cfg=cfg, rescale=rs, dtype=torch.float32)
    x = _rand(*shape, seed=11)
    sigma = torch.tensor([0.6, 0.4])
    pred = _pred_from_x0(x, model(x, sigma), sigma).numpy()
    pn, nn_ = pos.double().numpy(), neg.double().numpy()
    cfg_pred = nn_ + cfg * (pn - nn_)
    for b in range(2):
        full = cfg_pred[b] * pn[b].std(ddof=1) / cfg_pred[b].std(ddof=1)
        want = rs * full + (1 - rs) * cfg_pred[b]
        np.testing.assert_allclose(pred[b], want, rtol=0, atol=1e-4)


def test_x_is_rounded_to_model_dtype():
    # 1 + 2**-10 is not a bf16 number (8 significant bits): it rounds to 1.0.
    shape = (1, 1, 1, 2, 2)
    x = torch.full(shape, 1.0 + 2.0**-10)
    tr = FakeTransformer(torch.zeros(shape))
    model = make_x0_model(tr, cfg=1.0, rescale=0.0, dtype=torch.bfloat16)
    x0 = model(x, torch.tensor([0.5]))
    assert x0.dtype == torch.float32
    # Zero velocity: x0 is x itself, but rounded to bf16 first (parity).
    assert torch.equal(x0, torch.ones(shape))
    assert not torch.equal(x0, x)
    _, hs, ts = tr.calls[0]
    assert hs.dtype == torch.bfloat16 and ts.dtype == torch.bfloat16
    assert ts.item() == 500.0


# ---------------------------------------------------------------- UniPC


def _sigma_b(x, s):
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def _run(model, x, sigmas):
    """Run the sampler, returning (result, per-iteration callback payloads)."""
    seen = []
    out = sample_unipc(model, x, sigmas, callback=lambda d: seen.append(dict(d)))
    return out, seen


def test_constant_x0_is_solved_exactly():
    shape = (2, 4, 3, 5, 6)
    x_init = _rand(*shape, seed=12)
    c = _rand(*shape, seed=13)
    sigmas = section_sigmas(25, 9, 80, 80)

    def model(x, s):
        return c.clone()

    _, seen = _run(model, x_init, sigmas)
    assert [d["i"] for d in seen] == list(range(25))
    s0 = sigmas[0].item()
    for d in seen:
        s = sigmas[d["i"]].item()
        exact = c + (s / s0) * (x_init - c)
        torch.testing.assert_close(d["x"], exact, rtol=0, atol=1e-5)
        assert torch.equal(d["denoised"], c)


# x0(sigma) = a + b sigma + c sigma^2, independent of x. With the integrating
# factor 1/sigma: d(x/sigma)/dsigma = -x0(sigma)/sigma^2, so from sigma0 to s
#   x(s) = s x(sigma0)/sigma0 + a (1 - s/sigma0) - b s ln(s/sigma0) - c s (s - sigma0).
POLY = (0.3, -0.7, 0.9)


def _poly_model(x, s):
    a, b, c = POLY
    sb = _sigma_b(x, s)
    return (a + b * sb + c * sb * sb).expand_as(x).clone()


def _poly_exact(x_init, s0, s):
    a, b, c = POLY
    return s * x_init / s0 + a * (1 - s / s0) - b * s * math.log(s / s0) - c * s * (s - s0)


# Gaussian data x0 ~ N(0, sd^2): E[x0 | x] = (1-s) sd^2 / v(s) * x with
# v(s) = (1-s)^2 sd^2 + s^2, and the probability-flow ODE keeps x / sqrt(v)
# constant: x(s) = x(s0) sqrt(v(s) / v(s0)). An x-dependent known answer.
SD = 0.5


def _gauss_var(s):
    return (1 - s) ** 2 * SD**2 + s**2


def _gauss_model(x, s):
    sb = _sigma_b(x, s)
    return (1 - sb) * SD**2 / _gauss_var(sb) * x


def _gauss_exact(x_init, s0, s):
    return x_init * math.sqrt(_gauss_var(s) / _gauss_var(s0))


def _loglinear_sigmas(n, s_end):
    """n sigmas from 1 to s_end, uniform in lambda = -log sigma, then a final 0."""
    s = torch.exp(torch.linspace(0.0, math.log(s_end), n, dtype=torch.float64))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def _shifted_sigmas(n, s_end, shift=3.0):
    """n sigmas from 1 to s_end, shifted-uniform in t (like the Flux schedule), then 0."""
    t_end = s_end / (shift - (shift - 1) * s_end)
    t = torch.linspace(1.0, t_end, n, dtype=torch.float64)
    s = shift * t / (1 + (shift - 1) * t)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def _final_error(model, exact, sigmas, x_init):
    _, seen = _run(model, torch.tensor([[[[[x_init]]]]], dtype=torch.float64), sigmas)
    s_last = sigmas[-2].item()
    assert seen[-1]["i"] == len(sigmas) - 2
    return abs(seen[-1]["x"].item() - exact(x_init, sigmas[0].item(), s_last))


def _slope(ns, errs):
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


STEP_COUNTS = [8, 16, 32, 64]


# Schedules to a fixed final sigma 0.02 (0.1 for the shifted one). The shifted
# schedule spends its steps at high noise, so its last steps are long in lambda
# and it reaches the asymptotic regime later; shift 3 to 0.1 is in it at 8 steps.
CONVERGENCE_CASES = {
    "poly-loglinear": (_poly_model, _poly_exact, lambda n: _loglinear_sigmas(n, 0.02)),
    "gauss-loglinear": (_gauss_model, _gauss_exact, lambda n: _loglinear_sigmas(n, 0.02)),
    "poly-shifted": (_poly_model, _poly_exact, lambda n: _shifted_sigmas(n, 0.1, 3.0)),
}


@pytest.mark.parametrize("case", list(CONVERGENCE_CASES))
def test_unipc_converges_at_third_order(case):
    model, exact, make_sigmas = CONVERGENCE_CASES[case]
    errs = [_final_error(model, exact, make_sigmas(n), 1.5) for n in STEP_COUNTS]
    assert all(e > 0 for e in errs)
    slope = _slope(STEP_COUNTS, errs)
    assert slope <= -2.5, (slope, errs)
    assert errs[-1] < 5e-5, errs


def _first_order_error(model, exact, sigmas, x_init):
    """Exponential Euler (DDIM-like): x0 frozen over each step, same model calls."""
    x = torch.tensor([[[[[x_init]]]]], dtype=torch.float64)
    for k in range(len(sigmas) - 2):
        s, t = sigmas[k : k + 1], sigmas[k + 1 : k + 2]
        x = (t / s).item() * x + (1 - (t / s).item()) * model(x, s)
    return abs(x.item() - exact(x_init, sigmas[0].item(), sigmas[-2].item()))


def test_first_order_variant_is_worse():
    uni = [_final_error(_poly_model, _poly_exact, _loglinear_sigmas(n, 0.02), 1.5) for n in STEP_COUNTS]
    first = [_first_order_error(_poly_model, _poly_exact, _loglinear_sigmas(n, 0.02), 1.5) for n in STEP_COUNTS]
    assert -1.5 < _slope(STEP_COUNTS, first) < -0.5
    for u, f in zip(uni, first):
        assert u < f / 10


class CountingModel:
    """An x-dependent model returning a fresh tensor each call; records calls."""

    def __init__(self):
        self.sigmas, self.outputs = [], []

    def __call__(self, x, s):
        self.sigmas.append(s.clone())
        out = 0.6 * x * (1 - _sigma_b(x, s)) + 0.1 * torch.sin(x)
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 25])
def test_model_calls_and_return_value(steps):
    sigmas = flux_sigmas(steps, math.log(7.0))
    m = CountingModel()
    x = _rand(2, 3, 2, 4, 4, seed=14)
    out, seen = _run(m, x, sigmas)
    assert len(m.outputs) == steps
    # One call per sigma except the final 0, in order, with a (B,) sigma.
    for k, s in enumerate(m.sigmas):
        assert s.shape == (2,)
        assert torch.equal(s, sigmas[k].expand(2))
    assert torch.equal(out, m.outputs[-1])
    assert torch.equal(seen[-1]["denoised"], out)
    assert len(seen) == steps
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_float32_close_to_float64():
    sigmas = flux_sigmas(12, math.log(7.0))
    x = _rand(1, 2, 2, 3, 3, seed=15)
    out32 = sample_unipc(CountingModel(), x, sigmas)
    out64 = sample_unipc(CountingModel(), x.double(), sigmas.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)


def test_deterministic():
    sigmas = section_sigmas(10, 9, 8, 8)
    x = _rand(2, 3, 2, 4, 4, seed=16)
    a = sample_unipc(CountingModel(), x, sigmas)
    b = sample_unipc(CountingModel(), x.clone(), sigmas.clone())
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sigmas",
    [
        torch.tensor([1.0]),
        torch.tensor([]),
        torch.tensor([[1.0, 0.5, 0.0]]),
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([0.5, 1.0, 0.0]),
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([1.0, 0.5, -0.1]),
        torch.tensor([1.0, float("nan"), 0.0]),
    ],
    ids=["one", "empty", "2d", "equal", "increasing", "zero-inside", "negative", "nan"],
)
def test_invalid_sigmas_raise(sigmas):
    def model(x, s):  # never reached
        raise AssertionError("model called")

    with pytest.raises(ValueError):
        sample_unipc(model, torch.zeros(1, 1, 1, 1, 1), sigmas)
