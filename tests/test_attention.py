"""The engine's attention processors give the same output as diffusers' own."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from diffusers.models.attention_processor import Attention

from framepack.attention.processors import install_attention
from framepack_plugins.attention.sdpa import sdpa_kernel


def inputs(batch: int, text_lengths: list[int]):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g)

    mask = torch.zeros(batch, 12, dtype=torch.bool)
    for i, n in enumerate(text_lengths):
        mask[i, :n] = True
    return dict(
        hidden_states=r(batch, 16, 3, 8, 8),
        timestep=torch.tensor([900.0] * batch),
        encoder_hidden_states=r(batch, 12, 32),
        encoder_attention_mask=mask,
        pooled_projections=r(batch, 32),
        image_embeds=r(batch, 16, 32),
        guidance=torch.tensor([10000.0] * batch),
        indices_latents=torch.arange(3, 6),
        latents_clean=r(batch, 16, 2, 8, 8),
        indices_latents_clean=torch.tensor([0, 6]),
        latents_history_2x=r(batch, 16, 2, 8, 8),
        indices_latents_history_2x=torch.tensor([7, 8]),
        latents_history_4x=r(batch, 16, 16, 8, 8),
        indices_latents_history_4x=torch.arange(9, 25),
    )


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


@pytest.mark.parametrize("batch, lengths", [(1, [7]), (2, [7, 12]), (2, [3, 5])])
def test_same_output_as_diffusers_processors(transformer, batch, lengths):
    ours = copy.deepcopy(transformer)
    assert install_attention(ours, sdpa_kernel) == sum(isinstance(m, Attention) for m in ours.modules())
    x = inputs(batch, lengths)
    with torch.no_grad():
        expected = transformer(**x, return_dict=False)[0]
        got = ours(**x, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kernel_reaches_every_attention_module_including_the_refiner(transformer):
    ours = copy.deepcopy(transformer)
    seen = []

    def counting_kernel(q, k, v, mask):
        seen.append(q.shape[1])
        return sdpa_kernel(q, k, v, mask)

    install_attention(ours, counting_kernel)
    n_modules = sum(isinstance(m, Attention) for m in ours.modules())
    with torch.no_grad():
        ours(**inputs(1, [7]), return_dict=False)
    assert len(seen) == n_modules == 3  # refiner, double block, single block
    # The refiner attends over the 12 padded text tokens with a mask.
    assert 12 in seen


def test_bf16_transformer_keeps_only_proj_out_in_fp32(tiny_model):
    from framepack.pipeline.transformer import keep_output_head_fp32

    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(
        tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16
    ).eval()
    keep_output_head_fp32(model)
    seen = {}
    def record(module, args, out):
        seen["norm_out"] = out.dtype  # returns None: a forward hook's return value would replace the output

    model.norm_out.register_forward_hook(record)
    x = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs(1, [7]).items()}
    with torch.no_grad():
        out = model(**x, return_dict=False)[0]
    # As the original: norm_out in bf16, then the upcast, proj_out in float32.
    assert seen["norm_out"] == torch.bfloat16
    assert model.proj_out.weight.dtype == torch.float32 and out.dtype == torch.float32
