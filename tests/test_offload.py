"""Offload policies: stage bookkeeping on CPU, real placement on CUDA."""

from __future__ import annotations

import pytest
import torch

from framepack_plugins.offload.model_swap import ModelSwapPolicy
from framepack_plugins.offload.resident import ResidentPolicy


def models():
    return {"text_encoder": torch.nn.Linear(4, 4), "vae": torch.nn.Linear(4, 4), "transformer": torch.nn.Linear(4, 4)}


@pytest.mark.parametrize("policy_cls", [ResidentPolicy, ModelSwapPolicy])
def test_unknown_stage_and_release(policy_cls):
    policy = policy_cls("cpu")
    policy.prepare(models())
    with pytest.raises(KeyError, match="nope"):
        with policy.stage("nope"):
            pass
    with policy.stage("vae"):
        pass
    policy.release("text_encoder")
    assert "text_encoder" not in policy.models
    with pytest.raises(KeyError):
        with policy.stage("text_encoder"):
            pass


def test_model_swap_tracks_the_stage():
    policy = ModelSwapPolicy("cpu")
    policy.prepare(models())
    with policy.stage("text_encoder"):
        assert policy.resident == {"text_encoder"}
    with policy.stage("transformer"):
        assert policy.resident == {"transformer"}
    policy.release("transformer")
    assert policy.resident == set()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.mark.gpu
@needs_cuda
def test_model_swap_keeps_only_the_stage_on_the_gpu():
    policy = ModelSwapPolicy("cuda")
    policy.prepare(models())
    with policy.stage("vae"):
        placed = {n: next(m.parameters()).device.type for n, m in policy.models.items()}
        assert placed == {"text_encoder": "cpu", "vae": "cuda", "transformer": "cpu"}
    with policy.stage("transformer"):
        assert next(policy.models["vae"].parameters()).device.type == "cpu"
        assert next(policy.models["transformer"].parameters()).device.type == "cuda"


@pytest.mark.gpu
@needs_cuda
def test_resident_puts_everything_on_the_gpu():
    policy = ResidentPolicy("cuda")
    policy.prepare(models())
    assert all(next(m.parameters()).is_cuda for m in policy.models.values())


@pytest.mark.parametrize("policy_cls", [ResidentPolicy, ModelSwapPolicy])
def test_prepare_adds_models_stage_by_stage(policy_cls):
    """The engine prepares the text encoders, then the image encoder and VAE, then
    the transformer; each call adds to what is already placed."""
    policy = policy_cls("cpu")
    first, later = models(), {"image_encoder": torch.nn.Linear(4, 4)}
    policy.prepare({"text_encoder": first["text_encoder"]})
    with policy.stage("text_encoder"):
        pass
    policy.release("text_encoder")
    policy.prepare(later)
    policy.prepare({"transformer": first["transformer"]})
    assert set(policy.models) == {"image_encoder", "transformer"}
    with policy.stage("transformer"):
        pass
    with pytest.raises(KeyError, match="already prepared"):
        policy.prepare({"transformer": torch.nn.Linear(4, 4)})
