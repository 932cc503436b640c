"""Peak memory of one HunyuanVideo VAE decode, worked out from the VAE's config.

Why not a rule of thumb: at 2048x2048 the plan said 7.5 GB and diffusers'
``AutoencoderKLHunyuanVideo`` then asked for 107 GB. Two terms scale quite
differently and both matter:

* the mid-block attention at latent resolution builds a causal mask of
  N x N, N = latent frames x (H/8) x (W/8) (diffusers'
  ``prepare_causal_attention_mask``: a bool N x N, then float32, then the
  VAE's dtype). At 2048x2048 with 5 latent frames per temporal tile N is
  327,680 and the bool alone is 107 GB; it grows with the 4th power of size;
* the convolutions at full resolution: the up-block that reaches full size
  holds about four copies of a (256, 17, H, W) tensor while it upsamples.

So this follows the decoder's own code (diffusers 0.42) layer by layer
and counts the tensors alive at each step: the input a caller still holds,
GroupNorm and SiLU outputs, the replicate-padded copy every causal conv makes,
the conv output and its workspace, upsampling's copies, the attention mask,
the tiles already decoded. It is checked against the measured peak RSS of
real decodes on the CPU (benchmarks/vae_decode_bench.py,
benchmarks/results/vae-decode-cpu.json; tests/test_vae_plan.py).

Convolution workspace, the one part that depends on the device: on the CPU,
PyTorch runs a float32 conv3d through oneDNN when batch x channels x depth x
height of its input is over 20,480 (aten/src/ATen/native/Convolution.cpp); oneDNN
reorders the input into its blocked layout (one more copy of the padded input,
and the output padded to 8 channels). Below that, or in another dtype, it uses
vol2col, whose buffer is 27 x the input channels x the output volume (this
is what the 8-channel test VAE hits at small sizes). On CUDA, cuDNN's workspace
is not counted: not measured yet (no GPU in the runs so far).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MKLDNN_MIN_INPUT = 20_480  # N*C*D*H above which PyTorch's CPU conv3d uses oneDNN
# measured = FIT_SCALE * counted + FIT_BYTES, least squares in relative error over the
# 28 CPU decodes of benchmarks/results/vae-decode-cpu.json (largest error 17 %). What
# the count misses is small and spread out: oneDNN's weight reorders and primitive
# caches, allocator rounding, the small tensors under the mmap threshold.
FIT_SCALE = 1.06
FIT_BYTES = 4 * 2**20


@dataclass(frozen=True)
class VaeGeometry:
    """What the decode's memory depends on: the config's shape, and the tiling
    settings (diffusers' defaults for ``AutoencoderKLHunyuanVideo``, in pixels and
    pixel frames; plugins/encoders/hunyuan_vae.py passes these same values)."""

    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    tile_sample_stride_num_frames: int = 12

    @classmethod
    def from_config(cls, config: dict) -> VaeGeometry:
        """From a vae/config.json as ``save_pretrained`` writes it; missing keys
        take diffusers' defaults, which are the original's."""
        names = ("latent_channels", "out_channels", "layers_per_block", "spatial_compression_ratio",
                 "temporal_compression_ratio", "mid_block_add_attention")
        values = {name: config[name] for name in names if name in config}
        if "block_out_channels" in config:
            values["block_out_channels"] = tuple(config["block_out_channels"])
        return cls(**values)

    def tiling_kwargs(self) -> dict[str, int]:
        """Keyword arguments for diffusers' ``enable_tiling``."""
        return {name: getattr(self, name) for name in (
            "tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_num_frames",
            "tile_sample_stride_height", "tile_sample_stride_width", "tile_sample_stride_num_frames")}


def decode_peak_bytes(vae: VaeGeometry, latent_frames: int, height: int, width: int, dtype_bytes: int,
                      tiling: bool, device: str = "cuda") -> float:
    """Peak bytes above the VAE's weights while ``HunyuanVae.decode`` turns latents
    (1, C, latent_frames, height/8, width/8) into float32 pixels, output included."""
    model = _Decoder(vae, dtype_bytes, device)
    lat_h, lat_w = height // vae.spatial_compression_ratio, width // vae.spatial_compression_ratio
    peak, out = model.temporal(latent_frames, lat_h, lat_w, tiling)
    if dtype_bytes != 4:  # HunyuanVae.decode's .float() of the output
        peak = max(peak, out + out / dtype_bytes * 4)
    return FIT_SCALE * peak + FIT_BYTES


class _Decoder:
    """Walks diffusers' HunyuanVideoDecoder3D. Each method takes ``held``, the bytes
    its callers keep alive (its own input included), and returns (peak bytes
    during the call, bytes of the result)."""

    def __init__(self, vae: VaeGeometry, dtype_bytes: int, device: str) -> None:
        self.vae, self.b, self.device = vae, dtype_bytes, device

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.vae.temporal_compression_ratio * (latent_frames - 1)

    # -- tiling, as AutoencoderKLHunyuanVideo._temporal_tiled_decode / tiled_decode --------

    def temporal(self, t: int, h: int, w: int, tiling: bool) -> tuple[float, float]:
        vae, tr = self.vae, self.vae.temporal_compression_ratio
        tile_t, stride_t = vae.tile_sample_min_num_frames // tr, vae.tile_sample_stride_num_frames // tr
        if t <= tile_t:  # framewise decoding is on by default; short clips go in one piece
            return self.spatial(0.0, t, h, w, tiling)
        peak, held, kept = 0.0, 0.0, 0
        for index, start in enumerate(range(0, t, stride_t)):
            frames = min(tile_t + 1, t - start)
            p, out = self.spatial(held, frames, h, w, tiling)
            peak, held = max(peak, p), held + out  # every decoded tile stays in a list until the end
            decoded = self.pixel_frames(frames) - (1 if index else 0)
            kept += min(vae.tile_sample_stride_num_frames + (0 if index else 1), decoded)
        result = self.pixels(kept, h, w)  # the torch.cat of the blended pieces
        return max(peak, held + result), result

    def spatial(self, held: float, t: int, h: int, w: int, tiling: bool) -> tuple[float, float]:
        vae, sr = self.vae, self.vae.spatial_compression_ratio
        tile_h, tile_w = vae.tile_sample_min_height // sr, vae.tile_sample_min_width // sr
        if not tiling or (h <= tile_h and w <= tile_w):
            return self.decoder(held, t, h, w)
        stride_h, stride_w = vae.tile_sample_stride_height // sr, vae.tile_sample_stride_width // sr
        peak, tiles = 0.0, 0.0
        for i in range(0, h, stride_h):
            for j in range(0, w, stride_w):
                p, out = self.decoder(held + tiles, t, min(tile_h, h - i), min(tile_w, w - j))
                peak, tiles = max(peak, p), tiles + out
        result = self.pixels(self.pixel_frames(t), h, w)
        # Blending is in place; then one torch.cat per row, kept while the rows are joined.
        return max(peak, held + tiles + 2 * result), result

    def pixels(self, frames: int, h: int, w: int) -> float:
        sr = self.vae.spatial_compression_ratio
        return self.vae.out_channels * frames * h * sr * w * sr * self.b

    # -- HunyuanVideoDecoder3D.forward ---------------------------------------------------

    def decoder(self, held: float, t: int, h: int, w: int) -> tuple[float, float]:
        vae, b = self.vae, self.b
        channels = list(reversed(vae.block_out_channels))
        z = vae.latent_channels * t * h * w * b
        held += 2 * z  # the tile and post_quant_conv's output
        peaks = []
        p, x = self.conv(held, vae.latent_channels, channels[0], t, h, w)
        peaks.append(p)
        p, x = self.mid(held + x, channels[0], t, h, w)
        peaks.append(p)
        f = t
        spatial_up = int(math.log2(vae.spatial_compression_ratio))
        time_up = int(math.log2(vae.temporal_compression_ratio))
        c_in = channels[0]
        for i, c_out in enumerate(channels):
            block_input = x  # Decoder.forward keeps it while the block runs
            for k in range(vae.layers_per_block + 1):
                p, y = self.resnet(held + block_input + (x if k else 0), c_in if k == 0 else c_out, c_out, f, h, w)
                peaks.append(p)
                x = y
            last = i == len(channels) - 1
            if i < spatial_up:
                tf = 2 if (i >= len(channels) - 1 - time_up and not last) else 1
                p, x = self.upsample(held + block_input + x, c_out, f, h, w, tf)
                peaks.append(p)
                f, h, w = 1 + tf * (f - 1), 2 * h, 2 * w
            c_in = c_out
        c = channels[-1]
        s = c * f * h * w * b
        peaks.append(held + 2 * s)  # conv_norm_out's output and SiLU's (the up-blocks' output is freed)
        p, out = self.conv(held + s, c, vae.out_channels, f, h, w)
        peaks.append(p)
        return max(peaks), out

    def conv(self, held: float, c_in: int, c_out: int, f: int, h: int, w: int, k: int = 3) -> tuple[float, float]:
        """HunyuanVideoCausalConv3d: replicate-pad (k-1 frames before, (k-1)/2 around), then conv3d."""
        b = self.b
        padded = c_in * (f + k - 1) * (h + k - 1) * (w + k - 1) * b
        out = c_out * f * h * w * b
        if self.device != "cpu":
            work = 0.0
        elif b == 4 and c_in * (f + k - 1) * (h + k - 1) > MKLDNN_MIN_INPUT:
            work = padded + (-(-c_out // 8) * 8 - c_out) * f * h * w * b  # oneDNN's blocked copies
        else:
            work = c_in * k**3 * f * h * w * b  # vol2col
        return held + padded + out + work, out

    def resnet(self, held: float, c_in: int, c_out: int, f: int, h: int, w: int) -> tuple[float, float]:
        """HunyuanVideoResnetBlockCausal3D; ``held`` includes its input x (the residual)."""
        b, s = self.b, f * h * w
        x, o = c_in * s * b, c_out * s * b
        peaks = [held + 2 * x]  # norm1's output and SiLU's
        p, _ = self.conv(held + x, c_in, c_out, f, h, w)
        peaks += [p, held + 2 * o]  # norm2, SiLU
        p, _ = self.conv(held + o, c_out, c_out, f, h, w)
        peaks.append(p)
        residual = 0.0
        if c_in != c_out:
            p, residual = self.conv(held + o, c_in, c_out, f, h, w, k=1)
            peaks.append(p)
        peaks.append(held + o + residual + o)  # hidden + residual
        return max(peaks), o

    def upsample(self, held: float, c: int, f: int, h: int, w: int, tf: int) -> tuple[float, float]:
        """HunyuanVideoUpsampleCausal3D: first frame 2x in space, the others (tf, 2, 2), cat, conv."""
        b = self.b
        first = c * 4 * h * w * b
        if f == 1:
            return self.conv(held + first, c, c, 1, 2 * h, 2 * w)
        f2 = 1 + tf * (f - 1)
        copy = c * (f - 1) * h * w * b  # other_frames.contiguous()
        others = c * tf * (f - 1) * 4 * h * w * b
        joined = c * f2 * 4 * h * w * b
        p, out = self.conv(held + first + others + joined, c, c, f2, 2 * h, 2 * w)
        return max(held + first + copy + others, p), out

    def mid(self, held: float, c: int, f: int, h: int, w: int) -> tuple[float, float]:
        """HunyuanVideoMidBlock3D: resnet, causal self-attention over all f*h*w tokens, resnet."""
        b, n = self.b, f * h * w
        x = c * n * b
        p0, _ = self.resnet(held, c, c, f, h, w)
        if not self.vae.mid_block_add_attention:
            p1, _ = self.resnet(held + x, c, c, f, h, w)
            return max(p0, p1), x
        # held + resnet output; permute + flatten copies it, then the mask: bool and
        # float32 together, then (another dtype) float32 and the cast together.
        tokens = held + 2 * x
        mask_build = n * n * max(1 + 4, 4 + (b if b != 4 else 0))
        mask = n * n * b
        # group_norm, q, k, v, sdpa output and its reshaped copy.
        attention = tokens + mask + 6 * x
        # the mask stays referenced while the second resnet runs
        p1, _ = self.resnet(held + mask + x, c, c, f, h, w)
        return max(p0, tokens + mask_build, attention, p1), x
