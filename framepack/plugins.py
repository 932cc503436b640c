"""Build the plugin manager and collect backends from it.

Loading order (fixed, like tox 4): built-in plugins first (the entry points
of the ``framepack`` distribution itself, group ``framepack``), then
third-party entry points of the same group unless
``FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD=1``, minus any named in
``disabled_plugins``. ``check_pending()`` then catches misspelt hook names.

The manager is built by a function, never at import; tests get a fresh one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from framepack import hookspecs
from framepack.backends import FAMILIES
from framepack.errors import PluginError

GROUP = "framepack"
OWN_DISTRIBUTION = "framepack"
AUTOLOAD_ENV = "FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class PluginSource:
    name: str  # entry point name
    value: str  # module it points at
    distribution: str
    builtin: bool

    def describe(self) -> str:
        origin = "built-in" if self.builtin else f"from {self.distribution}"
        return f"{origin} (entry point {self.name} = {self.value})"


@dataclass
class LoadedPlugins:
    manager: pluggy.PluginManager
    sources: dict[str, PluginSource] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # entry point name -> why


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def autoload_enabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")


def _entry_points() -> list[metadata.EntryPoint]:
    # Deduplicate: the same distribution can be seen twice on sys.path.
    seen: set[tuple[str, str, str]] = set()
    eps = []
    for ep in metadata.entry_points(group=GROUP):
        key = (_normalise(_dist_name(ep)), ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            eps.append(ep)
    return eps


def build_plugin_manager(
    disabled_plugins: Iterable[str] = (), extra_plugins: Iterable[Any] = ()
) -> LoadedPlugins:
    """Build a fresh plugin manager with built-in and third-party plugins.

    :param disabled_plugins: entry point names or distribution names to skip
        (built-ins cannot be disabled: the engine needs its defaults).
    :param extra_plugins: plugin objects or modules registered after the
        entry points (used by the CLI's progress reporter and by tests).
    """
    pm = pluggy.PluginManager("framepack")
    pm.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(manager=pm)
    disabled = {_normalise(n) for n in disabled_plugins}
    eps = _entry_points()
    builtins = [ep for ep in eps if _normalise(_dist_name(ep)) == OWN_DISTRIBUTION]
    if not builtins:
        raise PluginError(
            "framepack's built-in plugins were not found: the package is not installed "
            "(run `pip install -e .` in the repository, or `pip install framepack`)"
        )
    others = [ep for ep in eps if _normalise(_dist_name(ep)) != OWN_DISTRIBUTION]
    for ep in builtins:
        _load(loaded, ep, builtin=True)
    for ep in others:
        if not autoload_enabled():
            loaded.skipped[ep.name] = f"{AUTOLOAD_ENV}=1"
        elif _normalise(ep.name) in disabled or _normalise(_dist_name(ep)) in disabled:
            loaded.skipped[ep.name] = "listed in disabled_plugins"
        else:
            _load(loaded, ep, builtin=False)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(f"plugin '{name}' has a hook framepack does not know: {exc}") from exc
    return loaded


def _load(loaded: LoadedPlugins, ep: metadata.EntryPoint, builtin: bool) -> None:
    source = PluginSource(ep.name, ep.value, _dist_name(ep), builtin)
    if ep.name in loaded.sources:
        first = loaded.sources[ep.name]
        raise PluginError(
            f"two plugins use the entry point name '{ep.name}': {first.describe()} and {source.describe()}"
        )
    try:
        plugin = ep.load()
        loaded.manager.register(plugin, name=ep.name)
    except Exception as exc:  # a broken plugin must name itself, whatever broke
        raise PluginError(f"plugin '{ep.name}' ({source.describe()}) failed to load: {exc}") from exc
    loaded.sources[ep.name] = source


@dataclass(frozen=True)
class Registered:
    backend: Any
    plugin: str  # entry point name of the plugin that registered it


class BackendRegistry:
    """Every backend the loaded plugins registered, by family and name."""

    def __init__(self) -> None:
        self._by_family: dict[str, dict[str, Registered]] = {f: {} for f in FAMILIES}

    def add(self, backend: Any, plugin: str) -> None:
        family = backend.family
        if family not in self._by_family:
            raise PluginError(f"plugin '{plugin}' registered {backend!r} for unknown family '{family}'")
        existing = self._by_family[family].get(backend.name)
        if existing is not None:
            raise PluginError(
                f"{family} backend '{backend.name}' is registered twice: by plugin "
                f"'{existing.plugin}' and by plugin '{plugin}'"
            )
        self._by_family[family][backend.name] = Registered(backend, plugin)

    def names(self, family: str) -> list[str]:
        return sorted(self._by_family[family])

    def get(self, family: str, name: str) -> Registered | None:
        return self._by_family[family].get(name)

    def items(self, family: str) -> list[Registered]:
        return [self._by_family[family][n] for n in self.names(family)]


_REGISTER_HOOKS = {
    "framepack_register_attention": "attention",
    "framepack_register_offload": "offload",
    "framepack_register_cache": "cache",
    "framepack_register_encoders": None,  # text_encoder, image_encoder, vae
    "framepack_register_writers": "writer",
}


def collect_backends(loaded: LoadedPlugins) -> BackendRegistry:
    """Run every registration hook once and record who registered what."""
    registry = BackendRegistry()
    for hook_name, family in _REGISTER_HOOKS.items():
        caller = getattr(loaded.manager.hook, hook_name)
        for impl in caller.get_hookimpls():

            def register(backend: Any, _plugin: str = impl.plugin_name, _family=family) -> None:
                if _family is not None and backend.family != _family:
                    raise PluginError(
                        f"plugin '{_plugin}' registered a {backend.family} backend from {hook_name}"
                    )
                registry.add(backend, _plugin)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin '{impl.plugin_name}' failed in {hook_name}: {exc}") from exc
    return registry

