"""A submitted job's settings, checked before any row is written.

The settings are ``Pipeline.generate``'s keywords (``framepack.api.SETTINGS``)
as JSON, plus ``profile`` and ``overrides`` (``--profile``, ``--set``). Paths
are the service's business: ``image`` comes as an upload, ``output`` is a
bare file name (its extension picks the writer), ``latents_out`` is true or
false. Values are checked by the same code the CLI runs (``JobSettings.validate``,
the profile's override checks), so a bad value gets the message
``framepack generate`` prints for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from framepack.api import SETTINGS
from framepack.errors import UserError

# setting -> (CLI flag, type) for the type checks argparse does on the command line
_INTS = {"steps": "--steps", "seed": "--seed", "resolution": "--resolution", "window": "--window",
         "prompt_blend": "--prompt-blend"}
_FLOATS = {"seconds": "--seconds", "gs": "--gs", "cfg": "--cfg", "rs": "--rs", "end_strength": "--end-strength"}
_TEXTS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "variant": "--variant", "model": "--model",
          "size": "--size", "profile": "--profile", "image_embeds": "--image-embeds", "blank": "--blank"}
# Images and the video to extend come as uploads ('image', 'end_image', one 'keyframes' file per
# time, 'extend'), not settings; 'keyframes' in the settings is the list of their times in seconds.
KNOWN = sorted((set(SETTINGS) - {"image", "end_image", "extend"}) | {"profile", "overrides"})
OUTPUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}\.[a-z0-9]{1,8}")
DEFAULT_OUTPUT = "video.mp4"


def check_settings(raw: Any) -> dict:
    """-> the settings as stored (JSON), or UserError with the CLI's message."""
    from framepack.pipeline.settings import JobSettings, parse_size

    if not isinstance(raw, dict):
        raise UserError(f"settings must be a JSON object, not {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        where = " (the image is uploaded as the 'image' field)" if "image" in unknown else ""
        raise UserError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(KNOWN)}){where}")
    settings = {k: v for k, v in raw.items() if v is not None}
    for key, flag in _INTS.items():
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], int)):
            raise UserError(f"argument {flag}: invalid int value: {settings[key]!r}")
    for key, flag in _FLOATS.items():
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], (int, float))):
            raise UserError(f"argument {flag}: invalid float value: {settings[key]!r}")
    for key, flag in _TEXTS.items():
        if key in settings and not isinstance(settings[key], str):
            raise UserError(f"argument {flag}: expected text, got {settings[key]!r}")
    if "prompt_cache" in settings and not isinstance(settings["prompt_cache"], bool):
        raise UserError(f"prompt_cache {settings['prompt_cache']!r}: must be true or false")
    if "latents_out" in settings and not isinstance(settings["latents_out"], bool):
        raise UserError(f"latents_out {settings['latents_out']!r}: true to also write the latents, or false "
                        "(the service names its files)")
    output = settings.setdefault("output", DEFAULT_OUTPUT)
    if not isinstance(output, str) or not OUTPUT_NAME.fullmatch(output):
        raise UserError(f"output {output!r}: a plain file name like video.mp4 or video.webm "
                        "(letters, digits, _ and -, then the extension; the service picks the folder)")
    overrides = settings.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"overrides {overrides!r}: a list of KEY=VALUE strings, as --set takes them")
    if "prompt" not in settings:
        raise UserError("prompt required")
    times = settings.get("keyframes", [])
    if not isinstance(times, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
        raise UserError(f"keyframes {times!r}: a list of times in seconds, one per uploaded 'keyframes' image")
    # The same conversions Pipeline.generate makes, then the CLI's checks.
    fields = {SETTINGS[k]: v for k, v in settings.items() if k in SETTINGS and k not in ("output", "latents_out")}
    for key in ("seconds", "gs", "cfg", "rs", "end_strength"):
        if key in fields:
            fields[key] = float(fields[key])
    if "keyframes" in fields:
        fields["keyframes"] = tuple(f"{t:g}=upload" for t in fields["keyframes"])
    if "loras" in fields:  # [[name, scale], ...] or "NAME[:SCALE]" strings, as Pipeline.generate takes them
        from framepack.pipeline.loras import normalize_loras

        fields["loras"] = normalize_loras(fields["loras"])
    if "size" in fields:
        fields["size"] = parse_size(fields["size"])
    latents = Path("video.safetensors") if settings.get("latents_out") else None
    JobSettings(image=Path("upload"), output=Path(output), latents_out=latents, **fields).validate()
    # The rest of the controls' rules (keyframes past the end, two in one section, F1
    # with an end frame) need the images: the worker's preflight gives the CLI's message.
    _check_profile(settings.get("profile"), overrides)
    return settings


def _check_profile(profile: str | None, overrides: list[str]) -> None:
    from framepack.engine.profiles import apply_overrides, load_profiles

    if profile is None and not overrides:
        return
    profiles = load_profiles()
    if profile is not None and profile not in profiles.profiles:
        raise UserError(f"--profile {profile!r}: no such profile (known: {', '.join(sorted(profiles.profiles))})")
    # Override keys are the same for every profile; check them against the named one or any.
    apply_overrides(profiles, profile or sorted(profiles.profiles)[0], overrides)


def partial_name(settings: dict) -> str:
    """The partial video's file name beside the output (the engine's ``.partial`` name)."""
    output = Path(settings.get("output", DEFAULT_OUTPUT))
    return f"{output.stem}.partial{output.suffix}"


def generate_kwargs(settings: dict, out_dir: Path) -> dict:
    """Stored settings -> ``Pipeline.generate`` keywords, with the service's paths."""
    kwargs = dict(settings)
    output = out_dir / kwargs.pop("output", DEFAULT_OUTPUT)
    kwargs["output"] = output
    if kwargs.pop("latents_out", False):
        kwargs["latents_out"] = output.with_suffix(".safetensors")
    return kwargs
