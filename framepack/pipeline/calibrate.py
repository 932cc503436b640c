"""`framepack calibrate`: measure an uncached generation, fit a cache, write the file.

The run is an ordinary job (``assemble`` + ``generate``) whose step cache is
``calibration-recorder``: it computes every call, so the latents are those of
the uncached run, and records at the block gate what the caches need:

- TeaCache: per step, the change of the first block's modulated input
  (x = mean|m_i - m_{i-1}| / mean|m_{i-1}|, exactly as the cache measures it)
  and of the model output (y = the same for the velocity). The polynomial is
  the least-squares fit of y on x.
- MagCache: per step, mean over tokens of |residual_i| / |residual_{i-1}|,
  the residual of all 60 blocks on the image stream; averaged over sections
  per step and CFG branch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from framepack.backends import CacheBackend
from framepack.caching.blockcache import BlockCache, BlockCall, CachedBlocks, rel_l1, weights_on
from framepack.caching.calibration import CACHES, fit_polynomial, model_fingerprint, new_payload, write_calibration
from framepack.errors import UserError
from framepack.hookspecs import hookimpl
from framepack.pipeline.sections import section_count

RECORDER = "calibration-recorder"
MIN_PAIRS = 6  # one more point than the polynomial has coefficients


@dataclass
class Measurement:
    section: int
    branch: str
    step: int
    input_change: float | None  # TeaCache's x; None on a branch's first step
    output_change: float | None  # relative L1 change of the velocity
    magnitude_ratio: float | None  # MagCache's ratio


@dataclass
class RecorderState:
    modulated: Any = None  # (B, L_img, C)
    residual: Any = None  # (B, L_img, C)
    output: Any = None  # (B, 16, T, h, w) velocity
    pending: dict | None = None


class CalibrationRecorder(BlockCache):
    """Computes every call (the uncached result) and records measurements."""

    def __init__(self) -> None:
        super().__init__()
        self.measurements: list[Measurement] = []
        self.fingerprint = ""

    def bind(self, transformer) -> None:
        self.fingerprint = model_fingerprint(transformer)
        super().bind(transformer)

    def new_state(self) -> RecorderState:
        return RecorderState()

    def decide(self, state: RecorderState, blocks: CachedBlocks, call: BlockCall, branch, step, steps):
        with weights_on(blocks.first.norm1, call.hidden_states.device):
            modulated = blocks.first.norm1(call.hidden_states, emb=call.temb)[0]  # (B, L_img, C)
        hidden_states, encoder_hidden_states = blocks.run(call)
        residual = hidden_states - call.hidden_states
        pending = {"input_change": None, "magnitude_ratio": None}
        if state.modulated is not None:
            pending["input_change"] = rel_l1(modulated, state.modulated)
            # Per-token L2 norms over channels: (B, L_img); float32 so bf16 sums do not round.
            ratio = residual.float().norm(dim=-1) / state.residual.float().norm(dim=-1)
            pending["magnitude_ratio"] = ratio.mean().item()
        state.modulated, state.residual, state.pending = modulated, residual, pending
        return hidden_states, encoder_hidden_states, True

    def __call__(self, forward, *, branch, step, steps, **inputs):
        output = super().__call__(forward, branch=branch, step=step, steps=steps, **inputs)
        state = self.states[branch]
        change = None if state.output is None else rel_l1(output.float(), state.output)
        self.measurements.append(Measurement(self.section, branch, step, state.pending["input_change"], change, state.pending["magnitude_ratio"]))
        state.output = output.float()
        return output


class RecorderPlugin:
    """Registers one recorder object as the cache ``calibration-recorder``."""

    def __init__(self, recorder: CalibrationRecorder) -> None:
        self.recorder = recorder

    @hookimpl
    def framepack_register_cache(self, register):
        register(CacheBackend(name=RECORDER, make_cache=lambda options: self.recorder,
                              description="records what the caches need; computes every step"))


def teacache_data(measurements: list[Measurement]) -> dict[str, Any]:
    pairs = [[m.input_change, m.output_change] for m in measurements if m.input_change is not None]
    if len(pairs) < MIN_PAIRS:
        raise UserError(
            f"calibration measured {len(pairs)} step changes; fitting TeaCache's polynomial needs at least {MIN_PAIRS} "
            "(use more --steps or --seconds)"
        )
    import numpy as np

    x, y = (np.asarray(v) for v in zip(*pairs))
    try:
        coefficients = fit_polynomial(x, y)
    except ValueError as exc:
        raise UserError(f"cannot fit TeaCache's polynomial: {exc}") from None
    fitted = np.polyval(coefficients, x)
    return {
        "coefficients": coefficients,
        "degree": len(coefficients) - 1,
        "rms_error": float(np.sqrt(np.mean((fitted - y) ** 2))),
        "input_range": [float(x.min()), float(x.max())],
        "pairs": [[float(a), float(b)] for a, b in pairs],
        "note": "coefficients: least-squares fit of output change on input change, highest degree first",
    }


def magcache_data(measurements: list[Measurement], steps: int) -> dict[str, Any]:
    import numpy as np

    ratios, spread = {}, {}
    for branch in sorted({m.branch for m in measurements}):
        per_step = [[m.magnitude_ratio for m in measurements if m.branch == branch and m.step == i and m.magnitude_ratio is not None]
                    for i in range(steps)]
        if steps > 1 and not all(per_step[1:]):
            raise UserError(f"calibration missed steps of the {branch} branch; was the run interrupted?")
        ratios[branch] = [1.0] + [float(np.mean(v)) for v in per_step[1:]]
        spread[branch] = [0.0] + [float(np.std(v)) for v in per_step[1:]]
        if not all(np.isfinite(ratios[branch])) or min(ratios[branch]) <= 0:
            raise UserError(f"calibration measured unusable magnitude ratios for the {branch} branch (zero or non-finite residuals)")
    sections = len({m.section for m in measurements})
    return {"ratios": ratios, "std": spread, "steps": steps, "sections": sections,
            "note": "ratios: per step, mean over tokens and sections of |residual_i| / |residual_(i-1)|; step 0 is 1"}


def run_calibration(
    settings,
    cache: str,
    output: Path,
    profile: str | None = None,
    overrides: Iterable[str] = (),
    config_files: Iterable[Path] = (),
    hardware=None,
    extra_plugins: Iterable[Any] = (),
    include_user_files: bool = True,
    store=None,
) -> dict[str, Any]:
    """Run ``settings`` uncached with the recorder, fit ``cache``, write ``output``.

    ``settings.output`` is ignored: the video goes to a temporary folder.
    ``store`` is a warm pipeline's model store (framepack.pipeline.warm)."""
    from framepack.engine.assemble import assemble
    from framepack.pipeline.generate import generate, preflight
    from framepack.output.writing import check_output_path

    if cache not in CACHES:
        raise UserError(f"--cache {cache!r}: can calibrate {', '.join(CACHES)}")
    settings.validate()
    # Say so before a long run that cannot give enough measurements.
    sections = section_count(settings.seconds, settings.latent_window_size)
    changes = sections * (settings.steps - 1) * (2 if settings.cfg != 1 else 1)
    if cache == "teacache" and changes < MIN_PAIRS:
        raise UserError(
            f"--steps {settings.steps} over {sections} section(s) gives {changes} step changes; fitting TeaCache's "
            f"polynomial needs at least {MIN_PAIRS} (use more --steps or --seconds)"
        )
    if cache == "magcache" and settings.steps < 2:
        raise UserError(f"--steps {settings.steps}: MagCache's ratios need at least 2 steps")
    output = check_output_path(Path(output))
    with tempfile.TemporaryDirectory(prefix="framepack-calibrate-") as tmp:
        job = dataclasses.replace(settings, output=Path(tmp) / "calibration.mp4", latents_out=None)
        image = preflight(job)
        recorder = CalibrationRecorder()
        engine = assemble(profile, [*overrides, f"cache={RECORDER}"], config_files, hardware,
                          extra_plugins=[RecorderPlugin(recorder), *extra_plugins], include_user_files=include_user_files)
        result = generate(job, engine, image, store=store)
    data = teacache_data(recorder.measurements) if cache == "teacache" else magcache_data(recorder.measurements, settings.steps)
    model = {"source": settings.model or "(default hub repos)", "variant": settings.variant, "fingerprint": recorder.fingerprint}
    measured = {
        "steps": settings.steps, "height": result.height, "width": result.width, "seed": settings.seed,
        "seconds": settings.seconds, "sections": result.sections, "cfg": settings.cfg, "gs": settings.gs,
        "latent_window_size": settings.latent_window_size, "dtype": engine.profile.dtype["transformer"],
        "prompt": settings.prompt, "image": str(settings.image),
    }
    payload = new_payload(cache, model, measured, data)
    write_calibration(output, payload)
    return payload
