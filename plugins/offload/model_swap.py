"""Offload policy `model_swap`: only the running stage's models on the accelerator.

Weights live in CPU RAM; entering a stage moves its models to the
accelerator and moves every other model back first, so the peak is the
largest stage rather than the sum. Before a move on CUDA it checks the model
fits while `reserve_gb` stays free, and stops with the numbers if not (instead
of an out-of-memory error half-way through a video).

Subclasses stream the models named in ``STREAMED`` layer by layer instead
(``stream``): those are never moved whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from framepack.backends import OffloadBackend
from framepack.errors import FramepackError
from framepack.hookspecs import hookimpl
from framepack.engine.offload import StageTracker, module_bytes, module_device

GIB = 1024**3


@dataclass(frozen=True)
class ModelSwapOptions:
    reserve_gb: float = 1.0  # VRAM kept free for activations and the allocator


class ModelSwapPolicy(StageTracker):
    STREAMED: tuple[str, ...] = ()  # models a subclass streams instead of moving whole

    def __init__(self, device: torch.device, options: ModelSwapOptions = ModelSwapOptions()) -> None:
        super().__init__(device)
        self.options = options
        self.resident: set[str] = set()
        self.streamed: set[str] = set()  # handled per layer by a subclass
        self.swaps = 0  # model moves to the accelerator (for tests and logs)

    def prepare(self, models: dict[str, torch.nn.Module]) -> None:
        self._add(models)
        for name, module in models.items():
            module.to("cpu")
            if name in self.STREAMED:
                self.stream(module)
                self.streamed.add(name)

    def stream(self, model: torch.nn.Module) -> None:
        """Make ``model`` run on the accelerator from CPU RAM (subclasses)."""
        raise NotImplementedError

    def _check_fits(self, name: str) -> None:
        if self.execution_device.type != "cuda":
            return
        need = module_bytes(self.models[name]) / GIB
        free = torch.cuda.mem_get_info(self.execution_device)[0] / GIB
        if need > free - self.options.reserve_gb:
            raise FramepackError(
                f"{name} needs {need:.1f} GB of VRAM but {free:.1f} GB is free and "
                f"{self.options.reserve_gb:g} GB must stay in reserve; use a profile that streams it "
                "(offload = [\"stream_prefetch\", \"dynamic_swap\"]) or lower reserve_gb"
            )

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
            if name in self.resident or name in self.streamed:
                continue
            if module_device(self.models[name]) != self.execution_device:
                self._check_fits(name)
                self.swaps += 1
            self.models[name].to(self.execution_device)
            self.resident.add(name)
        yield

    def release(self, *names: str) -> None:
        super().release(*names)
        self.resident.difference_update(names)
        self.streamed.difference_update(names)

    def describe(self) -> str:
        return f"one stage's models at a time on {self.execution_device}, the rest in CPU RAM"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="model_swap",
            make_policy=lambda options, device: ModelSwapPolicy(device, options),
            options=ModelSwapOptions,
            description="only the running stage's models on the accelerator, the rest in CPU RAM",
        )
    )
