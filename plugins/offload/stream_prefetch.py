"""Offload policy `stream_prefetch`: block-level offload with asynchronous prefetch.

The transformer's and Llama's weights sit in pinned CPU memory; while block
i runs, block i+1 is copied on a separate CUDA stream, so most transfers hide
behind compute (diffusers' group offloading with streams). VRAM holds a
couple of blocks plus activations instead of the whole 26 GB transformer.
Other models are swapped whole per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framepack.backends import OffloadBackend
from framepack.hardware import HardwareInfo
from framepack.hookspecs import hookimpl
from framepack_plugins.offload.model_swap import ModelSwapPolicy

@dataclass(frozen=True)
class StreamPrefetchOptions:
    blocks_per_group: int = 1  # blocks moved per transfer; more = fewer, larger copies and more VRAM
    reserve_gb: float = 1.0  # for the models still swapped whole (VAE, encoders)
    # Pinned copies made at load time cost RAM equal to the weights; with
    # low_cpu_mem_usage they are pinned on the fly instead (slower, less RAM).
    low_cpu_mem_usage: bool = False


class StreamPrefetchPolicy(ModelSwapPolicy):
    STREAMED = ("transformer", "text_encoder")

    def stream(self, model: torch.nn.Module) -> None:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(
            model, onload_device=self.execution_device, offload_device=torch.device("cpu"),
            offload_type="block_level", num_blocks_per_group=self.options.blocks_per_group,
            use_stream=True, record_stream=True, low_cpu_mem_usage=self.options.low_cpu_mem_usage,
        )

    def describe(self) -> str:
        return (f"transformer and Llama streamed to {self.execution_device} block by block, "
                "next block prefetched on a CUDA stream")


def needs_cuda(hardware: HardwareInfo) -> str | None:
    return None if hardware.device == "cuda" else "needs CUDA (it overlaps copies on a CUDA stream)"


@hookimpl
def framepack_register_offload(register):
    register(
        OffloadBackend(
            name="stream_prefetch",
            make_policy=lambda options, device: StreamPrefetchPolicy(device, options),
            unavailable_reason=needs_cuda,
            options=StreamPrefetchOptions,
            description="block-level offload with the next block prefetched on a CUDA stream (pinned RAM)",
        )
    )
