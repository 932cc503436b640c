"""Live preview: each step's x0 prediction as a small RGB image, without the VAE.

A fixed linear map from the 16 latent channels to RGB plus a bias, the
"fake VAE decode" the original FramePack shows while it samples
(lllyasviel/FramePack, diffusers_helper/hunyuan.py, ``vae_decode_fake``).
The factors are the ones ComfyUI fitted for HunyuanVideo latents
(comfyanonymous/ComfyUI, comfy/latent_formats.py, ``HunyuanVideo.
latent_rgb_factors`` and ``latent_rgb_factors_bias``); they apply to the
scaled latents the sampler works on. One latent pixel becomes one image
pixel, so the preview is 1/8 of the video's size: a glimpse, not a frame.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from framepack.hookspecs import hookimpl
from framepack.output.writing import partial_path

# (16, 3): row c is latent channel c's contribution to (R, G, B).
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_to_rgb(x0: torch.Tensor, frame: int | None = -1) -> np.ndarray:
    """x0 (B, 16, T, h, w) -> uint8 (h, w, 3) of latent frame ``frame`` of
    the first sample (-1: the last), or with ``frame=None`` every frame side
    by side, (h, T * w, 3), as the original's preview shows them.

    Output in [0, 1] is clamped and scaled to 0..255, as the original does.
    Runs where x0 is (a (16, h, w) slice and a 16x3 matmul) and copies only
    the small image back.
    """
    if x0.ndim != 5 or x0.shape[1] != len(LATENT_RGB_FACTORS):
        raise ValueError(f"expected x0 (B, 16, T, h, w), got {tuple(x0.shape)}")
    if frame is not None and not -x0.shape[2] <= frame < x0.shape[2]:
        raise IndexError(f"frame {frame} is outside the {x0.shape[2]} latent frames")
    x = x0[0].detach() if frame is None else x0[0, :, frame : (frame + 1) or None].detach()  # (16, t, h, w)
    weight = torch.tensor(LATENT_RGB_FACTORS, device=x.device, dtype=torch.float32)  # (16, 3)
    bias = torch.tensor(LATENT_RGB_BIAS, device=x.device, dtype=torch.float32)  # (3,)
    rgb = torch.einsum("cthw,ck->thwk", x.float(), weight) + bias  # (t, h, w, 3)
    rgb = (rgb.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    t, h, w, _ = rgb.shape
    return rgb.permute(1, 0, 2, 3).reshape(h, t * w, 3).cpu().numpy()  # frames left to right


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path = Path(path)
    tmp = partial_path(path)
    try:
        Image.fromarray(image, "RGB").save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)  # a viewer watching the file never sees half an image
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PreviewWriter:
    """Progress listener that keeps ``path`` showing the latest step's preview.

    Register it on the job's plugin manager (``pm.register(PreviewWriter(path))``).
    It writes on every ``every``-th step of a section and on each section's
    last step, but never more often than ``max_per_second``; the steps in
    between cost one integer comparison. A preview that cannot be written
    (disk full, folder gone) gives one warning and stops the previews, not
    the job.
    """

    def __init__(
        self,
        path: Path,
        every: int = 1,
        max_per_second: float = 4.0,
        frame: int | None = -1,
        scale: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be 1 or more, got {every}")
        if scale < 1:
            raise ValueError(f"scale must be 1 or more, got {scale}")
        self.path = Path(path)
        self.every = every
        self.min_interval = 1.0 / max_per_second if max_per_second > 0 else 0.0
        self.frame = frame
        self.scale = scale
        self.clock = clock
        self.last_written: float | None = None
        self.written = 0
        self.failed = False

    @hookimpl
    def framepack_on_step(self, event) -> None:
        if event.denoised is None or self.failed:
            return
        last_step = event.step == event.steps - 1
        if (event.step + 1) % self.every and not last_step:
            return
        now = self.clock()
        if self.last_written is not None and now - self.last_written < self.min_interval:
            return
        image = latent_to_rgb(event.denoised, self.frame)
        if self.scale > 1:  # nearest-neighbour, so latent pixels stay visible as such
            image = image.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        try:
            write_png_atomic(self.path, image)
        except OSError as exc:
            self.failed = True
            warnings.warn(f"preview: cannot write {self.path} ({exc}); no more previews in this job", stacklevel=2)
            return
        self.last_written = now
        self.written += 1
