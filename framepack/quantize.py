"""Weight formats beyond the compute dtype: fp8 storage and 4-bit NF4.

* fp8: weights stored as float8_e4m3fn and upcast layer by layer to the
  compute dtype (diffusers' layerwise casting): half the bytes of bf16, small
  quality cost. Runs anywhere torch has float8.
* nf4: bitsandbytes 4-bit NormalFloat, a quarter of bf16. transformers
  quantizes on CPU or GPU; diffusers' quantizer (the transformer) needs CUDA.

Small, precision-sensitive layers (embedders, norms, the output head) stay in
the compute dtype in both formats.
"""

from __future__ import annotations

import importlib.util

import torch

from framepack.errors import UserError

# Layers that stay unquantized (regexes / module names, as the libraries expect).
KEEP_TRANSFORMER = ("x_embedder", "context_embedder", "norm", "proj_out", "image_projection", "time_text_embed")


def require_bitsandbytes(part: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"quantize.{part} = \"nf4\" needs `pip install framepack[bnb]` (bitsandbytes is not installed)"
        )


def transformer_quantization_config(fmt: str, dtype: torch.dtype, device: torch.device):
    """quantization_config for from_pretrained, or None (fp8 is applied after loading)."""
    if fmt != "nf4":
        return None
    require_bitsandbytes("transformer")
    if device.type != "cuda":
        raise UserError(
            "quantize.transformer = \"nf4\" needs a CUDA GPU (diffusers' bitsandbytes quantizer); "
            "use \"fp8\" or \"none\" here"
        )
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(KEEP_TRANSFORMER),
    )


def apply_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    model.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype, skip_modules_pattern=KEEP_TRANSFORMER
    )


def text_quantization_config(fmt: str, dtype: torch.dtype):
    if fmt == "none":
        return None
    require_bitsandbytes("text_encoder")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
