"""What a client of the service may name of the server's files.

A job's settings come from whoever can reach the API, and the engine opens
whatever path they name: a model folder, a LoRA file, a step cache's
calibration file. So settings that arrive over HTTP name none of them:

- ``model``: only a model the operator allowed (``framepack serve --model``,
  ``--allow-model``); a job that names none runs the service's model.
- ``loras``: bare names, found in the server's LoRA folder (``GET /api/loras``
  lists them), never paths.
- ``overrides``: none that names a file (``loras``, a cache's ``calibration``,
  any value that is a path); the operator sets those with ``serve --set``.

The operator's own ways in (``framepack queue add``, ``serve --set``) are not
limited: they already run on the server. The other way round, a failed job's
message names the server's folders by label (``hide_server_paths``): the
operator's log keeps the full text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from framepack.errors import UserError

# Override keys whose value is a file on the server (a dotted key's last part for options).
FILE_KEYS = ("loras",)
FILE_OPTIONS = ("calibration",)


def _forms(model: str) -> set[str]:
    """The spellings of one model: as given, and as the folder it names here."""
    forms = {model}
    try:
        forms.add(str(Path(model).expanduser().resolve()))
    except (OSError, RuntimeError):
        pass
    return forms


class ClientPaths:
    """The rule for one server: which models its clients may name."""

    def __init__(self, models: Iterable[str | Path] = ()) -> None:
        self.models = tuple(str(m) for m in models)
        self._allowed = set().union(*(_forms(m) for m in self.models)) if self.models else set()

    def check(self, settings: dict) -> None:
        """UserError naming the first setting that reaches outside what clients may name."""
        model = settings.get("model")
        if model is not None and not (_forms(model) & self._allowed):
            raise UserError(f"model {model!r}: not a model this service runs; leave model out for the "
                            "service's own, or ask its operator to allow it (framepack serve --allow-model)")
        for name in _lora_names(settings.get("loras")):
            if not is_bare_name(name):
                raise UserError(f"loras: {name!r} is a path; the service takes LoRAs by name from its LoRA "
                                "folder (GET /api/loras lists them)")
        for assignment in settings.get("overrides", []):
            key, _, value = assignment.partition("=")
            parts = key.strip().split(".")
            if parts[0] in FILE_KEYS or parts[-1] in FILE_OPTIONS or _looks_like_a_path(value.strip()):
                raise UserError(f"overrides: {assignment!r} names a file on the server; only its operator "
                                "sets that (framepack serve --set)"
                                + ("; name LoRAs in the loras setting" if parts[0] == "loras" else ""))


def is_bare_name(name: str) -> bool:
    """A file name with no folder part (what the LoRA folder is searched for)."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and not name.startswith("~")


def _lora_names(value) -> list[str]:
    from framepack.pipeline.loras import normalize_loras  # every spelling Pipeline.generate takes

    return [name for name, _ in normalize_loras(value)]


def _looks_like_a_path(value: str) -> bool:
    text = value.strip("'\"")
    return "/" in text or "\\" in text or text.startswith("~")


def hide_server_paths(text: str, places: dict[str, str]) -> str:
    """``text`` with each server folder in ``places`` (path -> label, e.g. the
    storage root -> ``<storage>``) replaced by its label, longest path first so
    a folder inside another keeps its own label."""
    for path in sorted(places, key=len, reverse=True):
        if path and path != "/":
            text = text.replace(path, places[path])
    return text
