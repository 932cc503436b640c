"""Image encoder `siglip`: SigLIP vision tower from flux_redux_bfl, last_hidden_state."""

from __future__ import annotations

import numpy as np
import torch

from framepack.backends import EncoderBackend
from framepack.hookspecs import hookimpl
from framepack.engine.offload import module_device


class SiglipImageEncoder:
    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor
        self.modules = {"image_encoder": model}

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """image: (H, W, 3) uint8, already cropped to the bucket -> (1, 729, 1152)."""
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        return self.model(pixel_values=pixels.to(module_device(self.model), param.dtype)).last_hidden_state


def load(source, options, dtype: torch.dtype, quantize: str = "none") -> SiglipImageEncoder:
    where, sub = source.location("image_encoder")
    with source.loading("image_encoder"):
        # Imported in the quiet block: the processor class announces its
        # torchvision fallback when first touched.
        from transformers import SiglipImageProcessor, SiglipVisionModel

        model = SiglipVisionModel.from_pretrained(where, subfolder=sub, dtype=dtype, use_safetensors=True).eval()
    where, sub = source.location("feature_extractor")
    with source.loading("feature_extractor"):
        # Without torchvision, transformers falls back to its PIL processor
        # (and says so; source.loading keeps that notice quiet).
        processor = SiglipImageProcessor.from_pretrained(where, subfolder=sub)
    return SiglipImageEncoder(model, processor)


@hookimpl
def framepack_register_encoders(register):
    register(
        EncoderBackend(
            name="siglip",
            kind="image",
            load=load,
            parts=("image_encoder", "feature_extractor"),
            description="SigLIP vision model (flux_redux_bfl), last_hidden_state",
        )
    )
