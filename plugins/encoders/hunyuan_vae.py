"""VAE `hunyuan`: HunyuanVideo's causal 3D VAE (8x spatial, 4x temporal)."""

from __future__ import annotations

import torch

from framepack.backends import EncoderBackend
from framepack.hookspecs import hookimpl
from framepack.engine.offload import module_device
from framepack.engine.vae_memory import VaeGeometry


class HunyuanVae:
    def __init__(self, vae) -> None:
        self.vae = vae
        self.modules = {"vae": vae}
        self.scaling_factor = float(vae.config.scaling_factor)  # 0.476986

    def set_tiling(self, enabled: bool) -> None:
        """Decode in overlapping spatial tiles (or not). Tiling trades a little seam
        blending for far less memory; the plan says when (``Plan.vae_tiling``: where an
        untiled decode would set the job's peak). The tile sizes are passed, not left
        to diffusers' defaults, so that they are the ones the plan assumed (VaeGeometry)."""
        if enabled:
            self.vae.enable_tiling(**VaeGeometry().tiling_kwargs())
        else:
            self.vae.disable_tiling()

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (1, 3, 1, H, W) in [-1, 1] -> latent (1, 16, 1, H/8, W/8) float32.

        The original draws .sample() from the global RNG, which makes a seed
        unrepeatable; we take the posterior mean instead (docs/algorithm.md).
        """
        posterior = self.vae.encode(pixels.to(module_device(self.vae), self._dtype())).latent_dist
        return (posterior.mean * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (1, 16, T, h, w) -> pixels (1, 3, 1 + 4*(T-1), 8h, 8w) float32, about [-1, 1]."""
        latents = (latents / self.scaling_factor).to(module_device(self.vae), self._dtype())
        return self.vae.decode(latents).sample.float()


def load(source, options, dtype: torch.dtype, quantize: str = "none") -> HunyuanVae:
    from diffusers import AutoencoderKLHunyuanVideo

    where, sub = source.location("vae")
    with source.loading("vae"):
        vae = AutoencoderKLHunyuanVideo.from_pretrained(where, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
    return HunyuanVae(vae.eval())


@hookimpl
def framepack_register_encoders(register):
    register(
        EncoderBackend(
            name="hunyuan_vae",
            kind="vae",
            load=load,
            parts=("vae",),
            description="AutoencoderKLHunyuanVideo, posterior mean on encode",
        )
    )
