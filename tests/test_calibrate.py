"""`framepack calibrate` on the tiny model: the file holds what an uncached run
measures (checked against an independent measurement), the fit is a real
least-squares fit, and using the file changes the skip decisions as the
caches' rules say it must."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack.caching.calibration import fit_polynomial, interpolate_ratios, load_calibration
from framepack.cli import main
from framepack.errors import ConfigError
from framepack.pipeline.settings import JobSettings
from tests.test_caches import (
    CPU,
    SPEC_COEFFICIENTS,
    ReferenceTeaCache,
    Spy,
    make_plugin_cache,
    run,
    use,
)

STEPS, SECONDS = 8, 2.4  # 2 sections: 14 TeaCache pairs, 2 samples per MagCache ratio
PROMPT = "a cat walks"  # as tests.test_caches.run, so the runs are the same uncached run


@pytest.fixture(scope="module")
def uncached(tiny_model, test_image, tmp_path_factory):
    """The uncached run, measured by the reference cache's own hooks
    (TeaCache with threshold 0 computes every step)."""
    reference = ReferenceTeaCache(0.0)
    result = run(tiny_model, test_image, tmp_path_factory.mktemp("uncached"), seconds=SECONDS, steps=STEPS, **use("ref", reference))
    assert result.skipped_steps == [0, 0]
    return reference


@pytest.fixture(scope="module")
def teacache_file(tiny_model, test_image, tmp_path_factory) -> Path:
    """`framepack calibrate --cache teacache` through the CLI entry point."""
    folder = tmp_path_factory.mktemp("calibrate")
    path = folder / "tea.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # no ./framepack.toml from the repo
        rc = main(["calibrate", "--cache", "teacache", "--image", str(test_image), "--prompt", PROMPT,
                   "--model", str(tiny_model), "--seconds", str(SECONDS), "--steps", str(STEPS), "--size", "32x32",
                   "--profile", "cpu", "--output", str(path), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in folder.iterdir()) == ["tea.json"]  # no video, no temporary left behind
    return path


@pytest.fixture(scope="module")
def magcache_file(tiny_model, test_image, tmp_path_factory) -> Path:
    from framepack.pipeline.calibrate import run_calibration

    path = tmp_path_factory.mktemp("calibrate") / "mag.json"
    settings = JobSettings(image=test_image, prompt=PROMPT, output=Path("unused.mp4"), model=str(tiny_model),
                           seconds=SECONDS, steps=STEPS, size=(32, 32))
    run_calibration(settings, "magcache", path, profile="cpu", hardware=CPU, include_user_files=False)
    return path


# --- TeaCache ------------------------------------------------------------------


def teacache_rule(xs_per_section, steps, thresh, coefficients, floor=True):
    """SPEC section 5's decisions on a fixed sequence of input changes (x of steps 1..steps-1)."""
    poly = np.poly1d(coefficients)
    decisions = []
    for xs in xs_per_section:
        acc, out = 0.0, [True]
        for step, x in enumerate(xs, start=1):
            if step == steps - 1:
                out.append(True)
                continue
            acc += max(float(poly(x)), 0.0) if floor else float(poly(x))
            out.append(acc >= thresh)
            if out[-1]:
                acc = 0.0
        decisions += out
    return decisions


def test_teacache_file_holds_the_measured_pairs_and_their_least_squares_fit(teacache_file, uncached):
    payload = json.loads(teacache_file.read_text())
    assert payload["cache"] == "teacache" and payload["format_version"] == 1
    assert payload["model"]["fingerprint"].startswith("sha256:")
    s = payload["settings"]
    assert (s["steps"], s["height"], s["width"], s["seed"], s["sections"]) == (STEPS, 32, 32, 31337, 2)

    pairs = np.array(payload["data"]["pairs"])
    x_ref = [x for x in uncached.input_changes if x is not None]
    y_ref = [m["output_change"] for m in uncached.measured if m["output_change"] is not None]
    assert len(pairs) == len(x_ref) == 2 * (STEPS - 1)
    np.testing.assert_allclose(pairs[:, 0], x_ref, rtol=1e-6)
    np.testing.assert_allclose(pairs[:, 1], y_ref, rtol=1e-6)

    fitted = np.array(payload["data"]["coefficients"])
    x, y = pairs[:, 0], pairs[:, 1]
    best = np.polyfit(x, y, 4)
    # Least squares: no smaller squared error than numpy's own fit, same predictions.
    sse = lambda c: float(np.sum((np.polyval(c, x) - y) ** 2))  # noqa: E731
    assert sse(fitted) <= sse(best) * (1 + 1e-6) + 1e-15
    np.testing.assert_allclose(np.polyval(fitted, x), np.polyval(best, x), atol=1e-6)
    assert payload["data"]["rms_error"] == pytest.approx(np.sqrt(sse(fitted) / len(x)), rel=1e-6)


def test_teacache_calibration_changes_the_skip_decisions_accordingly(tiny_model, test_image, tmp_path, teacache_file):
    payload = json.loads(teacache_file.read_text())
    fitted = payload["data"]["coefficients"]
    xs = [x for x, _ in payload["data"]["pairs"]]
    per_section = [xs[:STEPS - 1], xs[STEPS - 1:]]
    # Until the first skip, a cached run sees exactly the uncached input changes,
    # so a threshold at which the two rules disagree on the uncached sequence
    # must make the runs decide differently.
    thresh = next(t for t in np.linspace(0.02, 0.5, 49)
                  if teacache_rule(per_section, STEPS, t, fitted) != teacache_rule(per_section, STEPS, t, SPEC_COEFFICIENTS))

    reference = ReferenceTeaCache(thresh, fitted, floor_at_zero=True)
    expected = run(tiny_model, test_image, tmp_path, seconds=SECONDS, steps=STEPS, **use("ref", reference))
    calibrated = Spy(make_plugin_cache("framepack_plugins.cache.teacache", rel_l1_thresh=float(thresh), calibration=str(teacache_file)))
    got = run(tiny_model, test_image, tmp_path, seconds=SECONDS, steps=STEPS, **use("cal", calibrated))
    default = Spy(make_plugin_cache("framepack_plugins.cache.teacache", rel_l1_thresh=float(thresh)))
    run(tiny_model, test_image, tmp_path, seconds=SECONDS, steps=STEPS, **use("default", default))

    assert calibrated.calls == reference.decisions
    assert torch.equal(got.latents, expected.latents)
    assert [c[3] for c in calibrated.calls] != [c[3] for c in default.calls]


def test_teacache_calibration_through_a_profile_override(tiny_model, test_image, tmp_path, teacache_file):
    result = run(tiny_model, test_image, tmp_path, seconds=1.0, steps=4,
                 overrides=["cache=teacache", "options.teacache.rel_l1_thresh=0", f"options.teacache.calibration='{teacache_file}'"])
    assert result.computed_steps == [4] and result.skipped_steps == [0]


# --- MagCache ------------------------------------------------------------------


def magcache_rule(ratios, steps, threshold, max_skips, retention_ratio):
    """MagCache's decisions (True = compute) from per-step ratios alone."""
    ratio, skips, err, out = 1.0, 0, 0.0, []
    for step in range(steps):
        compute = True
        if step >= max(1, int(retention_ratio * steps)):
            ratio *= ratios[step]
            skips += 1
            err += abs(1 - ratio)
            if err < threshold and skips <= max_skips:
                compute = False
            else:
                ratio, skips, err = 1.0, 0, 0.0
        out.append(compute)
    return out


def test_magcache_file_holds_the_measured_mean_ratios(magcache_file, uncached):
    payload = json.loads(magcache_file.read_text())
    assert payload["cache"] == "magcache" and payload["data"]["steps"] == STEPS
    ratios = payload["data"]["ratios"]
    assert list(ratios) == ["positive"]  # cfg 1: no negative branch ran
    for step in range(1, STEPS):
        measured = [m["residual_ratio"] for m in uncached.measured if m["step"] == step]
        assert len(measured) == 2  # one per section
        assert ratios["positive"][step] == pytest.approx(np.mean(measured), rel=1e-6)
    assert ratios["positive"][0] == 1.0


def test_magcache_calibration_drives_the_skip_decisions(tiny_model, test_image, tmp_path, magcache_file):
    ratios = load_calibration(magcache_file, "magcache")["data"]["ratios"]["positive"]
    options = dict(threshold=0.1, max_skips=3, retention_ratio=0.2)
    expected = magcache_rule(ratios, STEPS, **options)
    assert not all(expected) and sum(expected) > 1
    assert expected != magcache_rule([1.0] * STEPS, STEPS, **options)  # the ratios matter

    spy = Spy(make_plugin_cache("framepack_plugins.cache.magcache", calibration=str(magcache_file), **options))
    result = run(tiny_model, test_image, tmp_path, seconds=SECONDS, steps=STEPS, **use("spy", spy))
    assert [c[3] for c in spy.calls] == expected * 2  # both sections
    assert result.skipped_steps == [expected.count(False)] * 2


def test_ratio_interpolation_keeps_the_magnitude_curve():
    ratios = [1.0, 0.9, 1.1, 1.05, 0.95, 1.2, 0.8, 1.0]
    assert interpolate_ratios(ratios, 8) == ratios
    # Twice the steps: each old step is split in two whose product is the old ratio.
    doubled = interpolate_ratios(ratios, 16)
    assert doubled[0] == 1.0
    for i in range(1, 8):
        assert doubled[2 * i - 1] * doubled[2 * i] == pytest.approx(ratios[i], rel=1e-12)
    # Half the steps: each new step spans two old ones.
    halved = interpolate_ratios(ratios, 4)
    assert halved[1:] == pytest.approx([ratios[1] * ratios[2], ratios[3] * ratios[4], ratios[5] * ratios[6]], rel=1e-12)


def test_fit_recovers_a_known_polynomial():
    x = np.linspace(0.01, 0.3, 25)
    assert fit_polynomial(x, np.poly1d(SPEC_COEFFICIENTS)(x)) == pytest.approx(SPEC_COEFFICIENTS, rel=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        fit_polynomial([0.1, 0.1, 0.2, 0.2, 0.3, 0.3], [1, 1, 2, 2, 3, 3])


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable as JSON"),
    ('{"cache": "magcache", "format_version": 1, "data": {}}', "written for cache 'magcache'"),
    ('{"cache": "teacache", "format_version": 99, "data": {}}', "format_version 99"),
    ('{"cache": "teacache", "format_version": 1, "data": {"coefficients": [1, 2]}}', "coefficients must be 5"),
])
def test_malformed_calibration_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        make_plugin_cache("framepack_plugins.cache.teacache", calibration=str(path))
    assert str(path) in str(info.value)


def test_magcache_ratios_must_be_positive(tmp_path):
    path = tmp_path / "mag.json"
    path.write_text('{"cache": "magcache", "format_version": 1, "data": {"ratios": {"positive": [1.0, 0.0]}}}')
    with pytest.raises(ConfigError, match="positive finite"):
        load_calibration(path, "magcache")


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "missing.png"),
    (["--steps", "2", "--seconds", "1"], "needs at least 6"),
])
def test_calibrate_cli_bad_input_exits_2(tiny_model, test_image, run_in_tmp, capsys, args, message):
    base = {"--image": str(test_image), "--steps": "8", "--seconds": "1"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["calibrate", "--cache", "teacache", "--prompt", "x", "--model", str(tiny_model), "--profile", "cpu", "--quiet"]
    for key, value in base.items():
        argv += [key, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(run_in_tmp.iterdir())
