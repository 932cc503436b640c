"""Step cache `magcache`: MagCache (Ma et al. 2025, arXiv 2506.09045).

The residual of all 60 blocks (out - in, image stream) shrinks in magnitude
step by step in a way that is nearly the same for every prompt; a calibration
run measures the per-step ratio r_i = mean over tokens of
|residual_i| / |residual_{i-1}|. Reusing the last computed residual at step i
is then wrong by about |1 - (product of r since that step)|. Per CFG branch,
per section:

- the first max(1, int(retention_ratio * steps)) steps are always computed;
- after that: ratio *= r_step; skips += 1; err += |1 - ratio|; skip iff
  err < threshold and skips <= max_skips (and a residual exists), else
  compute and reset ratio = 1, skips = 0, err = 0;
- skip: out = in + cached residual; compute: run the blocks and cache the
  residual.

The ratios come from a calibration file (``framepack calibrate --cache
magcache``) or the ``mag_ratios`` option; a different step count is
interpolated (framepack.caching.calibration.interpolate_ratios). The comparison is
strict, as in MagCache's own code, so threshold 0 never skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from framepack.backends import CacheBackend
from framepack.caching.blockcache import BlockCache
from framepack.errors import ConfigError
from framepack.hookspecs import hookimpl


@dataclass(frozen=True)
class MagCacheOptions:
    threshold: float = 0.1  # largest accumulated magnitude error a skip may add
    max_skips: int = 3  # most consecutive skipped steps (K in the paper)
    retention_ratio: float = 0.2  # this fraction of the first steps is always computed
    calibration: str = ""  # path of a `framepack calibrate --cache magcache` file
    mag_ratios: Any = ()  # or the per-step ratios themselves (step 0 first, usually 1.0)

    def __post_init__(self) -> None:
        where = "options.magcache"
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(f"{where}: threshold must be a number >= 0, got {self.threshold!r}")
        if self.max_skips < 0:
            raise ConfigError(f"{where}: max_skips must be >= 0, got {self.max_skips!r}")
        if not (math.isfinite(self.retention_ratio) and 0 <= self.retention_ratio <= 1):
            raise ConfigError(f"{where}: retention_ratio must be between 0 and 1, got {self.retention_ratio!r}")
        r = self.mag_ratios
        if not (
            isinstance(r, (list, tuple))
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in r)
        ):
            raise ConfigError(f"{where}: mag_ratios must be a list of positive numbers, got {r!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))
        object.__setattr__(self, "mag_ratios", tuple(float(v) for v in r))
        if self.calibration and self.mag_ratios:
            raise ConfigError(f"{where}: give either mag_ratios or calibration, not both")
        if not self.calibration and not self.mag_ratios:
            raise ConfigError(
                f"{where}: MagCache needs per-step magnitude ratios measured on your model: run "
                "`framepack calibrate --cache magcache ...` and set calibration = \"PATH\" "
                "(e.g. --set options.magcache.calibration=PATH), or give mag_ratios"
            )
        if self.calibration:
            from framepack.caching.calibration import load_calibration

            load_calibration(self.calibration, "magcache")  # fail at assembly, not after the models load


@dataclass
class BranchState:
    ratio: float = 1.0
    skips: int = 0
    error: float = 0.0
    residual: Any = None  # (B, L_img, C), from the last computed step


class MagCache(BlockCache):
    def __init__(self, options: MagCacheOptions, ratios: dict[str, list[float]], fingerprint: str = "") -> None:
        super().__init__()
        self.options = options
        self.ratios = ratios  # branch -> per-step ratios at the measured step count
        self.fingerprint = fingerprint
        self._per_steps: dict[tuple[str, int], list[float]] = {}

    def bind(self, transformer) -> None:
        if self.fingerprint:
            from framepack.caching.calibration import warn_if_other_model

            warn_if_other_model(transformer, self.fingerprint, "magcache")
        super().bind(transformer)

    def ratios_for(self, branch: str, steps: int) -> list[float]:
        """The branch's ratios at ``steps`` steps (a calibration made with cfg 1
        has only the positive branch; the negative one then uses it too)."""
        key = (branch, steps)
        if key not in self._per_steps:
            from framepack.caching.calibration import interpolate_ratios

            self._per_steps[key] = interpolate_ratios(self.ratios.get(branch, self.ratios["positive"]), steps)
        return self._per_steps[key]

    def new_state(self) -> BranchState:
        return BranchState()

    def decide(self, state: BranchState, blocks, call, branch, step, steps):
        o = self.options
        compute = True
        if step >= max(1, int(o.retention_ratio * steps)) and state.residual is not None:
            state.ratio *= self.ratios_for(branch, steps)[step]
            state.skips += 1
            state.error += abs(1.0 - state.ratio)
            if state.error < o.threshold and state.skips <= o.max_skips:
                compute = False
            else:
                state.ratio, state.skips, state.error = 1.0, 0, 0.0
        if not compute:
            return call.hidden_states + state.residual, call.encoder_hidden_states, False
        hidden_states, encoder_hidden_states = blocks.run(call)
        state.residual = hidden_states - call.hidden_states
        return hidden_states, encoder_hidden_states, True


def make_cache(options: MagCacheOptions) -> MagCache:
    if options.mag_ratios:
        return MagCache(options, {"positive": list(options.mag_ratios)})
    from framepack.caching.calibration import load_calibration

    payload = load_calibration(options.calibration, "magcache")
    ratios = {b: [float(v) for v in r] for b, r in payload["data"]["ratios"].items()}
    return MagCache(options, ratios, str(payload.get("model", {}).get("fingerprint", "")))


@hookimpl
def framepack_register_cache(register):
    register(
        CacheBackend(
            name="magcache",
            make_cache=make_cache,
            options=MagCacheOptions,
            description="MagCache: skip all 60 blocks while calibrated residual magnitudes say the error stays small",
        )
    )
