"""The full-size random-weight model writer and the lazy (meta-model) loader.

The full folder is 44 GB, so here: the configs are checked against the originals'
parameter counts on the meta device, the streaming shard writer against the libraries'
own loaders on small models, and the CLI end to end on its smallest full-size part.
"""

from __future__ import annotations

import json

import pytest
import torch

from framepack.cli import main
from framepack.errors import FramepackError
from framepack.models.full import _meta_part, transformer_config, write_random_weights
from framepack.models.lazy_load import checkpoint_files, load_into_meta_model
from framepack.engine.planning import KNOWN_PARAMS
from framepack.pipeline.transformer import _load_fp8


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("part", ["transformer", "text_encoder", "text_encoder_2", "image_encoder"])
def test_full_size_configs_have_the_originals_parameter_counts(part):
    model, _, _ = _meta_part(part)
    assert all(p.is_meta for p in model.parameters())  # nothing materialised
    assert _params(model) == KNOWN_PARAMS[part]
    if part == "transformer":
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (20, 40)
        assert max(_params(b) for b in blocks) == KNOWN_PARAMS["transformer_block"]


def test_full_size_transformer_config_keeps_the_tiny_models_structure(tiny_model):
    """Same switches as the model the engine is tested on, only wider and deeper."""
    tiny = json.loads((tiny_model / "transformer" / "config.json").read_text())
    full = transformer_config()
    for key in ("has_image_proj", "has_clean_x_embedder", "guidance_embeds", "patch_size", "patch_size_t", "qk_norm",
                "in_channels", "rope_theta", "image_condition_type"):
        assert full[key] == tiny[key], key
    assert sum(full["rope_axes_dim"]) == full["attention_head_dim"]


def _tiny_meta_transformer(tiny_model):
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoFramepackTransformer3DModel as cls

    with init_empty_weights():
        return cls.from_config(cls.load_config(tiny_model, subfolder="transformer"))


def test_sharded_random_weights_load_with_the_library_loader(tiny_model, tmp_path):
    from diffusers import HunyuanVideoFramepackTransformer3DModel as cls

    folder = tmp_path / "transformer"
    model = _tiny_meta_transformer(tiny_model)
    model.save_config(folder)
    total = write_random_weights(model, folder, "diffusion_pytorch_model", torch.bfloat16, shard_bytes=20_000)
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) > 2 and index["metadata"]["total_size"] == total == _params(model) * 2
    assert set(index["weight_map"]) == set(model.state_dict())
    assert not list(folder.glob(".*partial"))  # every shard renamed into place

    loaded = cls.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert all(torch.count_nonzero(t) == 0 for k, t in state.items() if k.endswith("bias"))
    assert all(torch.all(t == 1) for k, t in state.items() if k.endswith("weight") and t.ndim == 1)
    weight = state["proj_out.weight"].float()
    assert 0.015 < weight.std() < 0.025 and abs(weight.mean()) < 0.005


def test_same_seed_same_weights(tiny_model, tmp_path):
    model = _tiny_meta_transformer(tiny_model)
    for name in ("a", "b"):
        write_random_weights(model, tmp_path / name, "w", torch.bfloat16, seed=3)
    write_random_weights(model, tmp_path / "c", "w", torch.bfloat16, seed=4)
    read = lambda n: (tmp_path / n / "w.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b") != read("c")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lazy_fp8_load_equals_load_then_cast(tiny_model, dtype):
    """The meta-model path must give bit-for-bit what from_pretrained + layerwise
    casting gives, double rounding (checkpoint -> dtype -> fp8) included."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel as cls

    from framepack.models.quantize import apply_fp8_storage

    lazy = _load_fp8(cls, str(tiny_model), "transformer", dtype)
    eager = cls.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=dtype)
    apply_fp8_storage(eager, dtype)
    a, b = lazy.state_dict(), eager.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert {t.dtype for t in a.values()} == {torch.float8_e4m3fn, dtype}
    assert not any(t.is_meta for t in list(lazy.parameters()) + list(lazy.buffers()))
    assert lazy.x_embedder.proj.weight.dtype == dtype  # kept in the compute dtype (skip pattern)


def test_lazy_loader_names_a_missing_or_unexpected_tensor(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    (files,) = checkpoint_files(str(tiny_model), "transformer")
    state = load_file(files)
    dropped = dict(state)
    dropped.pop("proj_out.weight")
    save_file(dropped, tmp_path / "missing.safetensors")
    with pytest.raises(FramepackError, match="missing 1 tensors: proj_out.weight"):
        load_into_meta_model(_tiny_meta_transformer(tiny_model), [tmp_path / "missing.safetensors"], torch.float32)
    save_file({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(FramepackError, match="unexpected tensor 'extra.weight'"):
        load_into_meta_model(_tiny_meta_transformer(tiny_model), [tmp_path / "extra.safetensors"], torch.float32)
    with pytest.raises(FramepackError, match="neither"):
        checkpoint_files(str(tmp_path), None)


def test_make_full_model_cli_writes_a_loadable_full_size_part(tmp_path, capsys):
    """CLIP-L is the smallest full-size part (123M parameters, 0.25 GB in fp16)."""
    from transformers import AutoTokenizer, CLIPTextModel

    dest = tmp_path / "full"
    assert main(["make-full-model", str(dest), "--parts", "text_encoder_2", "--shard-gb", "0.1"]) == 0
    assert "text_encoder_2: 0.2 GB" in capsys.readouterr().err
    assert len(list((dest / "text_encoder_2").glob("model-*.safetensors"))) == 3
    clip = CLIPTextModel.from_pretrained(dest, subfolder="text_encoder_2")
    assert sum(p.numel() for p in clip.parameters()) == KNOWN_PARAMS["text_encoder_2"]
    tokens = AutoTokenizer.from_pretrained(dest, subfolder="tokenizer_2")("a cat", return_tensors="pt")
    assert torch.isfinite(clip(**tokens).pooler_output).all()
    assert (dest / "feature_extractor" / "preprocessor_config.json").is_file()


def test_make_full_model_cli_refuses_bad_input(tmp_path, capsys):
    assert main(["make-full-model", str(tmp_path / "x"), "--parts", "unet"]) == 2
    assert "unknown unet" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("mine")
    assert main(["make-full-model", str(tmp_path / "busy"), "--parts", "vae"]) == 2
    assert (tmp_path / "busy" / "file").read_text() == "mine"


def test_known_counts_are_those_of_the_full_size_configs(tmp_path):
    """The planner's built-in counts (used for hub models whose configs are not on
    disk) must be what counting the full-size configs gives, per weight format."""
    from framepack.models.sources import ModelSource
    from framepack.engine.planning import count_params

    for part in ("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae"):
        _, save_config, _ = _meta_part(part)
        save_config(tmp_path / part)
    counts = count_params(ModelSource("inverted", root=tmp_path))
    assert counts == KNOWN_PARAMS


def _quantized(fmt, tiny_model):
    from framepack.models.quantize import quantized_parameter_names

    return quantized_parameter_names(_tiny_meta_transformer(tiny_model), fmt)


def test_fp8_keeps_embedders_head_and_adaln_and_casts_the_rest(tiny_model):
    names = _quantized("fp8", tiny_model)
    assert "single_transformer_blocks.0.proj_out.weight" in names  # not kept by a loose "proj_out" pattern
    assert "transformer_blocks.0.ff.net.0.proj.weight" in names and "transformer_blocks.0.attn.to_q.weight" in names
    for kept in ("proj_out.weight", "norm_out.linear.weight", "x_embedder.proj.weight", "clean_x_embedder.proj.weight",
                 "transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.norm.linear.weight",
                 "context_embedder.proj_in.weight", "image_projection.up.weight", "time_text_embed.timestep_embedder.linear_1.weight"):
        assert kept not in names, kept


def test_nf4_quantizes_every_block_linear_and_keeps_the_edges(tiny_model):
    pytest.importorskip("bitsandbytes", reason="NF4 needs bitsandbytes (pip install framepack[bnb])")
    names = _quantized("nf4", tiny_model)
    for quantized in ("single_transformer_blocks.0.proj_out.weight", "transformer_blocks.0.norm1.linear.weight",
                      "single_transformer_blocks.0.norm.linear.weight", "transformer_blocks.0.attn.to_q.weight",
                      "proj_out.weight"):  # quantized on load, then put back in float32 (restore_output_head)
        assert quantized in names, quantized
    for kept in ("norm_out.linear.weight", "x_embedder.proj.weight", "context_embedder.proj_in.weight",
                 "image_projection.up.weight", "time_text_embed.timestep_embedder.linear_1.weight"):
        assert kept not in names, kept
    assert not any(n.endswith(".bias") for n in names)


def test_restore_output_head_puts_the_checkpoints_head_back(tiny_model):
    from diffusers import HunyuanVideoFramepackTransformer3DModel as cls
    from safetensors.torch import load_file

    from framepack.models.quantize import restore_output_head

    model = cls.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    files = checkpoint_files(str(tiny_model), "transformer")
    head = model.proj_out
    model.proj_out = torch.nn.Linear(head.in_features, head.out_features).to(torch.bfloat16)  # a stand-in, as Linear4bit is
    torch.nn.init.zeros_(model.proj_out.weight)
    restore_output_head(model, files, torch.bfloat16)
    state = load_file(files[0])
    assert isinstance(model.proj_out, torch.nn.Linear) and not model.proj_out.weight.requires_grad
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"].to(torch.bfloat16))
    assert torch.equal(model.proj_out.bias, state["proj_out.bias"].to(torch.bfloat16))


def test_release_free_heap_gives_pages_back_on_glibc():
    """A freed block in the middle of the heap stays in RSS until trimmed."""
    import platform

    from framepack.models.heap import release_free_heap
    from tests.test_length import anon_mb

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; elsewhere release_free_heap is a no-op")

    # 200 x 2 MB tensors from the heap (under the grown mmap threshold), every other one freed.
    big = torch.empty(20 * 2**20, dtype=torch.uint8)
    del big  # a freed large block raises glibc's mmap threshold, as loading does
    blocks = [torch.ones(2 * 2**20, dtype=torch.uint8) for _ in range(200)]
    del blocks[::2]
    before = anon_mb()
    assert release_free_heap()
    assert anon_mb() < before - 100  # most of the 200 MB of holes went back
    del blocks
