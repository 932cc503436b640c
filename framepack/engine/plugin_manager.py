"""Build the plugin manager and collect backends from it.

Loading order (fixed, like tox 4): built-in plugins first (the entry points
of the ``framepack`` distribution itself, group ``framepack``), then
third-party entry points of the same group unless
``FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD=1``, minus any named in
``disabled_plugins``. ``check_pending()`` then catches misspelt hook names.

A plugin that fails (to import, in ``check_pending``, in a registration
hook, in an event hook during a job) is named in a one-line ``PluginError``
with its entry point, chained to the original error. Jobs build the manager
strictly (the first failure stops them); ``framepack plugins`` builds it
with ``strict=False``, which records broken third-party plugins in
``LoadedPlugins.broken`` and carries on with the rest.

The manager is built by a function, never at import; tests get a fresh one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from framepack import hookspecs
from framepack.backends import (
    FAMILIES,
    AttentionBackend,
    CacheBackend,
    EncoderBackend,
    OffloadBackend,
    WriterBackend,
)
from framepack.errors import FramepackError, PluginError

GROUP = "framepack"
OWN_DISTRIBUTION = "framepack"
AUTOLOAD_ENV = "FRAMEPACK_DISABLE_PLUGIN_AUTOLOAD"
EVENT_HOOKS = ("framepack_on_job_start", "framepack_on_section", "framepack_on_step", "framepack_on_job_end")


@dataclass(frozen=True)
class PluginSource:
    name: str  # entry point name
    value: str  # module it points at
    distribution: str
    builtin: bool

    def describe(self) -> str:
        origin = "built-in" if self.builtin else f"from {self.distribution}"
        return f"{origin} (entry point {self.name} = {self.value})"

    def code_prefix(self) -> str:
        """Modules that are this plugin's code: its module's package (or the
        module itself when it is top-level)."""
        module = self.value.split(":")[0].strip()
        return module.rpartition(".")[0] or module


@dataclass
class LoadedPlugins:
    manager: pluggy.PluginManager
    sources: dict[str, PluginSource] = field(default_factory=dict)  # loaded entry points, by name
    skipped: dict[str, str] = field(default_factory=dict)  # entry point name -> why it was not loaded
    # strict=False only: entry point name -> the error that put it out (a one-line
    # message naming the plugin and its entry point); it is not registered.
    broken: dict[str, str] = field(default_factory=dict)

    def label(self, name: str) -> str:
        """'plugin NAME (where it comes from)' for messages."""
        source = self.sources.get(name)
        if source is not None:
            return f"plugin '{name}' ({source.describe()})"
        plugin = self.manager.get_plugin(name)
        return f"plugin {plugin!r} (registered at run time)" if plugin is not None else f"plugin '{name}'"

    def third_party(self, name: str) -> bool:
        source = self.sources.get(name)
        return source is not None and not source.builtin


def disable_hint(name: str) -> str:
    return (f"turn it off with disabled_plugins = [\"{name}\"] in framepack.toml "
            f"(or {AUTOLOAD_ENV}=1 for every third-party plugin)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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


def _source(ep: metadata.EntryPoint) -> PluginSource:
    dist = _dist_name(ep)
    return PluginSource(ep.name, ep.value, dist, _normalise(dist) == OWN_DISTRIBUTION)


def build_plugin_manager(
    disabled_plugins: Iterable[str] = (), extra_plugins: Iterable[Any] = (), strict: bool = True
) -> LoadedPlugins:
    """Build a fresh plugin manager with built-in and third-party plugins.

    :param disabled_plugins: entry point names or distribution names to skip
        (built-ins cannot be disabled: the engine needs its defaults).
    :param extra_plugins: plugin objects or modules registered after the
        entry points (used by the CLI's progress reporter and by tests).
    :param strict: raise on the first third-party plugin that fails to load
        or has an unknown hook (what jobs do). ``False``: record it in
        ``broken`` and load the others (what ``framepack plugins`` does).
        A broken built-in always raises.
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
        _load(loaded, ep)
    for ep in others:
        if not autoload_enabled():
            loaded.skipped[ep.name] = f"{AUTOLOAD_ENV}=1"
        elif _normalise(ep.name) in disabled or _normalise(_dist_name(ep)) in disabled:
            loaded.skipped[ep.name] = "listed in disabled_plugins"
        else:
            try:
                _load(loaded, ep)
            except PluginError as exc:
                if strict:
                    raise
                loaded.broken[ep.name] = str(exc)
    for plugin in extra_plugins:
        try:
            pm.register(plugin)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {plugin!r} (given in plugins=) cannot be registered: {exc}") from exc
    _check_pending(loaded, strict)
    # Registered last and tryfirst: the outermost wrapper of every event hook.
    pm.register(_EventErrors(loaded), name="framepack-event-errors")
    return loaded


def _load(loaded: LoadedPlugins, ep: metadata.EntryPoint) -> None:
    source = _source(ep)
    if ep.name in loaded.sources:
        first = loaded.sources[ep.name]
        raise PluginError(
            f"two plugins use the entry point name '{ep.name}': {first.describe()} and {source.describe()}"
            + ("" if source.builtin else f"; {disable_hint(ep.name)}")
        )
    try:
        plugin = ep.load()
        loaded.manager.register(plugin, name=ep.name)
    except Exception as exc:  # a broken plugin must name itself, whatever broke
        hint = "" if source.builtin else f"; {disable_hint(ep.name)}"
        raise PluginError(f"plugin '{ep.name}' ({source.describe()}) failed to load: {_first_line(exc)}{hint}") from exc
    loaded.sources[ep.name] = source


def _check_pending(loaded: LoadedPlugins, strict: bool) -> None:
    """Every hook a plugin implements must be one of framepack's (a misspelt
    name would otherwise never be called)."""
    pm = loaded.manager
    known = [name for name in dir(hookspecs) if name.startswith("framepack_")]
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            unknown = [c.name for c in pm.get_hookcallers(exc.plugin) or [] if not c.has_spec()]
            near = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
            meant = f" (did you mean {', '.join(near)}?)" if near else ""
            hint = f"; {disable_hint(name)}" if loaded.third_party(name) else ""
            error = PluginError(f"{loaded.label(name)} has a hook framepack does not know: "
                                f"{', '.join(unknown) or exc}{meant}{hint}")
            if strict or not loaded.third_party(name):
                raise error from exc
            pm.unregister(exc.plugin)
            loaded.broken[name] = str(error)
            del loaded.sources[name]


def blame(exc: BaseException, sources: Iterable[PluginSource] | None = None,
          during: str = "a job") -> PluginError | None:
    """The third-party plugin whose code raised ``exc``, as a one-line
    ``PluginError`` naming it and its entry point, or None.

    The plugin is the one with the innermost frame in the traceback (so a
    kernel that fails under a third-party step cache is blamed, not the
    cache). None when no third-party plugin's code is in the traceback (the
    error is framepack's own or the caller's) and for a ``FramepackError``,
    which already says what to do. ``sources``: the loaded plugins (default:
    every third-party entry point installed)."""
    if isinstance(exc, FramepackError):
        return None
    if sources is None:
        sources = [_source(ep) for ep in _entry_points()]
    owners = [(s, s.code_prefix()) for s in sources if not s.builtin]
    found = None
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        for source, prefix in owners:
            if module == prefix or module.startswith(prefix + "."):
                found = source, tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next
    if found is None:
        return None
    source, filename, line = found
    return PluginError(f"plugin '{source.name}' ({source.describe()}) failed in {during}: {_first_line(exc)} "
                       f"(at {filename}:{line}); {disable_hint(source.name)}")


class RegistrationError(PluginError):
    """A backend the engine refused at registration (wrong type, a name taken);
    the message names the plugin."""


class _EventErrors:
    """Wraps every event hook: an exception from a third-party plugin's
    implementation becomes a ``PluginError`` naming the plugin and its entry
    point, chained to the original. Others (framepack's own listeners,
    ``Pipeline(on_event=...)`` callbacks, ``FramepackError``) pass unchanged.
    As with any pluggy hook, the listeners after the one that raised do not
    get that event."""

    def __init__(self, loaded: LoadedPlugins) -> None:
        self.loaded = loaded

    def _guard(self, hook: str):
        try:
            return (yield)
        except Exception as exc:
            error = blame(exc, self.loaded.sources.values(), hook)
            if error is None:
                raise
            raise error from exc

    @hookspecs.hookimpl(wrapper=True, tryfirst=True)
    def framepack_on_job_start(self, event):
        return (yield from self._guard("framepack_on_job_start"))

    @hookspecs.hookimpl(wrapper=True, tryfirst=True)
    def framepack_on_section(self, event):
        return (yield from self._guard("framepack_on_section"))

    @hookspecs.hookimpl(wrapper=True, tryfirst=True)
    def framepack_on_step(self, event):
        return (yield from self._guard("framepack_on_step"))

    @hookspecs.hookimpl(wrapper=True, tryfirst=True)
    def framepack_on_job_end(self, event):
        return (yield from self._guard("framepack_on_job_end"))


@dataclass(frozen=True)
class Registered:
    backend: Any
    plugin: str  # entry point name of the plugin that registered it


class BackendRegistry:
    """Every backend the loaded plugins registered, by family and name."""

    def __init__(self) -> None:
        self._by_family: dict[str, dict[str, Registered]] = {f: {} for f in FAMILIES}

    def add(self, backend: Any, plugin: str, label: str | None = None) -> None:
        family = backend.family
        label = label or f"plugin '{plugin}'"
        if family not in self._by_family:
            raise RegistrationError(f"{label} registered {backend!r} for unknown family '{family}'")
        existing = self._by_family[family].get(backend.name)
        if existing is not None:
            raise RegistrationError(
                f"{family} backend '{backend.name}' is registered twice: by plugin "
                f"'{existing.plugin}' and by {label}"
            )
        self._by_family[family][backend.name] = Registered(backend, plugin)

    def remove_plugin(self, plugin: str) -> None:
        for entries in self._by_family.values():
            for name in [n for n, r in entries.items() if r.plugin == plugin]:
                del entries[name]

    def names(self, family: str) -> list[str]:
        return sorted(self._by_family[family])

    def get(self, family: str, name: str) -> Registered | None:
        return self._by_family[family].get(name)

    def items(self, family: str) -> list[Registered]:
        return [self._by_family[family][n] for n in self.names(family)]

    def of_plugin(self, plugin: str) -> list[Registered]:
        return [r for f in FAMILIES for r in self.items(f) if r.plugin == plugin]


_REGISTER_HOOKS = {
    "framepack_register_attention": AttentionBackend,
    "framepack_register_offload": OffloadBackend,
    "framepack_register_cache": CacheBackend,
    "framepack_register_encoders": EncoderBackend,  # text_encoder, image_encoder, vae
    "framepack_register_writers": WriterBackend,
}

# The callables each backend must carry (the engine calls them during a job).
_REQUIRED_CALLABLES = {
    AttentionBackend: ("make_kernel", "unavailable_reason", "version"),
    OffloadBackend: ("make_policy", "unavailable_reason"),
    CacheBackend: ("make_cache", "unavailable_reason"),
    EncoderBackend: ("load", "unavailable_reason"),
    WriterBackend: ("unavailable_reason",),
}


def _check_backend(backend: Any, expected: type, label: str, hook: str) -> None:
    """What the engine relies on later, checked when it is registered."""
    if not isinstance(backend, expected):
        raise RegistrationError(f"{label} registered a {type(backend).__name__} from {hook}, which takes a "
                                f"framepack.backends.{expected.__name__}")
    where = f"{label}: {expected.__name__} {backend.name!r}"
    if not isinstance(backend.name, str) or not backend.name:
        raise RegistrationError(f"{where}: name must be a non-empty string")
    for attr in _REQUIRED_CALLABLES[expected]:
        if not callable(getattr(backend, attr)):
            raise RegistrationError(f"{where}: {attr} must be callable, got {getattr(backend, attr)!r}")
    if not (isinstance(backend.options, type) and dataclasses.is_dataclass(backend.options)):
        raise RegistrationError(f"{where}: options must be a dataclass (the class, not an instance), "
                                f"got {backend.options!r}")
    if expected is EncoderBackend and backend.kind not in ("text", "image", "vae"):
        raise RegistrationError(f"{where}: kind must be 'text', 'image' or 'vae', got {backend.kind!r}")
    if expected is WriterBackend:
        needs = {"frames": ("open", "join"), "latents": ("save",)}.get(backend.accepts)
        if needs is None:
            raise RegistrationError(f"{where}: accepts must be 'frames' or 'latents', got {backend.accepts!r}")
        for attr in needs:
            if not callable(getattr(backend, attr)):
                raise RegistrationError(f"{where}: a writer that accepts {backend.accepts} needs {attr}=, got "
                                  f"{getattr(backend, attr)!r}")


def collect_backends(loaded: LoadedPlugins, strict: bool = True) -> BackendRegistry:
    """Run every registration hook once and record who registered what.

    ``strict=False``: a third-party plugin that fails here is recorded in
    ``loaded.broken`` and unregistered, with whatever it had registered."""
    registry = BackendRegistry()
    for hook_name, expected in _REGISTER_HOOKS.items():
        caller = getattr(loaded.manager.hook, hook_name)
        for impl in caller.get_hookimpls():
            plugin = impl.plugin_name
            if plugin in loaded.broken:
                continue
            label = loaded.label(plugin)

            def register(backend: Any, _label: str = label, _plugin: str = plugin, _hook: str = hook_name,
                         _expected: type = expected) -> None:
                _check_backend(backend, _expected, _label, _hook)
                registry.add(backend, _plugin, _label)

            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except Exception as exc:
                hint = f"; {disable_hint(plugin)}" if loaded.third_party(plugin) else ""
                error = exc if isinstance(exc, RegistrationError) else PluginError(
                    f"{label} failed in {hook_name}: {_first_line(exc)}{hint}")
                if strict or not loaded.third_party(plugin):
                    if error is exc:
                        raise
                    raise error from exc
                loaded.broken[plugin] = str(error) + ("" if error is not exc else hint)
                registry.remove_plugin(plugin)
                loaded.manager.unregister(name=plugin)
                del loaded.sources[plugin]
    return registry
