"""Offload policies and weight formats give the resident run's latents."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from framepack.errors import UserError
from framepack.models.sources import ModelSource
from framepack_plugins.encoders import hunyuan_text
from framepack_plugins.offload.dynamic_swap import install_dynamic_swap
from tests.test_generate import run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def resident(tiny_model, test_image, tmp_path_factory):
    return run(tiny_model, test_image, tmp_path_factory.mktemp("resident"), seconds=1, steps=3)


@pytest.mark.parametrize("policy", ["model_swap", "dynamic_swap", "sequential"])
def test_lossless_policies_match_resident_exactly(policy, resident, tiny_model, test_image, tmp_path):
    result = run(tiny_model, test_image, tmp_path, seconds=1, steps=3, overrides=[f"offload={policy}"])
    assert torch.equal(result.latents, resident.latents)


def test_encoders_are_gone_before_the_transformer_loads(tiny_model, test_image, tmp_path, monkeypatch):
    """The RAM peak is the largest stage, not the sum of every model: when the
    transformer loads, no text or image encoder is alive any more."""
    import gc
    import weakref

    import framepack.pipeline.generate as gen
    from framepack_plugins.encoders import hunyuan_text, siglip

    alive, seen = [], {}
    for module in (hunyuan_text, siglip):
        original = module.load

        def tracking_load(*args, _original=original, **kwargs):
            encoder = _original(*args, **kwargs)
            alive.extend(weakref.ref(m) for m in encoder.modules.values())
            return encoder

        monkeypatch.setattr(module, "load", tracking_load)  # registration reads it when the engine is built
    original_transformer = gen.load_transformer

    def checking_load(*args, **kwargs):
        gc.collect()
        seen["encoders_alive"] = sum(ref() is not None for ref in alive)
        return original_transformer(*args, **kwargs)

    monkeypatch.setattr(gen, "load_transformer", checking_load)
    run(tiny_model, test_image, tmp_path, seconds=1, steps=1, prompt_cache=False)
    assert len(alive) == 3 and seen == {"encoders_alive": 0}


def test_fp8_storage_is_close_to_resident(resident, tiny_model, test_image, tmp_path):
    result = run(tiny_model, test_image, tmp_path, seconds=1, steps=3, overrides=["quantize.transformer=fp8"])
    error = float((result.latents - resident.latents).norm() / resident.latents.norm())
    # float8 e4m3 keeps ~3 significant bits; on the tiny model that is ~2e-3.
    assert 0 < error < 2e-2


def test_dynamic_swap_moves_weights_only_for_the_call():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    before = [p.clone() for p in model.parameters()]
    seen = []
    model[0].register_forward_hook(lambda mod, args, out: seen.append(mod.weight.device.type))
    # The meta device stands in for an accelerator: copies "go there" and back.
    install_dynamic_swap(model, torch.device("meta"))
    out = model(torch.randn(3, 4, device="meta"))
    assert out.device.type == "meta" and seen == ["meta"]
    assert all(p.device.type == "cpu" and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_nf4_transformer_needs_cuda_and_says_so(tiny_model, test_image, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where nf4 runs")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        run(tiny_model, test_image, tmp_path, seconds=1, steps=1, overrides=["quantize.transformer=nf4"])


def test_stream_prefetch_is_refused_without_cuda(tiny_model, test_image, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from framepack.errors import ConfigError

    with pytest.raises(ConfigError, match="stream_prefetch: needs CUDA"):
        run(tiny_model, test_image, tmp_path, seconds=1, steps=1, overrides=["offload=stream_prefetch"])


@pytest.fixture(scope="module")
def wide_llama_model(tiny_model, tmp_path_factory):
    """The tiny model with a 64-wide Llama: bitsandbytes quantizes in blocks
    of 64, so the 32-wide tiny Llama cannot be NF4-quantized on CPU."""
    root = tmp_path_factory.mktemp("wide") / "model"
    shutil.copytree(tiny_model, root)
    old = LlamaConfig.from_pretrained(root / "text_encoder")
    config = LlamaConfig(**{**old.to_dict(), "hidden_size": 64, "intermediate_size": 128, "head_dim": 32})
    torch.manual_seed(0)
    shutil.rmtree(root / "text_encoder")
    LlamaModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nf4_llama_quantizes_and_stays_close(wide_llama_model):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install framepack[bnb])")
    import bitsandbytes as bnb

    source = ModelSource("original", root=wide_llama_model)
    full = hunyuan_text.load(source, None, torch.float32, "none")
    nf4 = hunyuan_text.load(source, None, torch.float32, "nf4")
    assert isinstance(nf4.llama.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ref, ref_pool = full.encode("a boat on a lake")
    got, got_pool = nf4.encode("a boat on a lake")
    assert got.shape == ref.shape and torch.equal(got_pool, ref_pool)  # CLIP is not quantized
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < 0.5  # 4-bit weights on a random 64-wide model; real layers are 4096 wide


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("policy", ["model_swap", "dynamic_swap", "sequential", "stream_prefetch"])
def test_policies_match_resident_on_cuda(policy, tiny_model, test_image, tmp_path):
    from framepack.engine.assemble import assemble
    from framepack.pipeline.generate import generate
    from framepack.hardware import detect_hardware
    from framepack.pipeline.settings import JobSettings

    def go(overrides):
        engine = assemble(profile_name="cpu", overrides=["dtype.transformer=float32", *overrides],
                          hardware=detect_hardware(), include_user_files=False)
        settings = JobSettings(image=test_image, prompt="a test", output=tmp_path / f"{len(overrides)}.mp4",
                               model=str(tiny_model), seconds=1, steps=3, size=(64, 64))
        return generate(settings, engine).latents

    base = go(["offload=resident"])
    torch.testing.assert_close(go([f"offload={policy}"]), base, rtol=1e-4, atol=1e-5)
