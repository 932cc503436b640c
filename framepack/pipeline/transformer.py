"""Load the FramePack transformer and call it with one section's packed context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framepack.attention.processors import install_attention
from framepack.backends import AttentionKernel


def keep_output_head_fp32(transformer: torch.nn.Module) -> None:
    """Run proj_out in float32 on a float32 copy of its input, as the original
    does (``high_quality_fp32_output_for_inference``): norm_out stays in the
    model dtype, the upcast happens after it, so the velocity loses no
    precision to bf16 in the last matmul. (Upcasting norm_out too would round
    differently from the original.)"""
    transformer.proj_out.float()

    def upcast(module, args):
        return (args[0].float(),)

    transformer.proj_out.register_forward_pre_hook(upcast)


def load_transformer(
    source, dtype: torch.dtype, kernel: AttentionKernel, quantize: str = "none", device: torch.device | None = None
) -> torch.nn.Module:
    """Load, install the attention kernel, apply the weight format.

    quantize: "none", "fp8" (float8 storage, computed in ``dtype``) or "nf4"
    (needs CUDA; ``device`` is where it will run)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.models.quantize import transformer_quantization_config

    config = transformer_quantization_config(quantize, dtype, device or torch.device("cpu"))
    where, sub = source.location("transformer")
    with source.loading("transformer"):
        if quantize == "fp8":
            model = _load_fp8(HunyuanVideoFramepackTransformer3DModel, where, sub, dtype)
        else:
            model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(
                where, subfolder=sub, torch_dtype=dtype, use_safetensors=True, quantization_config=config
            )
            if quantize == "nf4":
                from framepack.models.lazy_load import checkpoint_files
                from framepack.models.quantize import restore_output_head

                restore_output_head(model, checkpoint_files(where, sub), dtype)
    model.eval().requires_grad_(False)
    from framepack.models.lora import WeightOrigin

    # Where a LoRA merge reads the weights' originals: the checkpoint (framepack.models.lora).
    model._framepack_weights = WeightOrigin(where, sub, dtype)
    if not (model.config.has_image_proj and model.config.has_clean_x_embedder):
        raise ValueError("the transformer config must set has_image_proj and has_clean_x_embedder (FramePack checkpoints do)")
    install_attention(model, kernel)
    if dtype != torch.float32:
        keep_output_head_fp32(model)
    return model


def transformer_weight_shapes(source) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape as the config builds it (a meta model: no weights load)."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoFramepackTransformer3DModel as cls

    where, sub = source.location("transformer")
    with init_empty_weights():
        model = cls.from_config(cls.load_config(where, subfolder=sub))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _load_fp8(cls, where: str, sub: str | None, dtype: torch.dtype) -> torch.nn.Module:
    """fp8 storage without ever holding the model in ``dtype``: storage dtypes are set
    on the meta model, then each tensor is cast as it is read (framepack.models.lazy_load).
    Peak RAM is the fp8 model plus one tensor instead of the whole bf16 model."""
    from accelerate import init_empty_weights

    from framepack.models.lazy_load import checkpoint_files, load_into_meta_model
    from framepack.models.quantize import apply_fp8_storage

    with init_empty_weights():
        model = cls.from_config(cls.load_config(where, subfolder=sub)).to(dtype)
    apply_fp8_storage(model, dtype)
    load_into_meta_model(model, checkpoint_files(where, sub), dtype)
    return model


@dataclass
class SectionContext:
    """Clean context of one section, already in the transformer's dtype and device."""

    indices_latents: torch.Tensor  # (lws,) 1-D
    latents_clean: torch.Tensor  # (1, 16, 2, h, w)
    indices_latents_clean: torch.Tensor  # (2,)
    latents_history_2x: torch.Tensor  # (1, 16, 2, h, w)
    indices_latents_history_2x: torch.Tensor  # (2,)
    latents_history_4x: torch.Tensor  # (1, 16, 16, h, w)
    indices_latents_history_4x: torch.Tensor  # (16,)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def forward_velocity(transformer: torch.nn.Module, **inputs) -> torch.Tensor:
    """One full transformer call -> velocity (B, 16, T, h, w)."""
    return transformer(**inputs, return_dict=False)[0]
