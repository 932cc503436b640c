"""Offload policy `resident`: every model stays on the accelerator.

The fastest choice when everything fits (about 40 GB in the original's
dtypes: 26 GB transformer, 16 GB Llama in fp16 less what can be freed).
"""

from __future__ import annotations

import contextlib

import torch

from framepack.backends import OffloadBackend
from framepack.hookspecs import hookimpl
from framepack.engine.offload import StageTracker


class ResidentPolicy(StageTracker):
    def prepare(self, models: dict[str, torch.nn.Module]) -> None:
        self._add(models)
        for module in models.values():
            module.to(self.execution_device)

    def stage(self, *names: str) -> contextlib.AbstractContextManager[None]:
        self._check(names)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"all models resident on {self.execution_device}"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="resident",
            make_policy=lambda options, device: ResidentPolicy(device),
            description="every model kept on the accelerator (needs VRAM for all of them)",
        )
    )
