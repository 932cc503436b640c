"""Offload policy `dynamic_swap`: the original's low-VRAM behaviour, kept as the
baseline the faster policies are measured against.

The transformer's and the Llama encoder's weights stay in ordinary (unpinned)
CPU RAM. Right before each layer runs, its weights are copied to the
accelerator; right after, the copies are dropped. Copies are synchronous, so
the accelerator waits for every transfer. Other models are swapped whole per
stage, as in `model_swap`.
"""

from __future__ import annotations

import torch

from framepack.backends import OffloadBackend
from framepack.hookspecs import hookimpl
from framepack_plugins.offload.model_swap import ModelSwapOptions, ModelSwapPolicy

class LayerSwap:
    """The hooks of one module: its own weights in before forward, the CPU
    originals back after (the device copies are simply dropped)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.saved: dict[tuple[bool, str], torch.Tensor] = {}

    def before(self, module: torch.nn.Module, args) -> None:
        for is_param, store in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in store.items():
                if tensor is None or tensor.device == self.device:
                    continue
                self.saved[(is_param, name)] = tensor
                moved = tensor.to(self.device)
                store[name] = torch.nn.Parameter(moved, requires_grad=False) if is_param else moved

    def after(self, module: torch.nn.Module, args, output) -> None:
        for (is_param, name), tensor in self.saved.items():
            (module._parameters if is_param else module._buffers)[name] = tensor
        self.saved.clear()


def install_dynamic_swap(model: torch.nn.Module, device: torch.device) -> list:
    """Hook every module that owns tensors; returns the hook handles."""
    handles = []
    for module in model.modules():
        if not any(t is not None for t in [*module._parameters.values(), *module._buffers.values()]):
            continue
        swap = LayerSwap(device)
        handles.append(module.register_forward_pre_hook(swap.before))
        handles.append(module.register_forward_hook(swap.after))
    return handles


class DynamicSwapPolicy(ModelSwapPolicy):
    STREAMED = ("transformer", "text_encoder")

    def stream(self, model: torch.nn.Module) -> None:
        install_dynamic_swap(model, self.execution_device)

    def describe(self) -> str:
        return f"transformer and Llama copied to {self.execution_device} layer by layer on every use (synchronous)"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="dynamic_swap",
            make_policy=lambda options, device: DynamicSwapPolicy(device, options),
            options=ModelSwapOptions,
            description="the original's low-VRAM mode: weights copied per layer per use, synchronously",
        )
    )
