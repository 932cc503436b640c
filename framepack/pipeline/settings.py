"""A job's settings and their checks (bad values are UserErrors, exit 2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from framepack.errors import UserError
from framepack.models.lora_formats import check_scale
from framepack.models.sources import VARIANTS

MAX_SECONDS = 600.0  # 10 minutes = 500 sections; longer is almost surely a typo
MAX_STEPS = 200
MAX_SIDE = 2048


@dataclass(frozen=True)
class JobSettings:
    image: Path | None  # None: text-to-video from a --blank start frame
    prompt: str
    output: Path
    negative_prompt: str = ""
    variant: str = "original"
    seconds: float = 5.0
    steps: int = 25
    seed: int = 31337
    gs: float = 10.0  # distilled guidance
    cfg: float = 1.0  # real CFG; 1 = no negative pass
    rs: float = 0.0  # CFG rescale
    latent_window_size: int = 9
    resolution: int = 640
    size: tuple[int, int] | None = None  # (height, width), overrides the bucket
    latents_out: Path | None = None
    model: str | None = None
    prompt_cache: bool = True  # reuse prompt embeddings cached on disk
    prompt_blend: int = 0  # timed prompts: sections over which each change blends in (0 = hard switch)
    # Creative controls (framepack.pipeline.controls, docs/controls.md).
    end_image: Path | None = None
    end_strength: float = 1.0
    image_embeds: str | None = None  # start, linear, mean; None: linear with an end image, else start
    keyframes: tuple[str, ...] = ()  # "TIME=IMAGE", TIME in seconds of the output video
    blank: str = "gray"  # the start frame without --image
    extend: Path | None = None  # a video to continue (framepack.pipeline.extend); --seconds is what is added
    loras: tuple[tuple[str, float], ...] = ()  # (path or bare name in the LoRA folder, scale); docs/lora.md
    lora_strict: bool = True  # LoRA keys that match no module are an error (False: a note)

    def validate(self) -> "JobSettings":
        def bad(name: str, value, why: str) -> UserError:
            return UserError(f"{name} {value!r}: {why}")

        for name, text in (("--prompt", self.prompt), ("--negative-prompt", self.negative_prompt)):
            if not isinstance(text, str):
                raise bad(name, text, "must be text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raw = text[exc.start:exc.end].encode("utf-8", "surrogateescape")
                raise UserError(f"{name}: not valid UTF-8 (bytes {raw.hex(' ')} at character {exc.start}); "
                                "pass the text in UTF-8") from None
            if "\x00" in text:
                raise UserError(f"{name}: contains a NUL character at {text.index(chr(0))}; remove it")
        if isinstance(self.prompt_blend, bool) or not isinstance(self.prompt_blend, int) or \
                not 0 <= self.prompt_blend <= 50:
            raise bad("--prompt-blend", self.prompt_blend, "must be a whole number of sections from 0 to 50")
        if not isinstance(self.loras, tuple) or not all(
                isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in self.loras):
            raise bad("--lora", self.loras, "must be (path, scale) pairs")
        for path, scale in self.loras:
            check_scale(path, scale)
        if self.variant not in VARIANTS:
            raise bad("--variant", self.variant, f"must be one of {', '.join(VARIANTS)}")
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            raise bad("--seconds", self.seconds, "must be a positive number of seconds")
        if self.seconds > MAX_SECONDS:
            raise bad("--seconds", self.seconds, f"is over the limit of {MAX_SECONDS:g} s")
        if not 1 <= self.steps <= MAX_STEPS:
            raise bad("--steps", self.steps, f"must be between 1 and {MAX_STEPS}")
        if not 0 <= self.seed < 2**63:
            raise bad("--seed", self.seed, "must be between 0 and 2**63 - 1")
        for name, value, low, high in (("--gs", self.gs, 0.0, 100.0), ("--cfg", self.cfg, 1.0, 50.0), ("--rs", self.rs, 0.0, 1.0)):
            if not (math.isfinite(value) and low <= value <= high):
                raise bad(name, value, f"must be between {low:g} and {high:g}")
        if not 1 <= self.latent_window_size <= 33:
            raise bad("latent_window_size", self.latent_window_size, "must be between 1 and 33")
        if not 64 <= self.resolution <= MAX_SIDE:
            raise bad("--resolution", self.resolution, f"must be between 64 and {MAX_SIDE}")
        if self.size is not None:
            h, w = self.size
            if h % 16 or w % 16 or not (16 <= h <= MAX_SIDE and 16 <= w <= MAX_SIDE):
                raise bad("--size", f"{h}x{w}", f"height and width must be multiples of 16 between 16 and {MAX_SIDE}")
        if self.latents_out is not None and Path(self.latents_out).suffix != ".safetensors":
            raise bad("--latents-out", str(self.latents_out), "must end in .safetensors")
        from framepack.pipeline.controls import validate_controls

        validate_controls(self)
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loras"] = [[path, scale] for path, scale in self.loras]
        for key in ("image", "output", "latents_out", "end_image", "extend"):
            data[key] = None if data[key] is None else str(data[key])
        data["keyframes"] = list(data["keyframes"])
        return data


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 640x608") from None
    return h, w


def settings_from_metadata(metadata: dict) -> dict[str, Any]:
    """``JobSettings`` fields of a record, typed, for ``generate --from``.

    Settings this engine does not know (written by a newer one) are an error
    that names them: dropping them silently would make a different video.
    """
    settings = metadata.get("settings")
    if not isinstance(settings, dict):
        raise UserError("framepack metadata without a 'settings' table; cannot re-run it")
    fields = {f.name: f for f in dataclasses.fields(JobSettings)}
    engine = metadata.get("engine", {}).get("version", "?")
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise UserError(
            f"the job was made by framepack {engine} with settings this version does not know: "
            f"{', '.join(unknown)}; upgrade framepack to re-run it"
        )
    required = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in settings]
    if required:
        raise UserError(f"framepack metadata lacks the settings {', '.join(required)}; cannot re-run it")
    return {name: _typed(name, str(fields[name].type), value) for name, value in settings.items()}


def _typed(name: str, kind: str, value: Any) -> Any:
    def bad() -> UserError:
        return UserError(f"framepack metadata: setting '{name}' = {value!r} is not a valid {kind}")

    optional = kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise bad()
    base = kind.removesuffix("| None").strip()
    if base == "Path":
        if not isinstance(value, str):
            raise bad()
        return Path(value)
    if base == "tuple[tuple[str, float], ...]":  # loras: [[path, scale], ...]
        if not (isinstance(value, list) and all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], (int, float))
                and not isinstance(v[1], bool) for v in value)):
            raise bad()
        return tuple((v[0], float(v[1])) for v in value)
    if base == "tuple[int, int]":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)):
            raise bad()
        return (int(value[0]), int(value[1]))
    if base == "tuple[str, ...]":
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise bad()
        return tuple(value)
    if base == "int":
        if not _is_int(value):
            raise bad()
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if base == "str":
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
