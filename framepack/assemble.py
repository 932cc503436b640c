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
from typing import Any, Iterable

from framepack.backends import build_options
from framepack.config import Profile, ProfileSet, Selection, apply_overrides, load_profiles, select_profile
from framepack.errors import ConfigError
from framepack.hardware import HardwareInfo, detect_hardware
from framepack.plugins import BackendRegistry, LoadedPlugins, build_plugin_manager, collect_backends

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

    def explain(self) -> str:
        text = f"{self.family}: {self.name} (plugin {self.plugin})"
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


def resolve(registry: BackendRegistry, family: str, names: Iterable[str], profile: Profile, hw: HardwareInfo) -> Choice:
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
        return Choice(family, name, entry.backend, entry.plugin, options, tuple(skipped))
    key = family if family in PREFERENCE_FAMILIES or family in ENCODER_FAMILIES else "writers"
    raise ConfigError(
        f"{profile.where(key)}: no {family} backend in {names} can run here ("
        + "; ".join(skipped)
        + f"); installed {family} backends: {', '.join(registry.names(family)) or 'none'}"
    )


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
    for family in PREFERENCE_FAMILIES:
        engine.choices[family] = resolve(registry, family, getattr(profile, family), profile, hw)
    for family in ENCODER_FAMILIES:
        engine.choices[family] = resolve(registry, family, [getattr(profile, family)], profile, hw)
    # Every writer listed runs; each one must be able to.
    engine.writers = [resolve(registry, "writer", [name], profile, hw) for name in profile.writers]
    return engine
