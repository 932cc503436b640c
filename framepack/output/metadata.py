"""A job's record: everything needed to see how a video was made and to make
it again, stored in the output itself and in a JSON sidecar.

One dict, ``build_metadata(...)``, marked ``"format": "framepack-job/1"``.
Writers get it as string tags (``container_tags``): the whole JSON under
``comment`` (MP4 ``©cmt``, Matroska ``COMMENT``, a safetensors metadata
key, a PNG folder's ``metadata.json``) plus a readable ``title`` and
``description``. ``read_metadata`` finds it again in any of those, and
``framepack.pipeline.settings.settings_from_metadata`` turns it back into
``JobSettings`` fields for ``framepack generate --from``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from framepack.errors import UserError

FORMAT_NAME = "framepack-job"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
JSON_TAG = "comment"  # the tag that carries the whole record
SIDECAR_SUFFIX = ".json"
PATH_FIELDS = ("image", "output", "latents_out", "end_image", "extend")
TABLES = ("engine", "settings", "inputs", "backends", "model", "extra")


def build_metadata(settings, profile: str, backends: dict[str, str], model: dict, extra: dict) -> dict:
    """The job's record.

    :param settings: the :class:`framepack.pipeline.settings.JobSettings` that ran; paths
        are stored absolute so ``--from`` works from any folder.
    :param profile: the profile's name.
    :param backends: family -> backend name, as in ``JobStart.backends``.
    :param model: where the weights came from and their fingerprint
        (``model_info(source)``).
    :param extra: anything else worth keeping: ``fps``, ``width``,
        ``height``, ``frames``, ``sections``, timings, library versions.
    """
    from framepack import __version__

    values = settings.to_dict()
    for key in PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = str(Path(values[key]).expanduser().absolute())
    if values.get("model") is not None and Path(values["model"]).expanduser().exists():
        # A local folder, stored absolute so resume and --from work from any folder;
        # a hub id stays as given.
        values["model"] = str(Path(values["model"]).expanduser().resolve())
    if values.get("size") is not None:
        values["size"] = list(values["size"])
    inputs = {}  # every image the job reads, with its sha256 (resume refuses a changed one)
    if values.get("image") is not None:
        inputs["image"] = _file_identity(Path(values["image"]))
    if values.get("end_image") is not None:
        inputs["end_image"] = _file_identity(Path(values["end_image"]))
    if values.get("extend") is not None:  # the video an extension continues
        inputs["extend"] = _file_identity(Path(values["extend"]))
    if values.get("keyframes"):  # "TIME=PATH": the path stored absolute, as the other paths
        values["keyframes"] = [f"{t}={Path(k).expanduser().absolute()}"
                               for t, _, k in (str(kf).partition("=") for kf in values["keyframes"])]
        inputs["keyframes"] = [dict(time=kf.partition("=")[0], **_file_identity(Path(kf.partition("=")[2])))
                               for kf in values["keyframes"]]
    return {
        "format": FORMAT,
        "engine": {"name": "framepack", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": values,
        "inputs": inputs,
        "profile": profile,
        "backends": dict(backends),
        "model": dict(model),
        "extra": dict(extra),
    }


def _file_identity(path: Path) -> dict:
    """Path and sha256 of an input, so a re-run can tell the image changed."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"path": str(path), "sha256": digest}


def model_info(source, parts: tuple[str, ...] | None = None) -> dict:
    """Where each model part comes from and one fingerprint over them all:
    ``framepack.models.fingerprint.fingerprint(source, parts)`` (file names, sizes
    and times for a local folder, snapshot commits for hub repos; None when
    not all are local yet). Pass the parts the job loads."""
    from framepack.models.fingerprint import fingerprint
    from framepack.models.sources import ALL_PARTS

    parts = ALL_PARTS if parts is None else parts
    locations = {}
    for part in parts:
        where, sub = source.location(part)
        locations[part] = f"{where}/{sub}" if sub else where
    return {
        "variant": source.variant,
        "source": source.describe(),
        "parts": locations,
        "fingerprint": fingerprint(source, parts),
    }


def to_json(metadata: dict) -> str:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=False)


def container_tags(metadata: dict) -> dict[str, str]:
    """String tags for writers: the whole record as JSON, a title and a
    one-line description that file browsers and players show."""
    settings = metadata.get("settings", {})
    engine = metadata.get("engine", {})
    tags = {
        JSON_TAG: to_json(metadata),
        "title": str(settings.get("prompt", "")),
        "description": (
            f"framepack {engine.get('version', '?')}: seed {settings.get('seed')}, {settings.get('steps')} steps, "
            f"gs {settings.get('gs')}, cfg {settings.get('cfg')}, variant {settings.get('variant')}, "
            f"profile {metadata.get('profile')}"
        ),
    }
    if metadata.get("created"):
        tags["creation_time"] = metadata["created"]  # MP4 writes it into the movie header
    return tags


def write_sidecar(path: Path, metadata: dict) -> None:
    """The record as pretty JSON at ``path``, written atomically."""
    from framepack.output.segments import write_json_atomic

    write_json_atomic(path, metadata)


def sidecar_path(output: Path) -> Path:
    """``video.mp4`` -> ``video.json``."""
    return Path(output).with_suffix(SIDECAR_SUFFIX)


# --- reading ---------------------------------------------------------------------


def read_metadata(path: Path) -> dict:
    """The framepack record of a video (MP4, WebM, anything FFmpeg reads), a
    PNG frame folder, a JSON sidecar or a latents .safetensors file.

    Raises :class:`UserError` when the file is missing, unreadable, or has
    no framepack record.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        sidecar = path / "metadata.json"
        if not sidecar.is_file():
            raise UserError(f"{path}: a folder without metadata.json, so not a framepack frame folder")
        return _parse(_read_text(sidecar), sidecar)
    if path.suffix.lower() == ".json":
        return _parse(_read_text(path), path)
    if path.suffix.lower() == ".safetensors":
        return _parse(_tag(_safetensors_tags(path), path), path)
    return _parse(_tag(_container_tags(path), path), path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None


def _safetensors_tags(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def _container_tags(path: Path) -> dict[str, str]:
    import av

    try:
        with av.open(str(path)) as container:
            tags = dict(container.metadata)
            for stream in container.streams:
                for key, value in stream.metadata.items():
                    tags.setdefault(key, value)
            return tags
    except (OSError, av.FFmpegError) as exc:
        raise UserError(f"{path}: not a video file framepack can read ({exc})") from None


def _tag(tags: dict[str, str], path: Path) -> str:
    for key, value in tags.items():
        if key.lower() == JSON_TAG:  # Matroska upper-cases tag names
            return value
    raise UserError(f"{path}: has no framepack metadata (it was not written by framepack, or was re-encoded since)")


def _parse(text: str, path: Path) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith(f"{FORMAT_NAME}/"):
        raise UserError(f"{path}: has no framepack metadata (expected JSON with \"format\": \"{FORMAT}\")")
    name, _, version = data["format"].partition("/")
    if not version.isdigit():
        raise UserError(f"{path}: unknown metadata format {data['format']!r}")
    for key in TABLES:  # a crafted or damaged record must not reach code that expects tables
        if not isinstance(data.get(key, {}), dict):
            raise UserError(f"{path}: framepack metadata is damaged: '{key}' must be a JSON object, "
                            f"not {type(data[key]).__name__}")
    if not isinstance(data.get("inputs", {}).get("image", {}), dict):
        raise UserError(f"{path}: framepack metadata is damaged: 'inputs.image' must be a JSON object")
    if int(version) > FORMAT_VERSION:
        from framepack import __version__

        engine = data.get("engine", {}).get("version", "?")
        raise UserError(
            f"{path}: written by framepack {engine} in format {data['format']}, newer than this framepack "
            f"{__version__} reads ({FORMAT}); upgrade framepack"
        )
    return data


def format_metadata(metadata: dict) -> str:
    """Readable lines for ``framepack info``."""
    engine = metadata.get("engine", {})
    lines = [f"framepack {engine.get('version', '?')} ({metadata.get('format')}), created {metadata.get('created', '?')}"]
    for key, value in metadata.get("settings", {}).items():
        lines.append(f"  {key}: {value}")
    for role, value in metadata.get("inputs", {}).items():
        if role == "loras":
            continue  # below, with their scales
        for each in value if isinstance(value, list) else [value]:
            if isinstance(each, dict) and each.get("sha256"):
                at = f" at {each['time']} s" if each.get("time") is not None else ""
                lines.append(f"  {role.replace('_', ' ').removesuffix('s')}{at} sha256: {each['sha256']} ({each.get('path')})")
    for lora in metadata.get("inputs", {}).get("loras", []):  # framepack.pipeline.loras.lora_records
        if isinstance(lora, dict):
            lines.append(f"  lora: {lora.get('file')} at {lora.get('scale')}, sha256 {lora.get('sha256')}")
    lines.append(f"profile: {metadata.get('profile')}")
    backends = metadata.get("backends", {})
    if backends:
        lines.append("backends: " + ", ".join(f"{k}={v}" for k, v in backends.items()))
    model = metadata.get("model", {})
    if model:
        lines.append(f"model: {model.get('source', '?')}; fingerprint {model.get('fingerprint') or 'unknown'}")
    for key, value in metadata.get("extra", {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """Control characters from a crafted file shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
