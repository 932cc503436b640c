"""The service's shared folder: inputs by content hash, one folder per job.

    inputs/<sha256>.<ext>     every uploaded image or video, checked and hashed once
    jobs/<id>/work/           the job folder (framepack.output.jobdir): checkpoint, finished sections
    jobs/<id>/out/            the outputs, named by the service, never by the user
    jobs/<id>/preview.png     the latest step's preview
    logs/                     JSON-line logs
    tmp/                      uploads while they are checked

Workers on several machines share this folder (NFS or similar), so a job
killed on one machine resumes on another. A name from a user never becomes a
path: ids are checked against their pattern, inputs are named by their hash,
and a job's files are looked up in the list the worker recorded.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO

from framepack.errors import UserError

JOB_ID = re.compile(r"[0-9a-f]{32}")
PREVIEW = "preview.png"
_CHUNK = 1 << 20


class Storage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        for sub in ("inputs", "jobs", "logs", "tmp"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--storage {self.root}: cannot create {sub}/: {exc.strerror}") from None

    # --- inputs -------------------------------------------------------------------------------

    def save_input(self, stream: BinaryIO, field: str, filename: str | None, limit_bytes: int | None = None,
                   video: bool = False) -> dict:
        """Copy an upload into inputs/ under its sha256, after the CLI's image checks
        (``video``: the checks ``--extend`` makes of the video it continues).

        -> ``{"sha256", "file", "name"}``; ``name`` (the user's file name) is kept
        for display only. Raises UserError with the CLI's message, naming the
        field instead of a server path."""

        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.upload"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if limit_bytes is not None and size > limit_bytes:
                        raise UploadTooLarge(f"{field}: over the upload limit of {limit_bytes / 1e6:g} MB")
                    digest.update(chunk)
                    out.write(chunk)
            try:
                ext = _check_video(tmp) if video else _check_image(tmp)
            except UserError as exc:
                raise UserError(str(exc).replace(str(tmp), f"upload {field!r}")) from None
            sha = digest.hexdigest()
            final = self.root / "inputs" / f"{sha}.{ext}"
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)  # the same bytes under the same name: a race is harmless
        finally:
            tmp.unlink(missing_ok=True)
        return {"sha256": sha, "file": final.name, "name": _display_name(filename)}

    def input_path(self, entry: dict) -> Path:
        name = entry.get("file", "")
        if not re.fullmatch(r"[0-9a-f]{64}\.[a-z0-9]{1,8}", name):
            raise UserError(f"input record {name!r} is not one the service wrote")
        return self.root / "inputs" / name

    # --- jobs ----------------------------------------------------------------------------------

    def job_root(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise UserError(f"job id {job_id!r}: expected 32 hexadecimal digits")
        return self.root / "jobs" / job_id

    def work_dir(self, job_id: str) -> Path:
        return self.job_root(job_id) / "work"

    def out_dir(self, job_id: str) -> Path:
        return self.job_root(job_id) / "out"

    def preview(self, job_id: str) -> Path:
        return self.job_root(job_id) / PREVIEW

    def output_names(self, job_id: str, paths) -> list[str]:
        """The result's files as names under out/ (a png folder's frames as folder/frame.png)."""
        out = self.out_dir(job_id)
        names = []
        for path in map(Path, paths):
            if path.is_dir():
                names += [p.relative_to(out).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
            else:
                names.append(path.relative_to(out).as_posix())
        return names

    def file_for(self, job: dict, name: str) -> Path | None:
        """The file a job's ``name`` stands for, or None: only names the worker recorded
        (and the preview) are served, so no user string is ever joined into a path."""
        if name == PREVIEW:
            path = self.preview(job["id"])
            return path if path.is_file() else None
        from framepack.service.jobspec import partial_name

        if name not in job.get("outputs", []) and name != partial_name(job.get("settings") or {}):
            return None
        path = self.out_dir(job["id"]) / name
        return path if path.is_file() else None


def _check_image(path: Path) -> str:
    """The CLI's image checks; -> the file's extension by its format."""
    from PIL import Image

    from framepack.pipeline.inputs import load_image

    load_image(path)
    with Image.open(path) as im:
        return (im.format or "img").lower()


def _check_video(path: Path) -> str:
    """Readable as a video (framepack.output.video_input); the length rules need the
    job's window and are the worker's preflight."""
    from framepack.output.video_input import probe_video

    probe_video(path, flag=None)
    return "video"


class UploadTooLarge(UserError):
    """An upload over --max-upload-mb (HTTP 413)."""


def _display_name(filename: str | None) -> str:
    """The user's file name, reduced to printable characters, for display only."""
    name = os.path.basename((filename or "").replace("\\", "/"))
    return re.sub(r"[^\w .()+-]", "_", name)[:200]
