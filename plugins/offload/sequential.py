"""Offload policy `sequential`: the transformer and Llama offloaded leaf by leaf.

diffusers' group offloading at leaf level: each leaf module's weights are
moved to the accelerator when it runs and back after. Lowest VRAM, many
synchronous transfers. Other models are swapped whole per stage.
"""

from __future__ import annotations

import torch

from framepack.backends import OffloadBackend
from framepack.hookspecs import hookimpl
from framepack_plugins.offload.model_swap import ModelSwapOptions, ModelSwapPolicy

class SequentialPolicy(ModelSwapPolicy):
    STREAMED = ("transformer", "text_encoder")

    def stream(self, model: torch.nn.Module) -> None:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model, onload_device=self.execution_device, offload_device=torch.device("cpu"), offload_type="leaf_level"
        )

    def describe(self) -> str:
        return f"transformer and Llama moved to {self.execution_device} one leaf module at a time"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="sequential",
            make_policy=lambda options, device: SequentialPolicy(device, options),
            options=ModelSwapOptions,
            description="leaf-level offload of the transformer and Llama (diffusers group offloading)",
        )
    )
