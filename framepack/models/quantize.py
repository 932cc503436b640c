"""Weight formats beyond the compute dtype: fp8 storage and 4-bit NF4.

* fp8: weights stored as float8_e4m3fn and upcast layer by layer to the
  compute dtype (diffusers' layerwise casting). Runs anywhere torch has float8.
* nf4: bitsandbytes 4-bit NormalFloat. transformers quantizes on CPU or GPU;
  diffusers' quantizer (the transformer) needs CUDA.

What stays in the compute dtype, and why (measured with benchmarks/ram_bench.py
on the full-size transformer; the planner counts the same way):

* both formats: the input embedders, the token refiner, the timestep/text/guidance
  embedders, the image projection, the final AdaLN (norm_out) and the output head
  proj_out, which runs in float32 as in the original. They are small (about 0.5B of
  12.9B parameters) and sit where rounding errors reach every token.
* fp8 also keeps every block's AdaLN modulation (norm1/norm1_context/norm.linear,
  3.4B parameters) in bf16, as diffusers' layerwise casting does by default: an
  fp8 transformer is 9.06B parameters in fp8 plus 3.81B in bf16 = 16.7 GB, not 13.
* nf4 quantizes the AdaLN linears too (12.46B parameters in 4 bits, 0.42B kept:
  7.8 GB): NF4 is the format for 6-8 GB cards and 16 GB of RAM, where those 3.4B
  parameters would cost 5 GB more than in 4 bits.

An earlier keep-list matched "proj_out" and "norm" anywhere in a name, which kept the
40 single blocks' proj_out (1.9B parameters) unquantized by accident; the patterns
below are anchored so only the intended modules match (tests check the counts).
"""

from __future__ import annotations

import importlib.util

import torch

from framepack.errors import UserError

# Layerwise casting: regexes searched in module names.
FP8_KEEP = ("^x_embedder", "^clean_x_embedder", "^context_embedder", "^time_text_embed", "^image_projection",
            "norm", "^proj_out$")
# bitsandbytes: a module is kept when its own name is listed or its full name equals or
# starts with an entry followed by a dot (diffusers' rule), so top-level names only.
# proj_out is not listed (that would keep every single block's proj_out as well):
# the output head is put back in float32 after loading (restore_output_head).
NF4_KEEP = ["x_embedder", "clean_x_embedder", "context_embedder", "time_text_embed", "image_projection", "norm_out"]


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
    return _nf4_config(dtype)


def _nf4_config(dtype: torch.dtype):
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(NF4_KEEP),
    )


def apply_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    model.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype, skip_modules_pattern=FP8_KEEP
    )


def quantized_parameter_names(meta_model: torch.nn.Module, fmt: str) -> set[str]:
    """Parameters the format stores quantized, found by applying the real mechanism to
    a throwaway meta model (no weights needed): layerwise casting for fp8, diffusers'
    bitsandbytes layer replacement for nf4 (which quantizes weights, not biases)."""
    if fmt == "fp8":
        from framepack.models.sources import quiet_libraries

        with quiet_libraries():  # diffusers warns about .to(dtype) on any model
            apply_fp8_storage(meta_model.to(torch.bfloat16), torch.bfloat16)
        return {name for name, p in meta_model.named_parameters() if p.dtype == torch.float8_e4m3fn}
    if fmt == "nf4":
        from bitsandbytes.nn import Linear4bit
        from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

        model = replace_with_bnb_linear(meta_model, modules_to_not_convert=list(NF4_KEEP),
                                        quantization_config=_nf4_config(torch.bfloat16))
        return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear4bit)}
    return set()


def restore_output_head(model: torch.nn.Module, files, compute_dtype: torch.dtype) -> None:
    """Put back an unquantized proj_out, read from the checkpoint (see NF4_KEEP)."""
    from safetensors import safe_open

    head = model.proj_out
    linear = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in ("proj_out.weight", "proj_out.bias"):
                if name in handle.keys():
                    found[name] = handle.get_tensor(name)
    linear.weight.data = found["proj_out.weight"].to(compute_dtype).clone()
    if linear.bias is not None:
        linear.bias.data = found["proj_out.bias"].to(compute_dtype).clone()
    device = next(model.parameters()).device
    model.proj_out = linear.to(device).requires_grad_(False)


def text_quantization_config(fmt: str, dtype: torch.dtype):
    if fmt == "none":
        return None
    require_bitsandbytes("text_encoder")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
