"""The offload contract: where each model's weights live, stage by stage.

The engine loads each stage's models to CPU RAM when that stage comes and
hands them to the policy with ``prepare`` (called several times per job, each
call adding models: text encoders, then image encoder and VAE, then the
transformer once the encoders are released). It wraps each stage of the job
in ``stage(...)`` naming the models that stage runs (``text_encoder``, ``text_encoder_2``,
``image_encoder``, ``vae``, ``transformer``). Inputs go to
``execution_device``; the policy makes sure the named models can run there.
``release`` says the job is done with some models (the encoders, once the
prompt and image are encoded): the policy drops its references so their
memory goes back as soon as the engine drops its own.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch


class OffloadPolicy(Protocol):
    execution_device: torch.device

    def prepare(self, models: dict[str, torch.nn.Module]) -> None: ...

    def stage(self, *names: str) -> contextlib.AbstractContextManager[None]: ...

    def release(self, *names: str) -> None: ...

    def describe(self) -> str: ...


def resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored now."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class StageTracker:
    """Shared bookkeeping: which models exist, which stage is running."""

    def __init__(self, device: torch.device) -> None:
        self.execution_device = resolve_device(device)
        self.models: dict[str, torch.nn.Module] = {}

    def _check(self, names: tuple[str, ...]) -> None:
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise KeyError(f"stage names unknown model(s) {unknown}; loaded: {sorted(self.models)}")

    def _add(self, models: dict[str, torch.nn.Module]) -> None:
        again = sorted(set(models) & set(self.models))
        if again:
            raise KeyError(f"model(s) {again} were already prepared; release them first")
        self.models.update(models)

    def release(self, *names: str) -> None:
        self._check(names)
        for name in names:
            del self.models[name]
        if self.execution_device.type == "cuda":
            torch.cuda.empty_cache()
