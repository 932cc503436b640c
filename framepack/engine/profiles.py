"""Hardware profiles: load, validate, merge, select, override.

Files are read in a fixed order, later ones overriding earlier ones key by
key: the shipped ``framepack.toml``, the user's config dir
(``$XDG_CONFIG_HOME/framepack/framepack.toml``), ``./framepack.toml``, then
any ``--config FILE``. A profile with ``inherits = "other"`` (said where it is
first defined) starts as a copy of ``other`` without its ``match``, as all the
files together leave ``other``: the parent may be defined later, in the same
file or another, and a later file's change to the parent reaches the child.
Errors name the file, the table and the key; a cycle names its profiles.

A profile's backend keys (``attention``, ``offload``, ``cache``) hold a
preference list: the engine takes the first that can run here and says why
it skipped the others (see framepack.engine.assemble).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from framepack.errors import ConfigError, UserError
from framepack.hardware import HardwareInfo

SHIPPED = Path(__file__).parent.parent / "framepack.toml"  # package data at the top of framepack/
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_PARTS = ("transformer", "text_encoder", "image_encoder", "vae")
# Weight formats: fp8 = float8 storage, computed in the part's dtype;
# nf4 = 4-bit NormalFloat (bitsandbytes).
QUANTIZE = {"transformer": ("none", "fp8", "nf4"), "text_encoder": ("none", "nf4")}

# key -> (type description, checker)
_LIST_OF_NAMES = ("a name or a list of names", lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)))
_NUMBER = ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
PROFILE_KEYS: dict[str, tuple[str, Any]] = {
    "description": ("a string", lambda v: isinstance(v, str)),
    "inherits": ("a profile name", lambda v: isinstance(v, str)),
    "priority": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "match": ("a table", lambda v: isinstance(v, dict)),
    "attention": _LIST_OF_NAMES,
    "offload": _LIST_OF_NAMES,
    "cache": _LIST_OF_NAMES,
    "writers": _LIST_OF_NAMES,
    "dtype": ("a table", lambda v: isinstance(v, dict)),
    "vae_tiling": ("true or false", lambda v: isinstance(v, bool)),
    "text_encoder": ("a backend name", lambda v: isinstance(v, str)),
    "image_encoder": ("a backend name", lambda v: isinstance(v, str)),
    "vae": ("a backend name", lambda v: isinstance(v, str)),
    "quantize": ("a table", lambda v: isinstance(v, dict)),
    "options": ("a table of backend tables", lambda v: isinstance(v, dict) and all(isinstance(t, dict) for t in v.values())),
    # LoRAs a job uses when it names none: [{ path = "x.safetensors", scale = 0.8 }] (docs/lora.md)
    "loras": ("a list of { path = \"...\", scale = NUMBER } tables",
              lambda v: isinstance(v, list) and all(
                  isinstance(t, dict) and isinstance(t.get("path"), str) and set(t) <= {"path", "scale"}
                  and (isinstance(t.get("scale", 1.0), (int, float)) and not isinstance(t.get("scale"), bool))
                  for t in v)),
}
MATCH_KEYS: dict[str, tuple[str, Any]] = {
    "device": ("cuda, mps, cpu or a list of them", lambda v: (v if isinstance(v, list) else [v]) and all(x in ("cuda", "mps", "cpu") for x in (v if isinstance(v, list) else [v]))),
    "gpu_name": ("a string or list of strings (case-insensitive substrings)", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))),
    "min_compute_capability": _NUMBER,
    "max_compute_capability": _NUMBER,
    "min_vram_gb": _NUMBER,
    "max_vram_gb": _NUMBER,
    "min_free_vram_gb": _NUMBER,
    "min_ram_gb": _NUMBER,
    "max_ram_gb": _NUMBER,
}
TOP_KEYS = ("profiles", "disabled_plugins")
REQUIRED = ("attention", "offload", "cache", "writers", "dtype")


@dataclass(frozen=True)
class Profile:
    name: str
    sources: tuple[str, ...]
    description: str
    priority: int
    match: dict[str, Any]
    attention: tuple[str, ...]
    offload: tuple[str, ...]
    cache: tuple[str, ...]
    writers: tuple[str, ...]
    dtype: dict[str, str]
    vae_tiling: bool
    options: dict[str, dict[str, Any]]
    text_encoder: str = "hunyuan"
    image_encoder: str = "siglip"
    vae: str = "hunyuan_vae"
    quantize: dict[str, str] = field(default_factory=lambda: {"transformer": "none", "text_encoder": "none"})
    loras: tuple[tuple[str, float], ...] = ()  # (path or bare name, scale)

    def where(self, key: str) -> str:
        return f"{' + '.join(self.sources)}: [profiles.{self.name}] {key}"


@dataclass
class ProfileSet:
    profiles: dict[str, Profile]
    raw: dict[str, dict[str, Any]]
    sources: dict[str, list[str]]
    disabled_plugins: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _check_key(where: str, table: str, key: str, value: Any, schema: dict[str, tuple[str, Any]]) -> None:
    if key not in schema:
        raise ConfigError(f"{where}: [{table}] unknown key '{key}' (known keys: {', '.join(sorted(schema))})")
    desc, ok = schema[key]
    if not ok(value):
        raise ConfigError(f"{where}: [{table}] key '{key}' must be {desc}, got {value!r}")


def validate_profile_table(where: str, name: str, table: dict[str, Any]) -> None:
    """Check keys and types of one profile table as written in a file."""
    tname = f"profiles.{name}"
    for key, value in table.items():
        _check_key(where, tname, key, value, PROFILE_KEYS)
    for key, value in table.get("match", {}).items():
        _check_key(where, f"{tname}.match", key, value, MATCH_KEYS)
    for key, value in table.get("quantize", {}).items():
        allowed = QUANTIZE.get(key)
        if allowed is None:
            raise ConfigError(f"{where}: [{tname}.quantize] unknown key '{key}' (known keys: {', '.join(QUANTIZE)})")
        if value not in allowed:
            raise ConfigError(f"{where}: [{tname}.quantize] key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    for key, value in table.get("dtype", {}).items():
        if key not in DTYPE_PARTS:
            raise ConfigError(f"{where}: [{tname}.dtype] unknown key '{key}' (known keys: {', '.join(DTYPE_PARTS)})")
        if value not in DTYPES:
            raise ConfigError(f"{where}: [{tname}.dtype] key '{key}' must be one of {', '.join(DTYPES)}, got {value!r}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: profile file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_config_files(cwd: Path | None = None) -> list[Path]:
    """The optional user files that exist, in the order they apply."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidates = [config_home / "framepack" / "framepack.toml", (cwd or Path.cwd()) / "framepack.toml"]
    seen, found = set(), []
    for path in candidates:
        resolved = path.resolve()
        if path.is_file() and resolved != SHIPPED.resolve() and resolved not in seen:
            seen.add(resolved)
            found.append(path)
    return found


def load_profiles(extra_files: list[Path] | None = None, include_user_files: bool = True) -> ProfileSet:
    files = [SHIPPED] + (user_config_files() if include_user_files else []) + list(extra_files or [])
    # name -> [(file, table as written there)], in file order; inheritance is
    # resolved only once every file is read, so a parent may come later.
    layers: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    disabled: list[str] = []
    for path in files:
        data = read_toml(path)
        where = str(path)
        for key in data:
            if key not in TOP_KEYS:
                raise ConfigError(f"{where}: unknown top-level key '{key}' (known keys: {', '.join(TOP_KEYS)})")
        if "disabled_plugins" in data:
            value = data["disabled_plugins"]
            if not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                raise ConfigError(f"{where}: 'disabled_plugins' must be a list of plugin names, got {value!r}")
            disabled.extend(value)
        profiles = data.get("profiles", {})
        if not isinstance(profiles, dict):
            raise ConfigError(f"{where}: 'profiles' must be a table of tables")
        for name, table in profiles.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [profiles.{name}] must be a table, got {table!r}")
            validate_profile_table(where, name, table)
            if name in layers and "inherits" in table:
                raise ConfigError(
                    f"{where}: [profiles.{name}] 'inherits' only works where a profile is first defined "
                    f"('{name}' already comes from {', '.join(dict.fromkeys(w for w, _ in layers[name]))})"
                )
            layers.setdefault(name, []).append((where, table))
    raw, sources = _resolve_inheritance(layers)
    profiles_out = {name: finish_profile(name, table, tuple(sources[name])) for name, table in raw.items()}
    return ProfileSet(profiles_out, raw, sources, disabled, [str(p) for p in files])


def _resolve_inheritance(
    layers: dict[str, list[tuple[str, dict[str, Any]]]],
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Merge each profile's layers onto a copy of its parent (without ``match``)
    as every file leaves the parent, parents first; -> (raw tables, sources)."""
    raw: dict[str, dict[str, Any]] = {}
    sources: dict[str, list[str]] = {}

    def parent_of(name: str) -> str | None:
        return layers[name][0][1].get("inherits")  # only the first definition may say it

    def resolve(name: str, chain: list[str]) -> None:
        if name in raw:
            return
        parent = parent_of(name)
        base: dict[str, Any] = {}
        from_files: list[str] = []
        if parent is not None:
            where = layers[name][0][0]
            if parent not in layers:
                raise ConfigError(f"{where}: [profiles.{name}] inherits unknown profile '{parent}' (known: {', '.join(sorted(layers))})")
            if parent in chain:
                cycle = chain[chain.index(parent):] + [parent]
                files = ", ".join(dict.fromkeys(layers[n][0][0] for n in cycle))
                raise ConfigError(
                    f"{files}: profiles inherit in a cycle: {' -> '.join(cycle)}; remove one of these 'inherits'"
                )
            resolve(parent, chain + [parent])
            base = {k: v for k, v in copy.deepcopy(raw[parent]).items() if k != "match"}
            from_files = list(sources[parent])
        for where, table in layers[name]:
            base = _deep_merge(base, table)
            from_files.append(where)
        raw[name] = base
        sources[name] = list(dict.fromkeys(from_files))

    for name in layers:
        resolve(name, [name])
    # First-definition order, as the files list them (resolution order puts parents first).
    return {name: raw[name] for name in layers}, {name: sources[name] for name in layers}


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _names(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def finish_profile(name: str, table: dict[str, Any], sources: tuple[str, ...]) -> Profile:
    where = " + ".join(sources)
    missing = [k for k in REQUIRED if k not in table]
    if missing:
        raise ConfigError(f"{where}: [profiles.{name}] is missing key(s) {', '.join(missing)}")
    dtype = table["dtype"]
    missing_dtypes = [p for p in DTYPE_PARTS if p not in dtype]
    if missing_dtypes:
        raise ConfigError(f"{where}: [profiles.{name}.dtype] is missing key(s) {', '.join(missing_dtypes)}")
    return Profile(
        name=name,
        sources=sources,
        description=table.get("description", ""),
        priority=table.get("priority", 0),
        match=dict(table.get("match", {})),
        attention=_names(table["attention"]),
        offload=_names(table["offload"]),
        cache=_names(table["cache"]),
        writers=_names(table["writers"]),
        dtype=dict(dtype),
        vae_tiling=table.get("vae_tiling", False),
        options=copy.deepcopy(table.get("options", {})),
        text_encoder=table.get("text_encoder", "hunyuan"),
        image_encoder=table.get("image_encoder", "siglip"),
        vae=table.get("vae", "hunyuan_vae"),
        quantize={"transformer": "none", "text_encoder": "none", **table.get("quantize", {})},
        loras=tuple((t["path"], float(t.get("scale", 1.0))) for t in table.get("loras", [])),
    )


def parse_set_value(text: str) -> Any:
    """A --set value is read as TOML when it parses (numbers, bools, lists),
    else taken as a plain string, so `--set cache=none` needs no quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(profiles: ProfileSet, name: str, assignments: list[str]) -> Profile:
    """Apply ``--set KEY=VALUE`` assignments (dotted keys) to one profile."""
    table = copy.deepcopy(profiles.raw[name])
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set attention=sdpa")
        parts = key.split(".")
        if any(not p for p in parts):
            raise UserError(f"--set {assignment!r}: empty part in key '{key}'")
        if parts[0] in ("match", "priority", "inherits"):
            raise UserError(
                f"--set {assignment!r}: '{parts[0]}' decides which profile is chosen, so it cannot be "
                "changed for the chosen one; use --profile NAME, or edit a profile file"
            )
        value = parse_set_value(text.strip())
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        try:
            validate_profile_table(f"--set {assignment}", name, {parts[0]: nested})
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        if parts[0] in ("match", "dtype", "options"):
            table = _deep_merge(table, {parts[0]: nested})
        else:
            table[parts[0]] = nested
    sources = tuple(profiles.sources[name]) + (("--set",) if assignments else ())
    return finish_profile(name, table, sources)


# --- matching --------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}"


def match_profile(profile: Profile, hw: HardwareInfo) -> tuple[bool, list[str]]:
    """Check every rule of a profile; return (matches, one reason per rule)."""
    rules = profile.match
    if not rules:
        return False, ["has no match rules (select it with --profile)"]
    reasons: list[str] = []
    ok = True

    def check(cond: bool, text: str) -> None:
        nonlocal ok
        ok = ok and cond
        reasons.append(("ok: " if cond else "no: ") + text)

    if "device" in rules:
        devices = _names(rules["device"])
        check(hw.device in devices, f"device is {hw.device} (wants {'/'.join(devices)})")
    if "gpu_name" in rules:
        names = _names(rules["gpu_name"])
        gpu = hw.gpu_name or ""
        check(any(n.lower() in gpu.lower() for n in names), f"GPU '{gpu or 'none'}' (wants a name containing {' or '.join(names)})")
    cc = hw.compute_capability
    cc_value = cc[0] + cc[1] / 10 if cc else None
    if "min_compute_capability" in rules:
        want = rules["min_compute_capability"]
        check(cc_value is not None and cc_value >= want, f"compute capability {cc_value if cc_value is not None else 'none'} (wants >= {_fmt(want)})")
    if "max_compute_capability" in rules:
        want = rules["max_compute_capability"]
        check(cc_value is not None and cc_value < want, f"compute capability {cc_value if cc_value is not None else 'none'} (wants < {_fmt(want)})")
    vram = hw.vram_total_gb
    if "min_vram_gb" in rules:
        want = rules["min_vram_gb"]
        check(vram is not None and vram >= want, f"{_gb(vram, want)} VRAM (wants >= {_fmt(want)} GB)")
    if "max_vram_gb" in rules:
        want = rules["max_vram_gb"]
        check(vram is not None and vram < want, f"{_gb(vram, want)} VRAM (wants < {_fmt(want)} GB)")
    if "min_free_vram_gb" in rules:
        want = rules["min_free_vram_gb"]
        free = hw.vram_free_gb
        check(free is not None and free >= want, f"{_gb(free, want)} free VRAM (wants >= {_fmt(want)} GB)")
    if "min_ram_gb" in rules:
        want = rules["min_ram_gb"]
        check(hw.ram_total_gb >= want, f"{hw.ram_total_gb:.1f} GB RAM (wants >= {_fmt(want)} GB)")
    if "max_ram_gb" in rules:
        want = rules["max_ram_gb"]
        check(hw.ram_total_gb < want, f"{hw.ram_total_gb:.1f} GB RAM (wants < {_fmt(want)} GB)")
    return ok, reasons


def _gb(x: float | None, want: float | None = None) -> str:
    """x in GB with one decimal, or in full where rounding would cross the rule's threshold."""
    if x is None:
        return "no"
    text = f"{x:.1f}"
    if want is not None and (float(text) < want) != (x < want):
        text = repr(x)
    return f"{text} GB"


@dataclass(frozen=True)
class Selection:
    profile: Profile
    why: str
    reasons: list[str]


def select_profile(profiles: ProfileSet, hw: HardwareInfo, requested: str | None = None) -> Selection:
    if requested is not None:
        if requested not in profiles.profiles:
            raise UserError(f"unknown profile '{requested}' (known profiles: {', '.join(sorted(profiles.profiles))})")
        profile = profiles.profiles[requested]
        return Selection(profile, f"chosen with --profile {requested}", [])
    matching = []
    for profile in profiles.profiles.values():
        ok, reasons = match_profile(profile, hw)
        if ok:
            matching.append((profile, reasons))
    if not matching:
        raise UserError(
            f"no profile matches this machine ({hw.summary()}); pick one with --profile "
            f"(known profiles: {', '.join(sorted(profiles.profiles))})"
        )
    # Highest priority wins; the name breaks ties so the choice is stable.
    matching.sort(key=lambda pr: (-pr[0].priority, pr[0].name))
    profile, reasons = matching[0]
    others = [p.name for p, _ in matching[1:]]
    why = "matches this machine: " + "; ".join(r.removeprefix("ok: ") for r in reasons)
    if others:
        why += f" (also matched, lower priority or later by name: {', '.join(others)})"
    return Selection(profile, why, reasons)
