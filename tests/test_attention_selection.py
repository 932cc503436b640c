"""Mask handling for kernels that cannot mask, the self-check, and fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from framepack.engine.assemble import assemble
from framepack.attention.processors import install_attention
from framepack.attention.check import clear_cache, self_check
from framepack.attention.masks import MaskedAttention, MaskPatternError
from framepack.backends import AttentionBackend
from framepack.errors import ConfigError
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack_plugins.attention.sdpa import sdpa_kernel
from tests.test_attention import inputs

CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)


def maskless(q, k, v, mask):
    assert mask is None, "a kernel without mask support was handed a mask"
    return sdpa_kernel(q, k, v, None)


def fake_varlen(calls):
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        assert cu_q.dtype == torch.int32 and q.ndim == 3
        outs = []
        for i in range(len(cu_q) - 1):
            sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            outs.append(maskless(q[None, sl_q], k[None, sl_k], v[None, sl_k], None)[0])
        return torch.cat(outs)

    return varlen


def qkv(b=3, l=40, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, l, h, d, generator=g) for _ in range(3)]


def refiner_mask(lengths, l):
    m = torch.arange(l)[None] < torch.tensor(lengths)[:, None]
    mask = (m[:, :, None] & m[:, None, :])[:, None].clone()
    mask[:, :, :, 0] = True
    return mask


@pytest.mark.parametrize("use_varlen", [False, True])
@pytest.mark.parametrize("kind", ["key padding", "refiner"])
def test_maskless_kernels_give_the_masked_result(kind, use_varlen):
    q, k, v = qkv()
    lengths = [40, 17, 0] if kind == "refiner" else [40, 17, 1]
    if kind == "refiner":
        mask = refiner_mask(lengths, 40)
    else:
        mask = (torch.arange(40)[None] < torch.tensor(lengths)[:, None])[:, None, None]
    calls = []
    attention = MaskedAttention(maskless, supports_mask=False, varlen=fake_varlen(calls) if use_varlen else None)
    expected = sdpa_kernel(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, mask), expected)
    assert bool(calls) == use_varlen  # the varlen entry is used when there is one, in a single call
    if use_varlen:
        assert len(calls) == 1


def test_other_masks_are_refused_not_guessed():
    q, k, v = qkv(b=1)
    holes = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    holes[..., 5] = False  # not a prefix
    with pytest.raises(MaskPatternError):
        MaskedAttention(maskless, supports_mask=False)(q, k, v, holes)


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


def test_masked_batch_equals_cropped_single_samples(transformer):
    """Batch 2 with masks (what CFG batching or several prompts would run)
    gives each sample what batch 1 gives with the text cropped and no mask."""
    for attention in (MaskedAttention(sdpa_kernel, True), MaskedAttention(maskless, False)):
        model = copy.deepcopy(transformer)
        install_attention(model, attention)
        batch = inputs(2, [7, 12])
        with torch.no_grad():
            both = model(**batch, return_dict=False)[0]
            for i in range(2):
                single = {k: (v[i : i + 1] if v.ndim > 1 or k in ("timestep", "guidance") else v) for k, v in batch.items()}
                alone = model(**single, return_dict=False)[0]
                torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_self_check_accepts_a_correct_kernel_and_caches():
    clear_cache()
    calls = []

    def counted(q, k, v, mask):
        calls.append(1)
        return maskless(q, k, v, mask)

    first = self_check("counted", MaskedAttention(counted, False), torch.device("cpu"), torch.float32, "1.0")
    assert first.ok and first.error < 1e-5
    n = len(calls)
    assert n > 0
    again = self_check("counted", MaskedAttention(counted, False), torch.device("cpu"), torch.float32, "1.0")
    assert again is first and len(calls) == n  # cached for the process
    # A new library version is checked again.
    self_check("counted", MaskedAttention(counted, False), torch.device("cpu"), torch.float32, "2.0")
    assert len(calls) > n


@pytest.mark.parametrize(
    "kernel, words",
    [
        (lambda q, k, v, m: q.clone(), "relative error"),  # returns the query: wrong
        (lambda q, k, v, m: sdpa_kernel(q, k, v, m) * float("nan"), "NaN"),
        (lambda q, k, v, m: sdpa_kernel(q, k, v, m)[:, :-1], "shape"),
        (lambda q, k, v, m: (_ for _ in ()).throw(RuntimeError("no kernel image for this GPU")), "no kernel image"),
        # Right without masks, wrong with them (ignores the mask it is handed).
        (lambda q, k, v, m: sdpa_kernel(q, k, v, None), "key padding"),
    ],
)
def test_self_check_refuses_broken_kernels(kernel, words):
    clear_cache()
    result = self_check("bad", MaskedAttention(kernel, True), torch.device("cpu"), torch.float32)
    assert not result.ok and words in result.reason


class WrongKernelPlugin:
    """A third-party kernel that is fast and wrong (scaled output)."""

    def __init__(self):
        self.calls = 0

    def kernel(self, q, k, v, mask):
        self.calls += 1
        return sdpa_kernel(q, k, v, mask) * 1.5

    @hookimpl
    def framepack_register_attention(self, register):
        register(AttentionBackend(name="wrongfast", make_kernel=lambda options: self.kernel, supports_mask=True))


def test_wrong_third_party_kernel_is_caught_and_the_profile_falls_back():
    clear_cache()
    plugin = WrongKernelPlugin()
    engine = assemble(profile_name="cpu", overrides=['attention=["wrongfast", "sdpa"]'], hardware=CPU,
                      extra_plugins=[plugin], include_user_files=False)
    choice = engine.choices["attention"]
    assert choice.name == "sdpa" and plugin.calls > 0
    explained = choice.explain()
    assert "the reference kernel" in explained
    assert "wrongfast: self-check failed on cpu/float32" in explained and "relative error" in explained


def test_forcing_a_broken_kernel_stops_with_the_reason_and_a_hint():
    clear_cache()
    with pytest.raises(ConfigError) as err:
        assemble(profile_name="cpu", overrides=["attention=wrongfast"], hardware=CPU,
                 extra_plugins=[WrongKernelPlugin()], include_user_files=False)
    message = str(err.value)
    assert "self-check failed" in message and "wrongfast" in message.split("installed attention backends:")[1]
    assert "--set 'attention=[\"wrongfast\", \"sdpa\"]'" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to simulate one")
def test_simulated_device_that_is_absent_skips_the_check():
    plugin = WrongKernelPlugin()
    sim = HardwareInfo(device="cuda", vram_total_gb=24, vram_free_gb=24, ram_total_gb=16, ram_available_gb=16,
                       simulated=True)
    engine = assemble(profile_name="cpu", overrides=["attention=wrongfast"], hardware=sim,
                      extra_plugins=[plugin], include_user_files=False)
    assert engine.choices["attention"].name == "wrongfast" and plugin.calls == 0


def test_a_passing_kernel_reports_its_check():
    clear_cache()

    class Good(WrongKernelPlugin):
        def kernel(self, q, k, v, mask):
            self.calls += 1
            return sdpa_kernel(q, k, v, mask)

    engine = assemble(profile_name="cpu", overrides=["attention=wrongfast"], hardware=CPU,
                      extra_plugins=[Good()], include_user_files=False)
    assert "self-check on cpu/float32: matches sdpa" in engine.choices["attention"].explain()
