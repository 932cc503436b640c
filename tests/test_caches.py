"""Step caches on the tiny model: exactness at threshold 0, TeaCache against a
plain re-statement of SPEC.md section 5, one state per CFG branch, MagCache's
and the first-block cache's rules, options and the block gate.

The reference caches here compute every call in full (hooks read what they
need) and, where their rule says skip, replace the output by the model's
head applied to input + cached residual. They share no code with the plugins.
"""

from __future__ import annotations

import importlib
from importlib import metadata

import numpy as np
import pytest
import torch

from framepack.engine.assemble import assemble
from framepack.backends import CacheBackend
from framepack.errors import ConfigError
from framepack.pipeline.generate import generate
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack.pipeline.settings import JobSettings
from framepack.caching.stepcache import CacheCounts

CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)
SIZE = (32, 32)  # 4x4 latents: the VAE decode, not the transformer, dominates the run time
SPEC_COEFFICIENTS = [733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896]
CACHE_MODULES = ("framepack_plugins.cache.teacache", "framepack_plugins.cache.magcache", "framepack_plugins.cache.first_block")


def cache_plugins() -> list:
    """The cache plugin modules that are not (yet) installed as entry points."""
    declared = {ep.value for ep in metadata.entry_points(group="framepack")}
    return [importlib.import_module(m) for m in CACHE_MODULES if m not in declared]


def run(tiny_model, image, tmp_path, overrides=(), plugins=(), **kw):
    settings = dict(seconds=2.4, steps=6, size=SIZE, seed=31337, variant="original")
    settings.update(kw)
    engine = assemble(profile_name="cpu", overrides=list(overrides), hardware=CPU,
                      extra_plugins=[*cache_plugins(), *plugins], include_user_files=False)
    out = tmp_path / f"v{len(list(tmp_path.iterdir()))}.mp4"
    job = JobSettings(image=image, prompt="a cat walks", output=out, model=str(tiny_model), **settings)
    return generate(job, engine)


class CachePlugin:
    """Registers one ready-made cache object under ``name``."""

    def __init__(self, name, cache) -> None:
        self.name, self.cache = name, cache

    @hookimpl
    def framepack_register_cache(self, register):
        register(CacheBackend(name=self.name, make_cache=lambda options: self.cache))


def use(name, cache):
    return dict(overrides=[f"cache={name}"], plugins=[CachePlugin(name, cache)])


# --- observing a cache from outside ------------------------------------------


class Spy:
    """Wraps a cache; a forward hook on the LAST block tells, per call,
    whether the blocks really ran (independent of what the cache reports)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, str, int, bool]] = []  # (section, branch, step, blocks ran)
        self.section = -1
        self._last_block_runs = 0

    @property
    def counts(self) -> CacheCounts:
        return self.inner.counts

    def bind(self, transformer) -> None:
        def seen(module, args, output):
            self._last_block_runs += 1

        transformer.single_transformer_blocks[-1].register_forward_hook(seen)
        self.inner.bind(transformer)

    def begin_section(self, steps) -> None:
        self.section += 1
        self.inner.begin_section(steps)

    def __call__(self, forward, *, branch, step, steps, **inputs):
        before = self._last_block_runs
        out = self.inner(forward, branch=branch, step=step, steps=steps, **inputs)
        self.calls.append((self.section, branch, step, self._last_block_runs > before))
        return out


def make_plugin_cache(module: str, **options):
    """Build a plugin's cache object the way the engine does (options dataclass + make_cache)."""
    mod = importlib.import_module(module)
    found = []
    mod.framepack_register_cache(register=found.append)
    backend = found[0]
    return backend.make_cache(backend.options(**options))


# --- reference caches (compute everything, substitute where the rule skips) ----


class ReferenceSkipper:
    """Runs every call in full; hooks capture the first block's input and
    ``temb`` and the last block's output. Where ``rule`` says skip, the
    output is rebuilt from input + the residual cached at the last computed
    call, through diffusers' output head (norm_out, proj_out, unpatchify)."""

    def __init__(self, shared_state: bool = False) -> None:
        self.counts = CacheCounts()
        self.shared_state = shared_state
        self.decisions: list[tuple[int, str, int, bool]] = []
        self.measured: list[dict] = []  # per call: branch, step, modulated input and output changes
        self.section = -1

    def bind(self, transformer) -> None:
        self.t = transformer
        first, last = transformer.transformer_blocks[0], transformer.single_transformer_blocks[-1]

        def on_first(module, args):
            hidden_states, _, temb = args[:3]
            self.hs_in, self.temb = hidden_states, temb
            self.modulated = module.norm1(hidden_states, emb=temb)[0]

        def on_last(module, args, output):
            self.hs_out = output[0]

        first.register_forward_pre_hook(on_first)
        last.register_forward_hook(on_last)

    def begin_section(self, steps) -> None:
        self.section += 1
        self.counts = CacheCounts()
        self.state = {}

    def head(self, hidden_states, latent_shape):
        t = self.t
        b, _, frames, height, width = latent_shape
        p = t.config.patch_size
        tokens = frames * (height // p) * (width // p)
        x = t.proj_out(t.norm_out(hidden_states[:, -tokens:], self.temb))  # (B, tokens, 16 * p * p)
        x = x.reshape(b, frames, height // p, width // p, -1, 1, p, p)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def rule(self, st: dict, branch: str, step: int, steps: int) -> bool:
        raise NotImplementedError

    def __call__(self, forward, *, branch, step, steps, **inputs):
        out = forward(**inputs)
        st = self.state.setdefault("shared" if self.shared_state else branch, {})
        compute = self.rule(st, branch, step, steps)
        residual = self.hs_out - self.hs_in
        prev = st.get("out")
        self.measured.append({
            "section": self.section, "branch": branch, "step": step,
            "residual_ratio": None if "residual" not in st else
            (residual.float().norm(dim=-1) / st["residual"].float().norm(dim=-1)).mean().item(),
            "output_change": None if prev is None else ((out - prev).abs().mean() / prev.abs().mean()).item(),
        })
        st["out"] = out
        if compute:
            st["residual"] = residual
        else:
            out = self.head(self.hs_in + st["residual"], inputs["hidden_states"].shape)
        self.counts.computed += compute
        self.counts.skipped += not compute
        self.decisions.append((self.section, branch, step, compute))
        return out


class ReferenceTeaCache(ReferenceSkipper):
    """SPEC.md section 5, read literally."""

    def __init__(self, rel_l1_thresh, coefficients=SPEC_COEFFICIENTS, floor_at_zero=False, shared_state=False):
        super().__init__(shared_state)
        self.thresh = rel_l1_thresh
        self.poly = np.poly1d(coefficients)
        self.floor_at_zero = floor_at_zero  # docs/caches.md: fitted polynomials are floored at 0
        self.input_changes: list[float | None] = []

    def rule(self, st, branch, step, steps):
        m, prev = self.modulated, st.get("prev")
        rel = None if step == 0 else ((m - prev).abs().mean() / prev.abs().mean()).item()
        if step == 0 or step == steps - 1:
            compute, st["acc"] = True, 0.0
        else:
            value = float(self.poly(rel))
            st["acc"] += max(value, 0.0) if self.floor_at_zero else value
            compute = st["acc"] >= self.thresh
            if compute:
                st["acc"] = 0.0
        self.input_changes.append(rel)
        st["prev"] = m
        return compute


class ReferencePattern(ReferenceSkipper):
    """Skips exactly where a given pattern says: pattern[step] is True = compute."""

    def __init__(self, pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def rule(self, st, branch, step, steps):
        return self.pattern[step]


def calls_of(decisions):
    return [d[3] for d in decisions]


# --- threshold 0: exact ------------------------------------------------------


@pytest.fixture(scope="module")
def uncached_cfg(tiny_model, test_image, tmp_path_factory):
    return run(tiny_model, test_image, tmp_path_factory.mktemp("base"), steps=4, cfg=2.0, negative_prompt="blurry")


@pytest.mark.parametrize("cache, options", [
    ("teacache", ["options.teacache.rel_l1_thresh=0"]),
    # All-ones ratios are the most skip-prone MagCache can be given: zero predicted error.
    ("magcache", ["options.magcache.threshold=0", "options.magcache.retention_ratio=0",
                  "options.magcache.mag_ratios=[1.0, 1.0, 1.0, 1.0]"]),
    ("first_block", ["options.first_block.threshold=0"]),
])
def test_threshold_zero_computes_every_step_bit_for_bit(tiny_model, test_image, tmp_path, uncached_cfg, cache, options):
    result = run(tiny_model, test_image, tmp_path, overrides=[f"cache={cache}", *options], steps=4, cfg=2.0,
                 negative_prompt="blurry")
    assert result.skipped_steps == [0, 0]
    assert result.computed_steps == [2 * 4, 2 * 4]  # both CFG branches, every step, both sections
    assert torch.equal(result.latents, uncached_cfg.latents)


# --- TeaCache = SPEC section 5 -----------------------------------------------


def test_teacache_follows_spec_section_5(tiny_model, test_image, tmp_path):
    steps, thresh = 8, 0.1
    reference = ReferenceTeaCache(thresh)
    expected = run(tiny_model, test_image, tmp_path, steps=steps, **use("ref", reference))
    spy = Spy(make_plugin_cache("framepack_plugins.cache.teacache", rel_l1_thresh=thresh))
    got = run(tiny_model, test_image, tmp_path, steps=steps, **use("spy", spy))

    pattern = calls_of(reference.decisions)
    # The threshold makes a real pattern: first and last computed, some middle steps skipped, some not.
    for section in range(2):
        per_step = pattern[section * steps:(section + 1) * steps]
        assert per_step[0] and per_step[-1]
        assert not all(per_step[1:-1]) and any(per_step[1:-1])
    assert spy.calls == reference.decisions  # the blocks really ran exactly where SPEC says compute
    assert spy.inner.history == reference.decisions  # and the cache reports the same
    assert got.skipped_steps == expected.skipped_steps == [pattern[:steps].count(False), pattern[steps:].count(False)]
    assert got.computed_steps == expected.computed_steps
    assert torch.equal(got.latents, expected.latents)


def test_teacache_keeps_one_state_per_cfg_branch(tiny_model, test_image, tmp_path):
    steps, thresh = 8, 0.1
    cfg = dict(cfg=2.0, negative_prompt="blurry, static", seconds=1.0, steps=steps)
    per_branch = ReferenceTeaCache(thresh)
    expected = run(tiny_model, test_image, tmp_path, **cfg, **use("ref", per_branch))
    shared = ReferenceTeaCache(thresh, shared_state=True)
    run(tiny_model, test_image, tmp_path, **cfg, **use("shared", shared))
    spy = Spy(make_plugin_cache("framepack_plugins.cache.teacache", rel_l1_thresh=thresh))
    got = run(tiny_model, test_image, tmp_path, **cfg, **use("spy", spy))

    # A shared state measures the positive call against the negative one: other decisions.
    assert calls_of(shared.decisions) != calls_of(per_branch.decisions)
    assert spy.calls == per_branch.decisions
    assert any(not d[3] for d in spy.calls if d[1] == "negative")  # the negative branch skips too
    assert torch.equal(got.latents, expected.latents)


# --- MagCache and first-block rules ------------------------------------------


def test_magcache_skips_by_its_rule(tiny_model, test_image, tmp_path):
    # Worked by hand with threshold 0.1, K = 2, retention 0.25 of 8 steps = 2 steps:
    # step 2: ratio 1.02, err .02 -> skip (1)    step 3: ratio 1.0404, err .0604 -> skip (2)
    # step 4: ratio 1.0612, err .1216 -> compute, reset    step 5: ratio 1.3, err .3 -> compute, reset
    # step 6: ratio 1, err 0 -> skip (1)    step 7: ratio 1, err 0 -> skip (2)
    ratios = [1.0, 1.0, 1.02, 1.02, 1.02, 1.3, 1.0, 1.0]
    pattern = [True, True, False, False, True, True, False, False]
    options = dict(threshold=0.1, max_skips=2, retention_ratio=0.25, mag_ratios=ratios)
    cfg = dict(cfg=2.0, negative_prompt="blurry", seconds=1.0, steps=8)
    reference = ReferencePattern(pattern)
    expected = run(tiny_model, test_image, tmp_path, **cfg, **use("ref", reference))
    spy = Spy(make_plugin_cache("framepack_plugins.cache.magcache", **options))
    got = run(tiny_model, test_image, tmp_path, **cfg, **use("spy", spy))
    for branch in ("positive", "negative"):
        assert [d[3] for d in spy.calls if d[1] == branch] == pattern
    assert got.skipped_steps == [8]
    assert torch.equal(got.latents, expected.latents)


def test_first_block_cache_matches_diffusers_hook(tiny_model, test_image, tmp_path):
    """Replay the calls of an uncached run through diffusers' first-block cache
    hook and through our first_block cache, on the same transformer object:
    the same output at every call."""
    from diffusers.hooks import FirstBlockCacheConfig

    from framepack.pipeline.transformer import forward_velocity

    class Keep(ReferencePattern):
        def __call__(self, forward, **kw):
            self.inputs.append({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)} | {"step": kw["step"]})
            return super().__call__(forward, **kw)

    steps, threshold = 8, 0.3
    keep = Keep([True] * steps)
    keep.inputs = []
    run(tiny_model, test_image, tmp_path, seconds=1.0, steps=steps, **use("keep", keep))
    t = keep.t
    with torch.inference_mode():
        t.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        theirs = []
        for inputs in keep.inputs:
            with t.cache_context("positive"):
                theirs.append(forward_velocity(t, **{k: v for k, v in inputs.items() if k != "step"}))
        t.disable_cache()
        ours = make_plugin_cache("framepack_plugins.cache.first_block", threshold=threshold)
        ours.bind(t)
        ours.begin_section(steps)
        for inputs, expected in zip(keep.inputs, theirs):
            step = inputs.pop("step")
            got = ours(lambda **kw: forward_velocity(t, **kw), branch="positive", step=step, steps=steps, **inputs)
            assert torch.equal(got, expected), f"step {step}"
    assert ours.counts.skipped > 0 and ours.counts.computed > 1


# --- options and the gate -----------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("options.teacache.rel_l1_tresh=0.1", "unknown key 'rel_l1_tresh'"),
    ("options.teacache.rel_l1_thresh='high'", "rel_l1_thresh"),
    ("options.teacache.rel_l1_thresh=-1", "rel_l1_thresh must be a number >= 0"),
    ("options.teacache.coefficients=[1, 2, 3]", "coefficients must be a list of 5 numbers"),
    ("options.magcache.threshold=0.1", "MagCache needs per-step magnitude ratios"),
    ("options.magcache.max_skips=1.5", "max_skips"),
    ("options.first_block.threshold=-0.5", "threshold must be a number >= 0"),
])
def test_bad_options_are_clear_errors(override, message):
    cache = override.split(".")[1]
    with pytest.raises(ConfigError, match=message):
        assemble(profile_name="cpu", overrides=[f"cache={cache}", override], hardware=CPU,
                 extra_plugins=cache_plugins(), include_user_files=False)


def test_missing_calibration_file_names_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=str(path)):
        assemble(profile_name="cpu", overrides=["cache=teacache", f"options.teacache.calibration='{path}'"],
                 hardware=CPU, extra_plugins=cache_plugins(), include_user_files=False)


def test_gate_keeps_the_blocks_and_can_be_removed(tiny_model):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.caching.blockcache import CachedBlocks, install_block_gate, remove_block_gate

    t = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer")
    before = dict(t.state_dict())
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    gate = install_block_gate(t)
    assert install_block_gate(t) is gate  # idempotent
    assert isinstance(t.transformer_blocks[0], CachedBlocks) and len(t.single_transformer_blocks) == 0
    assert gate.blocks() == blocks  # the same objects, in diffusers' order
    # Keys gain a prefix; every key still names the same tensor.
    after = {k.replace("transformer_blocks.0.double_blocks.", "transformer_blocks.")
              .replace("transformer_blocks.0.single_blocks.", "single_transformer_blocks."): v
             for k, v in t.state_dict().items()}
    assert sorted(after) == sorted(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    remove_block_gate(t)
    assert list(t.state_dict()) == list(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a second device to move weights to)")
def test_weights_on_gives_offloaded_weights_a_temporary_copy():
    from framepack.caching.blockcache import weights_on

    layer = torch.nn.Linear(4, 4)
    weight, data = layer.weight, layer.weight.data
    cuda = torch.device("cuda", torch.cuda.current_device())
    with weights_on(layer, cuda):
        assert layer.weight is weight and layer.weight.device == cuda
        assert layer(torch.zeros(2, 4, device=cuda)).device == cuda
    assert layer.weight is weight and layer.weight.data.data_ptr() == data.data_ptr()


def test_weights_on_leaves_weights_already_on_the_device_alone():
    from framepack.caching.blockcache import weights_on

    layer = torch.nn.Linear(4, 4)
    data = layer.weight.data
    with weights_on(layer, torch.device("cpu")):
        assert layer.weight.data.data_ptr() == data.data_ptr()
    assert layer.weight.data.data_ptr() == data.data_ptr()
