"""The tiny model folder loads through the real loading calls and behaves like the real one.

Everything here goes through the same ``from_pretrained`` calls the engine uses, so a
passing suite means tests and offline demos built on ``make_tiny_model`` exercise the
real code paths (safetensors only, subfolders, tokenizer cropping, FramePack history
inputs, causal VAE frame arithmetic).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel, SiglipImageProcessor, SiglipVisionModel

from framepack.models.tiny import HIDDEN_SIZE, LLAMA_CROP_START, make_tiny_model

PARTS = {
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
    "image_encoder",
    "feature_extractor",
}
# What the engine asks the Llama tokenizer for: 256 prompt tokens after the crop.
LLAMA_MAX_LENGTH = 256 + LLAMA_CROP_START
TWENTY_WORDS = (
    "a small red fox jumps over a sleeping brown dog while the sun sets "
    "behind green hills and golden clouds"
)
assert len(TWENTY_WORDS.split()) == 20


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def llama_tokenizer(root: pathlib.Path):
    return AutoTokenizer.from_pretrained(root, subfolder="tokenizer")


def _encode_like_engine(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    text = DEFAULT_PROMPT_TEMPLATE["template"].format(prompt)
    enc = tokenizer(text, padding="max_length", max_length=LLAMA_MAX_LENGTH, truncation=True)
    return enc["input_ids"], enc["attention_mask"]


def _cropped_ids(tokenizer, prompt: str) -> list[int]:
    ids, mask = _encode_like_engine(tokenizer, prompt)
    return ids[LLAMA_CROP_START : sum(mask)]


def _weight_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


# --------------------------------------------------------------------------- layout


def test_returns_dest_with_every_part(root: pathlib.Path) -> None:
    assert root.name == "model"
    assert {p.name for p in root.iterdir()} == PARTS


def test_weights_are_safetensors_only_and_small(root: pathlib.Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    weight_dirs = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weight_dirs == {"transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder"}
    assert sum(p.stat().st_size for p in files) < 5 * 1024 * 1024


def test_no_temp_dir_left_next_to_dest(root: pathlib.Path) -> None:
    assert [p.name for p in root.parent.iterdir()] == ["model"]


# --------------------------------------------------------------------------- loading


def test_transformer_loads_with_expected_config(root: pathlib.Path) -> None:
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=torch.bfloat16, use_safetensors=True
    )
    cfg = model.config
    assert model.dtype == torch.bfloat16
    assert (cfg.in_channels, cfg.out_channels) == (16, 16)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (2, 16)
    assert sum(cfg.rope_axes_dim) == cfg.attention_head_dim
    assert (cfg.num_layers, cfg.num_single_layers, cfg.num_refiner_layers) == (1, 1, 1)
    assert (cfg.patch_size, cfg.patch_size_t) == (2, 1)
    assert cfg.text_embed_dim == cfg.pooled_projection_dim == cfg.image_proj_dim == HIDDEN_SIZE
    assert cfg.has_image_proj and cfg.has_clean_x_embedder and cfg.guidance_embeds


def test_vae_loads_with_expected_config(root: pathlib.Path) -> None:
    vae = AutoencoderKLHunyuanVideo.from_pretrained(root, subfolder="vae", use_safetensors=True)
    cfg = vae.config
    assert cfg.latent_channels == 16
    assert tuple(cfg.block_out_channels) == (8, 8, 8, 8)
    assert cfg.scaling_factor == pytest.approx(0.476986)
    assert (cfg.spatial_compression_ratio, cfg.temporal_compression_ratio) == (8, 4)


def test_text_encoder_loads_and_matches_tokenizer(root: pathlib.Path, llama_tokenizer) -> None:
    model = LlamaModel.from_pretrained(root, subfolder="text_encoder", use_safetensors=True)
    cfg = model.config
    assert model.dtype == torch.float32
    assert cfg.hidden_size == HIDDEN_SIZE
    assert cfg.num_hidden_layers >= 3
    assert cfg.max_position_embeddings >= LLAMA_MAX_LENGTH
    assert cfg.vocab_size == len(llama_tokenizer)
    assert cfg.pad_token_id == llama_tokenizer.pad_token_id

    ids, mask = _encode_like_engine(llama_tokenizer, "a cat on a beach")
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]), output_hidden_states=True
        )
    assert out.hidden_states[-3].shape == (1, LLAMA_MAX_LENGTH, HIDDEN_SIZE)
    assert torch.isfinite(out.hidden_states[-3]).all()


def test_clip_text_encoder_loads_and_pools_at_eos(root: pathlib.Path) -> None:
    model = CLIPTextModel.from_pretrained(root, subfolder="text_encoder_2", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2")
    cfg = model.config
    assert cfg.hidden_size == HIDDEN_SIZE
    assert cfg.max_position_embeddings == tokenizer.model_max_length == 77
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert cfg.vocab_size == len(tokenizer)

    # Words ending in characters the training corpus never had word-final ("!", "z",
    # "%") must not turn into <unk> (= <|endoftext|>), or CLIP would pool too early.
    enc = tokenizer(["Zebras jazz! 100% quiz"], padding="max_length", max_length=77, truncation=True)
    ids = enc["input_ids"][0]
    n_real = sum(enc["attention_mask"][0])
    assert ids[0] == tokenizer.bos_token_id
    assert ids.index(tokenizer.eos_token_id) == n_real - 1
    # CLIP lowercases and splits digits one by one; decoding puts a space after each word.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebras jazz ! 1 0 0 % quiz"

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]))
    assert out.pooler_output.shape == (1, HIDDEN_SIZE)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, n_real - 1])


def test_image_encoder_and_feature_extractor(root: pathlib.Path) -> None:
    processor = SiglipImageProcessor.from_pretrained(root, subfolder="feature_extractor")
    model = SiglipVisionModel.from_pretrained(root, subfolder="image_encoder", use_safetensors=True)
    assert (model.config.hidden_size, model.config.image_size, model.config.patch_size) == (HIDDEN_SIZE, 32, 8)

    white = Image.new("RGB", (64, 48), (255, 255, 255))
    pixels = processor(images=white, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    # rescale 1/255 then normalise with mean = std = 0.5 maps white to exactly 1.0
    assert torch.allclose(pixels, torch.ones_like(pixels))

    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.last_hidden_state.shape == (1, 16, HIDDEN_SIZE)


# --------------------------------------------------------------------------- Llama tokenizer


def test_template_prefix_is_exactly_the_crop(llama_tokenizer) -> None:
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert DEFAULT_PROMPT_TEMPLATE["crop_start"] == LLAMA_CROP_START
    assert len(llama_tokenizer(prefix)["input_ids"]) == LLAMA_CROP_START


def test_llama_tokenizer_pads_right(llama_tokenizer) -> None:
    assert llama_tokenizer.padding_side == "right"
    ids, mask = _encode_like_engine(llama_tokenizer, "a cat on a beach")
    n_real = sum(mask)
    assert len(ids) == LLAMA_MAX_LENGTH
    assert mask == [1] * n_real + [0] * (LLAMA_MAX_LENGTH - n_real)
    assert ids[0] == llama_tokenizer.bos_token_id
    assert set(ids[n_real:]) == {llama_tokenizer.pad_token_id}


def test_short_prompt_survives_the_crop(llama_tokenizer) -> None:
    kept = _cropped_ids(llama_tokenizer, "a cat on a beach")
    assert llama_tokenizer.decode(kept) == "a cat on a beach<|eot_id|>"


def test_twenty_word_prompt_is_not_truncated(llama_tokenizer) -> None:
    ids, mask = _encode_like_engine(llama_tokenizer, TWENTY_WORDS)
    assert sum(mask) < LLAMA_MAX_LENGTH // 2
    kept = ids[LLAMA_CROP_START : sum(mask)]
    assert llama_tokenizer.decode(kept, skip_special_tokens=True) == TWENTY_WORDS


def test_different_prompts_give_different_cropped_ids(llama_tokenizer) -> None:
    assert _cropped_ids(llama_tokenizer, "a cat on a beach") != _cropped_ids(llama_tokenizer, "a dog in a park")


# --------------------------------------------------------------------------- forward passes


def test_transformer_forward_with_engine_inputs(root: pathlib.Path) -> None:
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=torch.float32, use_safetensors=True
    )
    gen = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(1, 16, 9, 8, 8, generator=gen)
    text_len = 256
    mask = torch.zeros(1, text_len, dtype=torch.bool)
    mask[:, :7] = True
    with torch.no_grad():
        out = model(
            hidden_states=hidden_states,
            timestep=torch.tensor([1000.0]),
            encoder_hidden_states=torch.randn(1, text_len, HIDDEN_SIZE, generator=gen),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(1, HIDDEN_SIZE, generator=gen),
            image_embeds=torch.randn(1, 16, HIDDEN_SIZE, generator=gen),
            guidance=torch.tensor([10000.0]),
            indices_latents=torch.arange(9),
            latents_clean=torch.randn(1, 16, 2, 8, 8, generator=gen),
            indices_latents_clean=torch.tensor([0, 10]),
            latents_history_2x=torch.randn(1, 16, 2, 8, 8, generator=gen),
            indices_latents_history_2x=torch.tensor([11, 12]),
            latents_history_4x=torch.randn(1, 16, 16, 8, 8, generator=gen),
            indices_latents_history_4x=torch.arange(13, 29),
            return_dict=False,
        )[0]
    assert out.shape == hidden_states.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_vae_decodes_with_real_compression(root: pathlib.Path) -> None:
    vae = AutoencoderKLHunyuanVideo.from_pretrained(root, subfolder="vae", use_safetensors=True)
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = vae.decode(latents).sample
    # T latent frames -> 1 + 4 * (T - 1) frames, 8x spatial
    assert pixels.shape == (1, 3, 9, 16, 16)
    assert torch.isfinite(pixels).all()


# --------------------------------------------------------------------------- determinism, dest


def test_same_seed_gives_identical_weights(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # An existing *empty* directory is an acceptable destination.
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    rng_before = torch.get_rng_state()
    again = make_tiny_model(again_dir, seed=0)
    # Seeding happens on a forked generator: the caller's random state is untouched.
    assert torch.equal(torch.get_rng_state(), rng_before)
    first, second = _weight_bytes(root), _weight_bytes(again)
    assert len(first) == 5
    assert first == second
    for name in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert (root / name).read_bytes() == (again / name).read_bytes()


def test_different_seed_gives_different_weights(root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = _weight_bytes(make_tiny_model(tmp_path / "other", seed=1))
    first = _weight_bytes(root)
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first)


def test_refuses_non_empty_dest(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty"):
        make_tiny_model(dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_failed_build_leaves_nothing_behind(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import framepack.models.tiny as tiny_model

    def broken_vae():
        raise RuntimeError("simulated failure while building the VAE")

    monkeypatch.setattr(tiny_model, "_build_vae", broken_vae)
    with pytest.raises(RuntimeError, match="simulated"):
        make_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
