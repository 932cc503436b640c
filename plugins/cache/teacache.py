"""Step cache `teacache`: the original FramePack's TeaCache (SPEC.md section 5).

Per CFG branch, per section:

- measure m = transformer_blocks[0].norm1(hidden_states, temb)[0], the first
  double block's AdaLayerNormZero output over the whole packed image sequence
  (B, L_img, C);
- on the first and last step of the section: compute, accumulator := 0;
- otherwise: acc += poly(mean|m - m_prev| / mean|m_prev|) and compute iff
  acc >= rel_l1_thresh (then acc := 0);
- m_prev := m on every call, computed or skipped;
- compute: run all 60 blocks and keep residual = out - in (image stream);
  skip: out = in + residual. The text stream is left as it came in: the
  output head reads only the last image tokens.

The only departure from the original: the polynomial's value is floored at 0
before it is added. HunyuanVideo's polynomial is never below 0.052 for
inputs >= 0, so this changes nothing with the default coefficients; a fitted
polynomial can dip below zero between or beyond its data, and a negative
"output change" would make the accumulator run backwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from framepack.backends import CacheBackend
from framepack.caching.blockcache import BlockCache, rel_l1, weights_on
from framepack.errors import ConfigError
from framepack.hookspecs import hookimpl

# HunyuanVideo's coefficients, highest degree first; the original never refitted them.
HUNYUAN_COEFFICIENTS = (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)


@dataclass(frozen=True)
class TeaCacheOptions:
    rel_l1_thresh: float = 0.15  # 0.1 is about 1.6x, 0.15 about 2.1x on the real model
    coefficients: Any = HUNYUAN_COEFFICIENTS  # 5 numbers, highest degree first
    calibration: str = ""  # path of a `framepack calibrate --cache teacache` file; its fit replaces coefficients

    def __post_init__(self) -> None:
        where = "options.teacache"
        if not (math.isfinite(self.rel_l1_thresh) and self.rel_l1_thresh >= 0):
            raise ConfigError(f"{where}: rel_l1_thresh must be a number >= 0, got {self.rel_l1_thresh!r}")
        c = self.coefficients
        if not (
            isinstance(c, (list, tuple))
            and len(c) == 5
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c)
        ):
            raise ConfigError(f"{where}: coefficients must be a list of 5 numbers, highest degree first, got {c!r}")
        object.__setattr__(self, "rel_l1_thresh", float(self.rel_l1_thresh))
        object.__setattr__(self, "coefficients", tuple(float(v) for v in c))
        if self.calibration:
            if self.coefficients != HUNYUAN_COEFFICIENTS:
                raise ConfigError(f"{where}: give either coefficients or calibration, not both")
            from framepack.caching.calibration import load_calibration

            load_calibration(self.calibration, "teacache")  # fail at assembly, not after the models load


def poly(coefficients: tuple[float, ...], x: float) -> float:
    """Horner's rule, highest degree first: numpy.poly1d(coefficients)(x)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


@dataclass
class BranchState:
    accumulated: float = 0.0
    previous_modulated: Any = None  # (B, L_img, C)
    residual: Any = None  # (B, L_img, C), from the last computed step


class TeaCache(BlockCache):
    def __init__(self, rel_l1_thresh: float, coefficients: tuple[float, ...], fingerprint: str = "") -> None:
        super().__init__()
        self.rel_l1_thresh = rel_l1_thresh
        self.coefficients = tuple(coefficients)
        self.fingerprint = fingerprint  # of the model the coefficients were fitted on ("" = not fitted here)

    def bind(self, transformer) -> None:
        if self.fingerprint:
            from framepack.caching.calibration import warn_if_other_model

            warn_if_other_model(transformer, self.fingerprint, "teacache")
        super().bind(transformer)

    def new_state(self) -> BranchState:
        return BranchState()

    def decide(self, state: BranchState, blocks, call, branch, step, steps):
        with weights_on(blocks.first.norm1, call.hidden_states.device):  # the block may be offloaded
            modulated = blocks.first.norm1(call.hidden_states, emb=call.temb)[0]  # (B, L_img, C)
        if step == 0 or step == steps - 1 or state.residual is None:
            compute = True
            state.accumulated = 0.0
        else:
            rel = rel_l1(modulated, state.previous_modulated)
            state.accumulated += max(poly(self.coefficients, rel), 0.0)
            compute = state.accumulated >= self.rel_l1_thresh
            if compute:
                state.accumulated = 0.0
        state.previous_modulated = modulated
        if not compute:
            return call.hidden_states + state.residual, call.encoder_hidden_states, False
        hidden_states, encoder_hidden_states = blocks.run(call)
        state.residual = hidden_states - call.hidden_states
        return hidden_states, encoder_hidden_states, True


def make_cache(options: TeaCacheOptions) -> TeaCache:
    if not options.calibration:
        return TeaCache(options.rel_l1_thresh, options.coefficients)
    from framepack.caching.calibration import load_calibration

    payload = load_calibration(options.calibration, "teacache")
    fitted = tuple(float(v) for v in payload["data"]["coefficients"])
    return TeaCache(options.rel_l1_thresh, fitted, str(payload.get("model", {}).get("fingerprint", "")))


@hookimpl
def framepack_register_cache(register):
    register(
        CacheBackend(
            name="teacache",
            make_cache=make_cache,
            options=TeaCacheOptions,
            description="TeaCache as the original: skip all 60 blocks while the accumulated input change is small",
        )
    )
