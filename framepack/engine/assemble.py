"""Assemble an engine: profile + plugins -> one resolved backend per family.

Resolution happens once per job. For each preference list the first backend
that is registered and can run on this hardware is taken; every skipped
entry is recorded with its reason so the CLI can say what it used and why.
Nothing falls back silently, and when nothing in a list can run, the error
lists what is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from framepack.backends import build_options
from framepack.engine.profiles import Profile, ProfileSet, Selection, apply_overrides, load_profiles, select_profile
from framepack.errors import ConfigError, UserError
from framepack.hardware import HardwareInfo, detect_hardware, device_present
from framepack.engine.plugin_manager import BackendRegistry, LoadedPlugins, build_plugin_manager, collect_backends

PREFERENCE_FAMILIES = ("attention", "offload", "cache")
ENCODER_FAMILIES = ("text_encoder", "image_encoder", "vae")


@dataclass(frozen=True)
class Choice:
    family: str
    name: str
    backend: Any
    plugin: str
    options: Any
    skipped: tuple[str, ...] = ()  # "name: reason" for each preference passed over
    checked: str = ""  # what the verifier found, e.g. the attention self-check

    def explain(self) -> str:
        text = f"{self.family}: {self.name} (plugin {self.plugin})"
        if self.checked:
            text += f", {self.checked}"
        if self.skipped:
            text += "; skipped " + "; ".join(self.skipped)
        return text


@dataclass
class Engine:
    hardware: HardwareInfo
    profiles: ProfileSet
    selection: Selection
    profile: Profile
    plugins: LoadedPlugins
    registry: BackendRegistry
    choices: dict[str, Choice] = field(default_factory=dict)
    writers: list[Choice] = field(default_factory=list)

    @property
    def hook(self):
        return self.plugins.manager.hook


def resolve(
    registry: BackendRegistry,
    family: str,
    names: Iterable[str],
    profile: Profile,
    hw: HardwareInfo,
    verify: Callable[[Any, Any], tuple[bool, str]] | None = None,
) -> Choice:
    """First backend of ``names`` that is registered, can run on ``hw`` and
    passes ``verify(backend, options)`` -> (ok, what was found)."""
    names = list(names)
    skipped: list[str] = []
    for name in names:
        entry = registry.get(family, name)
        if entry is None:
            skipped.append(f"{name}: not registered (plugin may not be installed)")
            continue
        reason = entry.backend.unavailable_reason(hw)
        if reason:
            skipped.append(f"{name}: {reason}")
            continue
        options = build_options(entry.backend.options, profile.options.get(name, {}), profile.where(f"options.{name}"))
        ok, found = verify(entry.backend, options) if verify is not None else (True, "")
        if not ok:
            skipped.append(f"{name}: {found}")
            continue
        return Choice(family, name, entry.backend, entry.plugin, options, tuple(skipped), found)
    key = family if family in PREFERENCE_FAMILIES or family in ENCODER_FAMILIES else "writers"
    hint = ""
    runnable = [r.backend.name for r in registry.items(family)
                if r.backend.name not in names and r.backend.unavailable_reason(hw) is None]
    if len(names) == 1 and family in PREFERENCE_FAMILIES and runnable:
        fallback = "sdpa" if "sdpa" in runnable else runnable[0]
        hint = f" (to fall back instead of stopping, give a list, e.g. --set '{family}=[\"{names[0]}\", \"{fallback}\"]')"
    raise ConfigError(
        f"{profile.where(key)}: no {family} backend in {names} can run here ("
        + "; ".join(skipped)
        + f"); installed {family} backends: {', '.join(registry.names(family)) or 'none'}"
        + hint
    )


def attention_verifier(hw: HardwareInfo, profile: Profile) -> Callable[[Any, Any], tuple[bool, str]] | None:
    """Self-check each attention candidate on the job's device and dtype.

    Simulated hardware may name a device this machine lacks; then there is
    nothing to check on (and nothing can run). sdpa is the reference the
    others are measured against.
    """
    if not device_present(hw.device):
        return None
    import torch

    from framepack.attention.processors import build_attention
    from framepack.attention.check import self_check
    from framepack.engine.profiles import torch_dtype

    device, dtype = torch.device(hw.device), torch_dtype(profile.dtype["transformer"])

    where = f"{device.type}/{str(dtype).removeprefix('torch.')}"

    def verify(backend, options) -> tuple[bool, str]:
        if backend.name == "sdpa":
            return True, "the reference kernel"
        try:
            attention = build_attention(backend, options)
        except Exception as exc:
            return False, f"failed to load: {type(exc).__name__}: {exc}"
        result = self_check(backend.name, attention, device, dtype, backend.version(), backend.tolerance)
        if result.ok:
            return True, f"self-check on {where}: {result.reason}"
        return False, f"self-check failed on {where}: {result.reason}"

    return verify


def _check_option_tables(profile: Profile, registry: BackendRegistry) -> None:
    """An options table must belong to a registered backend, or at least to
    one the profile prefers (its plugin may simply not be installed here)."""
    preferred = set(profile.attention) | set(profile.offload) | set(profile.cache) | set(profile.writers)
    for name in profile.options:
        known = any(registry.get(f, name) for f in ("attention", "offload", "cache", "writer", *ENCODER_FAMILIES))
        if not known and name not in preferred:
            raise ConfigError(f"{profile.where('options.' + name)}: no backend named '{name}' is registered")


def assemble(
    profile_name: str | None = None,
    overrides: Iterable[str] = (),
    config_files: Iterable[Path] = (),
    hardware: HardwareInfo | None = None,
    extra_plugins: Iterable[Any] = (),
    include_user_files: bool = True,
) -> Engine:
    hw = hardware or detect_hardware()
    profiles = load_profiles(list(config_files), include_user_files=include_user_files)
    selection = select_profile(profiles, hw, profile_name)
    profile = apply_overrides(profiles, selection.profile.name, list(overrides))
    loaded = build_plugin_manager(profiles.disabled_plugins, extra_plugins)
    registry = collect_backends(loaded)
    _check_option_tables(profile, registry)
    engine = Engine(hw, profiles, selection, profile, loaded, registry)
    verifiers = {"attention": attention_verifier(hw, profile)}
    for family in PREFERENCE_FAMILIES:
        engine.choices[family] = resolve(registry, family, getattr(profile, family), profile, hw, verifiers.get(family))
    for family in ENCODER_FAMILIES:
        engine.choices[family] = resolve(registry, family, [getattr(profile, family)], profile, hw)
    # Every writer listed runs; each one must be able to.
    engine.writers = [resolve(registry, "writer", [name], profile, hw) for name in profile.writers]
    return engine


# Extensions of media files framepack does not write: refused rather than
# silently replaced (a .gif asked for must not quietly become an .mp4).
FOREIGN_MEDIA = frozenset(
    ".gif .mkv .avi .mov .m4v .wmv .flv .mpg .mpeg .ts .ogv .apng .webp .png .jpg .jpeg .bmp .tif .tiff "
    ".json .safetensors .txt".split()
)


def writers_for_output(engine: Engine, output: Path) -> tuple[Path, list[Choice]]:
    """(base name, writer choices, main one first) for ``output``.

    The extension picks the writer when one matches (``.mp4``, ``.webm``): it
    takes the place of the profile's first frame writer when the profile does
    not list it. A media extension no writer makes (``.gif``, ``.mkv``, ...) is
    refused; anything else is part of the name, so ``take.2024.01.final``
    keeps its dots and gets the writers' suffixes after them."""
    output = Path(output).expanduser()
    writers = list(engine.writers)
    suffix = output.suffix.lower()
    by_suffix = {e.backend.suffix: e for e in engine.registry.items("writer")
                 if e.backend.suffix and e.backend.accepts == "frames"}
    if suffix in by_suffix:
        entry = by_suffix[suffix]
        base = output.with_name(output.name[: -len(suffix)])
        if not any(c.name == entry.backend.name for c in writers):
            choice = resolve(engine.registry, "writer", [entry.backend.name], engine.profile, engine.hardware)
            frames = [i for i, c in enumerate(writers) if c.backend.accepts == "frames"]
            writers[frames[0] if frames else 0:(frames[0] + 1) if frames else 0] = [choice]
        main = next(c for c in writers if c.name == entry.backend.name)
        writers.remove(main)
        writers.insert(0, main)
        return base, writers
    if suffix in FOREIGN_MEDIA:
        known = ", ".join(sorted(by_suffix)) or "none"
        raise UserError(
            f"--output {output}: framepack does not write {suffix} files (video extensions it writes: {known}; "
            "a name without an extension gets the profile's writers' own)"
        )
    return output, writers
