"""Calibration files for the step caches: format, model fingerprint, fits.

``framepack calibrate`` (framepack.pipeline.calibrate) measures an uncached run and
writes one of these; a cache's ``calibration`` option points at it.

    {
      "cache": "teacache" | "magcache",
      "format_version": 1,
      "framepack_version": "...",
      "created": "2026-01-01T12:00:00Z",
      "model": {"source": "...", "variant": "original", "fingerprint": "sha256:..."},
      "settings": {"steps": 25, "height": 640, "width": 608, "seed": 31337, ...},
      "data": {...}                         # per cache, see below
    }

TeaCache data: ``coefficients`` (degree-4 polynomial, highest degree first,
the least-squares fit of ``pairs``), ``pairs`` ([input change, output
change] per step), ``rms_error`` of the fit and the input range it saw.
MagCache data: ``ratios`` per CFG branch (mean over sections of the residual
magnitude ratio at each step; step 0 is 1.0) and ``steps``.

Files are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from framepack.errors import ConfigError

FORMAT_VERSION = 1
CACHES = ("teacache", "magcache")
TEACACHE_DEGREE = 4  # five coefficients, as HunyuanVideo's


def model_fingerprint(transformer) -> str:
    """A cheap identity of a transformer: its config plus the weights of the
    input patch embedding and the output head (a few hundred KB, not 26 GB).
    Weights are hashed as float32 so bf16 and float32 loads of one
    checkpoint agree."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for prefix in ("x_embedder", "proj_out"):
        module = getattr(transformer, prefix)
        for name, param in sorted(module.named_parameters()):
            digest.update(f"{prefix}.{name}".encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


class CalibrationMismatchWarning(UserWarning):
    """A cache uses a calibration file measured on another model."""


def warn_if_other_model(transformer, fingerprint: str, cache: str) -> None:
    """Calibrations carry over badly between models, but fine-tunes and LoRAs
    may reuse one on purpose: warn, do not stop."""
    if model_fingerprint(transformer) != fingerprint:
        warnings.warn(
            f"{cache}: the calibration file was measured on a different model (fingerprint {fingerprint}); "
            "skip decisions may not match the threshold's usual speed and quality",
            CalibrationMismatchWarning,
            stacklevel=3,
        )


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int = TEACACHE_DEGREE) -> list[float]:
    """Least-squares polynomial through the points, highest degree first."""
    import numpy as np

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(set(xs.tolist())) <= degree:
        raise ValueError(f"need at least {degree + 1} distinct input changes to fit degree {degree}, got {len(set(xs.tolist()))}")
    # Vandermonde least squares; polyfit would only warn on a rank problem.
    vander = np.vander(xs, degree + 1)
    coefficients, _, rank, _ = np.linalg.lstsq(vander, ys, rcond=None)
    if rank < degree + 1:
        raise ValueError("the measured input changes are too close together to fit the polynomial")
    return [float(c) for c in coefficients]


def interpolate_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """Per-step magnitude ratios measured with ``len(ratios)`` steps, mapped to ``steps``.

    Ratio i is |residual_i| / |residual_{i-1}|, and step i of n sits at
    position i/n of the same shifted schedule. So the log-magnitude curve
    (cumulative sum of log ratios) is interpolated linearly at the new
    positions and differenced: a step twice as long gets the product of the
    two ratios it spans. Same count -> the ratios unchanged. (MagCache's own
    code picks the nearest ratio, which ignores the step length.)
    """
    import numpy as np

    n_src = len(ratios)
    if steps == n_src:
        return [float(r) for r in ratios]
    if n_src < 2:
        return [1.0] * steps
    log_mag = np.cumsum(np.log(np.asarray(ratios, dtype=np.float64)))  # log |res_i| - log |res_0|
    src_pos = np.arange(n_src) / n_src
    new_pos = np.arange(steps) / steps
    curve = np.interp(new_pos, src_pos, log_mag)
    # Past the last measured step, continue the last segment's slope
    # (np.interp would hold the curve flat, i.e. claim ratio 1: "no change").
    slope = (log_mag[-1] - log_mag[-2]) / (src_pos[-1] - src_pos[-2])
    beyond = new_pos > src_pos[-1]
    curve[beyond] = log_mag[-1] + slope * (new_pos[beyond] - src_pos[-1])
    out = np.exp(np.diff(curve, prepend=curve[0]))
    out[0] = 1.0
    return [float(r) for r in out]


def write_calibration(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON at ``path`` atomically."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def new_payload(cache: str, model: dict[str, Any], settings: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    from framepack import __version__

    return {
        "cache": cache,
        "format_version": FORMAT_VERSION,
        "framepack_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": model,
        "settings": settings,
        "data": data,
    }


def _finite_numbers(value: Any, count: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def load_calibration(path: str | os.PathLike, cache: str) -> dict[str, Any]:
    """Read and check a calibration file for ``cache``; errors name the path."""
    path = Path(path).expanduser()
    hint = f"write one with `framepack calibrate --cache {cache} ...`"

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{cache} calibration file {path}: {problem} ({hint})")

    if not path.is_file():
        raise bad("no such file")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not readable as JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise bad("not a JSON object")
    if payload.get("cache") != cache:
        raise bad(f"it was written for cache {payload.get('cache')!r}, not {cache!r}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {payload.get('format_version')!r} is not supported (this framepack reads {FORMAT_VERSION})")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise bad("no 'data' table")
    if cache == "teacache":
        if not _finite_numbers(data.get("coefficients"), TEACACHE_DEGREE + 1):
            raise bad(f"data.coefficients must be {TEACACHE_DEGREE + 1} finite numbers")
    elif cache == "magcache":
        ratios = data.get("ratios")
        if not isinstance(ratios, dict) or not _finite_numbers(ratios.get("positive")) or not ratios["positive"]:
            raise bad("data.ratios.positive must be a non-empty list of finite numbers")
        for branch, values in ratios.items():
            if not _finite_numbers(values) or len(values) != len(ratios["positive"]) or any(v <= 0 for v in values):
                raise bad(f"data.ratios.{branch} must be {len(ratios['positive'])} positive finite numbers")
    return payload
