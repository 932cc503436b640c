"""What plugins hand to the engine: one small frozen dataclass per family.

A backend says its name, how to build it from its options, and whether it
can run on the detected hardware (``unavailable_reason`` returns ``None``
when it can, else a short reason such as "needs CUDA" or "flash_attn is not
installed"). The engine resolves a backend once per job and then calls the
object it built directly.

Each backend owns its options: a frozen dataclass whose fields are the keys
allowed in the profile's ``[profiles.NAME.options.BACKEND]`` table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from framepack.errors import ConfigError
from framepack.hardware import HardwareInfo

FAMILIES = ("attention", "offload", "cache", "text_encoder", "image_encoder", "vae", "writer")


def always_available(hardware: HardwareInfo) -> str | None:
    return None


@dataclass(frozen=True)
class NoOptions:
    """For backends that take no options."""


class AttentionKernel(Protocol):
    def __call__(
        self,
        query: torch.Tensor,  # (B, Lq, H, D)
        key: torch.Tensor,  # (B, Lk, H, D)
        value: torch.Tensor,  # (B, Lk, H, D)
        attn_mask: torch.Tensor | None,  # bool, broadcastable to (B, H, Lq, Lk); True = attend
    ) -> torch.Tensor:  # (B, Lq, H, D)
        ...


class VarlenKernel(Protocol):
    """Attention over a batch packed without padding (flash-attn's varlen form)."""

    def __call__(
        self,
        query: torch.Tensor,  # (total_q, H, D), the batch's rows concatenated
        key: torch.Tensor,  # (total_k, H, D)
        value: torch.Tensor,  # (total_k, H, D)
        cu_seqlens_q: torch.Tensor,  # (B + 1,) int32 offsets into total_q
        cu_seqlens_k: torch.Tensor,  # (B + 1,) int32 offsets into total_k
        max_seqlen_q: int,
        max_seqlen_k: int,
    ) -> torch.Tensor:  # (total_q, H, D)
        ...


def no_version() -> str:
    return ""


@dataclass(frozen=True)
class AttentionBackend:
    """An attention kernel.

    Masks: with batch 1 the engine crops the text and passes no mask, so every
    kernel works. With a mask (batch > 1, and the token refiner), a kernel
    with ``supports_mask`` gets the dense bool mask; otherwise the engine uses
    ``make_varlen_kernel`` when given, else runs the kernel per sample on the
    unmasked part. A kernel that cannot mask is never handed a mask.
    """

    name: str
    make_kernel: Callable[[Any], AttentionKernel]
    supports_mask: bool
    unavailable_reason: Callable[[HardwareInfo], str | None] = always_available
    options: type = NoOptions
    description: str = ""
    make_varlen_kernel: Callable[[Any], VarlenKernel] | None = None
    # Version of the library behind the kernel; part of the self-check cache key.
    version: Callable[[], str] = no_version
    # Largest relative L2 error against sdpa the self-check accepts; None =
    # the engine's default for the dtype (see framepack.attention.check).
    tolerance: float | None = None
    family: str = field(default="attention", init=False)


@dataclass(frozen=True)
class OffloadBackend:
    name: str
    # make_policy(options, device) -> framepack.engine.offload.OffloadPolicy
    make_policy: Callable[[Any, torch.device], Any]
    unavailable_reason: Callable[[HardwareInfo], str | None] = always_available
    options: type = NoOptions
    description: str = ""
    family: str = field(default="offload", init=False)


@dataclass(frozen=True)
class CacheBackend:
    name: str
    # make_cache(options) -> framepack.caching.stepcache.StepCache
    make_cache: Callable[[Any], Any]
    unavailable_reason: Callable[[HardwareInfo], str | None] = always_available
    options: type = NoOptions
    description: str = ""
    family: str = field(default="cache", init=False)


@dataclass(frozen=True)
class EncoderBackend:
    name: str
    kind: str  # "text", "image" or "vae"
    # load(model_source, options, dtype, quantize) -> an encoder object (see
    # plugins/encoders/); quantize is the profile's weight format for this
    # part ("none" or "nf4"); a backend that cannot quantize raises UserError.
    load: Callable[[Any, Any, torch.dtype, str], Any]
    # Subfolders of a model folder this encoder reads, checked before loading.
    parts: tuple[str, ...] = ()
    unavailable_reason: Callable[[HardwareInfo], str | None] = always_available
    options: type = NoOptions
    description: str = ""

    @property
    def family(self) -> str:
        return {"text": "text_encoder", "image": "image_encoder", "vae": "vae"}[self.kind]


@dataclass(frozen=True)
class WriterBackend:
    """An output format.

    Frame writers (``accepts="frames"``) write each finished piece of the
    video as a segment file with ``open`` (segments of the inverted model
    arrive end-first), and ``join`` puts the segments together in playback
    order into the final file without re-encoding. Latent writers
    (``accepts="latents"``) get the finished latents once, with ``save``.
    See framepack/output/writing.py for the object contracts.
    """

    name: str
    suffix: str  # what it writes: ".mp4", ".webm", ".safetensors", or "" for a folder
    # open(path, fps, width, height, options) -> framepack.output.writing.FrameWriter (one segment)
    open: Callable[..., Any] | None = None
    # join(segments: list[Path], out: Path, options, metadata: dict[str, str]) -> None
    join: Callable[..., Any] | None = None
    # save(path: Path, latents: Tensor (1, 16, T, h, w), metadata: dict[str, str], options) -> None
    save: Callable[..., Any] | None = None
    accepts: str = "frames"  # or "latents"
    unavailable_reason: Callable[[HardwareInfo], str | None] = always_available
    options: type = NoOptions
    description: str = ""
    family: str = field(default="writer", init=False)


def build_options(options_cls: type, table: dict[str, Any], where: str) -> Any:
    """Build a backend's frozen options dataclass from its TOML table.

    ``where`` names the file and table for error messages. Unknown keys and
    values of the wrong type are errors that list what is allowed.
    """
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    for key, value in table.items():
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{where}: unknown key '{key}' (known keys: {names})")
        expected = known[key].type
        expected_types = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(
            expected if isinstance(expected, str) else getattr(expected, "__name__", ""), None
        )
        if expected_types is not None:
            wrong_bool = isinstance(value, bool) and bool not in expected_types
            if wrong_bool or not isinstance(value, expected_types):
                raise ConfigError(f"{where}: key '{key}' must be {expected}, got {value!r}")
    return options_cls(**table)
