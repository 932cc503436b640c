"""Offload policy `model_swap`: only the running stage's models on the accelerator.

Weights live in CPU RAM; entering a stage moves its models to the
accelerator and moves every other model back first, so the peak is the
largest stage rather than the sum. The transformer still has to fit whole;
block-level streaming for small cards is a separate policy.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from framepack.backends import OffloadBackend
from framepack.hookspecs import hookimpl
from framepack.offload import StageTracker, module_device


class ModelSwapPolicy(StageTracker):
    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.resident: set[str] = set()
        self.swaps = 0  # how many model moves to the accelerator (for tests and logs)

    def prepare(self, models: dict[str, torch.nn.Module]) -> None:
        self.models = dict(models)
        for module in self.models.values():
            module.to("cpu")
        self.resident.clear()

    @contextlib.contextmanager
    def stage(self, *names: str) -> Iterator[None]:
        self._check(names)
        wanted = set(names)
        for name in sorted(self.resident - wanted):
            self.models[name].to("cpu")
            self.resident.discard(name)
        if self.execution_device.type == "cuda":
            # Give the freed blocks back before the next model's copy needs them.
            torch.cuda.empty_cache()
        for name in names:
            if name not in self.resident:
                if module_device(self.models[name]) != self.execution_device:
                    self.swaps += 1
                self.models[name].to(self.execution_device)
                self.resident.add(name)
        yield

    def release(self, *names: str) -> None:
        super().release(*names)
        self.resident.difference_update(names)

    def describe(self) -> str:
        return f"one stage's models at a time on {self.execution_device}, the rest in CPU RAM"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="model_swap",
            make_policy=lambda options, device: ModelSwapPolicy(device),
            description="only the running stage's models on the accelerator, the rest in CPU RAM",
        )
    )
