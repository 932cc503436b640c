"""LoRA files for the tiny model, in each layout, and the hand-merged reference:
a copy of the model folder whose transformer weights are W + s * alpha / r * B @ A,
written as safetensors in the real layout (so it loads like any model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRANSFORMER_FILE = Path("transformer") / "diffusion_pytorch_model.safetensors"
HIDDEN, MLP = 32, 128  # the tiny transformer's width and MLP width (framepack.models.tiny)


def pair(out: int, inp: int, rank: int, seed: int, gain: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with entries large enough to move the output."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, inp, generator=g) * gain, torch.randn(out, rank, generator=g) * gain)


def diffusers_lora(path: Path, seed: int = 1, rank: int = 4, alpha: float | None = 2.0):
    """``transformer.<module>.lora_A/B.weight`` (+ ``.alpha``). Returns (path, updates):
    updates = {weight name: (A, B, alpha / rank)} as the reference applies them."""
    modules = {"transformer_blocks.0.attn.to_q": (HIDDEN, HIDDEN), "transformer_blocks.0.ff.net.0.proj": (MLP, HIDDEN),
               "single_transformer_blocks.0.proj_out": (HIDDEN, HIDDEN + MLP),
               "context_embedder.token_refiner.refiner_blocks.0.attn.to_v": (HIDDEN, HIDDEN)}
    tensors, updates = {}, {}
    for i, (module, (out, inp)) in enumerate(modules.items()):
        a, b = pair(out, inp, rank, seed * 100 + i)
        tensors[f"transformer.{module}.lora_A.weight"] = a
        tensors[f"transformer.{module}.lora_B.weight"] = b
        if alpha is not None:
            tensors[f"transformer.{module}.alpha"] = torch.tensor(alpha)
        updates[f"{module}.weight"] = [(a, b, (alpha if alpha is not None else rank) / rank)]
    save_file(tensors, str(path))
    return path, updates


def musubi_lora(path: Path, seed: int = 2, rank: int = 8, alpha: float = 4.0):
    """Musubi-tuner FramePack: ``lora_unet_<path_with_underscores>.lora_down/lora_up/alpha``."""
    modules = {"transformer_blocks.0.attn.add_k_proj": (HIDDEN, HIDDEN), "transformer_blocks.0.attn.to_out.0": (HIDDEN, HIDDEN),
               "single_transformer_blocks.0.attn.to_k": (HIDDEN, HIDDEN), "single_transformer_blocks.0.proj_mlp": (MLP, HIDDEN),
               "transformer_blocks.0.norm1.linear": (6 * HIDDEN, HIDDEN)}
    tensors, updates = {}, {}
    for i, (module, (out, inp)) in enumerate(modules.items()):
        a, b = pair(out, inp, rank, seed * 100 + i)
        flat = "lora_unet_" + module.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = a
        tensors[f"{flat}.lora_up.weight"] = b
        tensors[f"{flat}.alpha"] = torch.tensor(alpha)
        updates[f"{module}.weight"] = [(a, b, alpha / rank)]
    save_file(tensors, str(path))
    return path, updates


def hunyuan_lora(path: Path, seed: int = 3, rank: int = 4, alpha: float = 8.0, prefix: str = "diffusion_model."):
    """Original HunyuanVideo names (diffusion-pipe / ComfyUI), fused projections included;
    the updates are split onto diffusers' modules by hand here, row block by row block."""
    fused = {"double_blocks.0.img_attn_qkv": (3 * HIDDEN, HIDDEN), "double_blocks.0.txt_attn_qkv": (3 * HIDDEN, HIDDEN),
             "single_blocks.0.linear1": (3 * HIDDEN + MLP, HIDDEN), "single_blocks.0.linear2": (HIDDEN, HIDDEN + MLP),
             "double_blocks.0.img_mlp.fc2": (HIDDEN, MLP), "double_blocks.0.txt_attn_proj": (HIDDEN, HIDDEN)}
    split = {
        "double_blocks.0.img_attn_qkv": [("transformer_blocks.0.attn.to_q", 0, HIDDEN),
                                         ("transformer_blocks.0.attn.to_k", HIDDEN, 2 * HIDDEN),
                                         ("transformer_blocks.0.attn.to_v", 2 * HIDDEN, 3 * HIDDEN)],
        "double_blocks.0.txt_attn_qkv": [("transformer_blocks.0.attn.add_q_proj", 0, HIDDEN),
                                         ("transformer_blocks.0.attn.add_k_proj", HIDDEN, 2 * HIDDEN),
                                         ("transformer_blocks.0.attn.add_v_proj", 2 * HIDDEN, 3 * HIDDEN)],
        "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0, HIDDEN),
                                    ("single_transformer_blocks.0.attn.to_k", HIDDEN, 2 * HIDDEN),
                                    ("single_transformer_blocks.0.attn.to_v", 2 * HIDDEN, 3 * HIDDEN),
                                    ("single_transformer_blocks.0.proj_mlp", 3 * HIDDEN, 3 * HIDDEN + MLP)],
        "single_blocks.0.linear2": [("single_transformer_blocks.0.proj_out", 0, HIDDEN)],
        "double_blocks.0.img_mlp.fc2": [("transformer_blocks.0.ff.net.2", 0, HIDDEN)],
        "double_blocks.0.txt_attn_proj": [("transformer_blocks.0.attn.to_add_out", 0, HIDDEN)],
    }
    tensors, updates = {}, {}
    for i, (module, (out, inp)) in enumerate(fused.items()):
        a, b = pair(out, inp, rank, seed * 100 + i)
        tensors[f"{prefix}{module}.lora_A.weight"] = a
        tensors[f"{prefix}{module}.lora_B.weight"] = b
        tensors[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
        for target, lo, hi in split[module]:
            updates.setdefault(f"{target}.weight", []).append((a, b[lo:hi], alpha / rank))
    save_file(tensors, str(path))
    return path, updates


def merged_model(tiny_model: Path, dest: Path, *weighted_updates) -> Path:
    """A copy of the model folder with ``(updates, scale)`` merged into its transformer
    by hand: W + scale * factor * B @ A for every piece, in float32."""
    shutil.copytree(tiny_model, dest)
    weights = load_file(str(dest / TRANSFORMER_FILE))
    for updates, scale in weighted_updates:
        for name, pieces in updates.items():
            for a, b, factor in pieces:
                weights[name] = weights[name] + scale * factor * (b @ a)
    (dest / TRANSFORMER_FILE).unlink()
    save_file(weights, str(dest / TRANSFORMER_FILE))
    return dest
