"""Write a FramePack model folder at the original models' full size, with random weights.

Why this exists: no weights can be downloaded where the benchmarks run, yet memory and
speed only mean something at full size (a 13B transformer, an 8B Llama). So we write a
folder with the real layout, the real configs and the real sharded safetensors format
(shards plus an index, as on the hub) that the engine loads through its ordinary loading
code, lazily and shard by shard, exactly as it loads the originals.

A 13B model does not fit in the RAM of many machines that should still be able to write
it, so nothing is ever materialised whole: each part is instantiated on the meta device
(shapes only), and tensors are drawn one at a time and written a shard at a time.
Peak RAM is about one shard (``shard_gb``).

Values: biases 0, one-dimensional weights (norm scales) 1, every other weight normal with
standard deviation 0.02. That keeps activations finite through 60 blocks, which a speed
benchmark needs; the video is noise. The tokenizers are the tiny model's (their ids fit
any vocabulary), and the SigLIP processor is the real one's 384 px.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable

import torch

from framepack.errors import DiskFull
from framepack.models.tiny import _build_clip_tokenizer, _build_llama_tokenizer, _no_progress_bars, _refuse_occupied

PARTS = ("transformer", "text_encoder", "text_encoder_2", "image_encoder", "vae")

# Storage dtypes of the published checkpoints.
STORAGE_DTYPE = {
    "transformer": torch.bfloat16,
    "text_encoder": torch.float16,
    "text_encoder_2": torch.float16,
    "image_encoder": torch.bfloat16,
    "vae": torch.float16,
}


def transformer_config() -> dict:
    """lllyasviel/FramePackI2V_HY's transformer/config.json (F1 has the same shapes)."""
    return dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
        num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
        patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
        text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56), image_condition_type=None,
        has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True,
    )


def vae_config() -> dict:
    """hunyuanvideo-community/HunyuanVideo's vae/config.json."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
        norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    # Llama-3-8B as HunyuanVideo ships it (text_encoder/config.json).
    return LlamaConfig(
        vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float16",
    )


def _clip_config(tokenizer):
    from transformers import CLIPTextConfig

    # CLIP ViT-L/14's text tower (text_encoder_2/config.json).
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float16",
    )


def _siglip_config():
    from transformers import SiglipVisionConfig

    # SigLIP so400m/14 at 384 px (lllyasviel/flux_redux_bfl image_encoder).
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, dtype="bfloat16",
    )


def make_full_size_model(
    dest: str | os.PathLike,
    seed: int = 0,
    parts: Iterable[str] = PARTS,
    shard_gb: float = 4.0,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Write the folder (about 44 GB with every part) next to ``dest`` and rename it
    into place when complete; a crash leaves no half-written model."""
    parts = tuple(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)} (known: {', '.join(PARTS)})")
    dest = pathlib.Path(dest)
    _refuse_occupied(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    needed = sum(part_bytes(part) for part in parts)
    free = shutil.disk_usage(dest.parent).free
    if free < needed:
        raise DiskFull(f"not enough disk space in {dest.parent}: the model needs {needed / 1e9:.1f} GB, "
                       f"{free / 1e9:.1f} GB are free")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    say = progress or (lambda _msg: None)
    try:
        with _no_progress_bars():
            _write_tokenizers(tmp)
            for index, part in enumerate(parts):
                model, save_config, weights_name = _meta_part(part)
                save_config(tmp / part)
                written = write_random_weights(
                    model, tmp / part, weights_name, STORAGE_DTYPE[part],
                    seed=seed * 100 + index, shard_bytes=int(shard_gb * 2**30),
                )
                say(f"{part}: {written / 2**30:.1f} GB")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(f"the disk filled up writing the model to {dest.parent}: it needs {needed / 1e9:.1f} GB "
                       f"in all; nothing was left behind") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def part_bytes(part: str) -> int:
    """Bytes of one part's weights in its storage dtype, counted on the meta device."""
    model, _, _ = _meta_part(part)
    size = torch.empty((), dtype=STORAGE_DTYPE[part]).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def _write_tokenizers(root: pathlib.Path) -> None:
    _build_llama_tokenizer().save_pretrained(root / "tokenizer")
    _build_clip_tokenizer().save_pretrained(root / "tokenizer_2")
    # Written as a plain config so it does not matter which processor class
    # (PIL or torchvision) this transformers version would pick.
    processor = {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True,
        "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_convert_rgb": True,
    }
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _meta_part(part: str):
    """(model on the meta device, a function writing its config, weights file stem)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if part in ("transformer", "vae"):
            from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel

            cls, config = ((HunyuanVideoFramepackTransformer3DModel, transformer_config()) if part == "transformer"
                           else (AutoencoderKLHunyuanVideo, vae_config()))
            model = cls(**config)
            return model, model.save_config, "diffusion_pytorch_model"
        from transformers import CLIPTextModel, LlamaModel, SiglipVisionModel

        if part == "text_encoder":
            config = _llama_config(_build_llama_tokenizer())
            model = LlamaModel(config)
        elif part == "text_encoder_2":
            config = _clip_config(_build_clip_tokenizer())
            model = CLIPTextModel(config)
        else:
            config = _siglip_config()
            model = SiglipVisionModel(config)
        config.architectures = [type(model).__name__]
        return model, config.save_pretrained, "model"


def write_random_weights(
    model: torch.nn.Module, folder: pathlib.Path, stem: str, dtype: torch.dtype,
    seed: int = 0, shard_bytes: int = 4 * 2**30,
) -> int:
    """Write ``model``'s state dict (shapes only are read, so a meta model is fine) as
    random safetensors shards of at most ``shard_bytes`` (one file when it fits, else
    ``STEM-0000i-of-0000n.safetensors`` plus ``STEM.safetensors.index.json``, the
    libraries' sharded layout). Returns the bytes written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    entries = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    shards = _split(entries, dtype.itemsize, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    names = ([f"{stem}.safetensors"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {name: _random_tensor(name, shape, dtype, generator) for name, shape in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = folder / f".{file_name}.partial"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / file_name)
        weight_map.update({name: file_name for name in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _split(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, limit: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shape in entries:
        nbytes = itemsize * _numel(shape)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def random_module(cls, config: dict, device: torch.device | str, dtype: torch.dtype, std: float = 0.02):
    """A model of ``cls(**config)`` with the same kind of random weights, built in
    memory on ``device`` (the GPU check: nothing on disk). It is born on the meta
    device in ``dtype``, so no float32 copy ever exists (52 GB for the 13B
    transformer), then materialised and filled in place. ``std``: the weights'
    spread; narrow test models need more than 0.02 for a block's update to
    survive bf16 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters born in dtype: no .to() cast (diffusers warns about those)
    try:
        with torch.device("meta"):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)  # norm scales
            else:
                p.normal_(0.0, std, generator=generator)
    return model.eval().requires_grad_(False)
