"""A job's folder: what it is, what each finished section produced, and the
checkpoint that lets a killed job continue where it stopped.

Layout (``OUTPUT.job/`` by default):

    .framepack-job             marker: framepack made this folder and may delete what it wrote
    lock                       held (flock) by the one process working here; holds its pid
    job.json                   settings, profile, backends, model fingerprint
    checkpoint.safetensors     state after the last finished section (atomic, with its own digest)
    latents/0003.safetensors   each section's new latents, written once
    segments/<writer>/...      each section's finished frames, per writer (lead-0, lead-1: the
                               input's frames of an extended video, before the generated ones)

Only the history window the next sections read is checkpointed; everything
else is written once, so checkpoint I/O stays linear in the video's length.

Three guarantees (docs/output.md):

- framepack deletes only what it wrote: a folder without the marker is used
  only when empty, and removal deletes the files of the layout above, then
  the folders if they are empty. Anything else a user put there stays.
- One process at a time: ``lock`` is an OS file lock (flock), so it dies
  with the process and a SIGKILL never leaves a stale lock.
- Nothing damaged is used: the checkpoint lists the sha256 of every file it
  relies on (section latents, segments) and carries a digest of its own
  state and tensors; resume verifies them all before computing anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from framepack.errors import UserError

JOB_FORMAT = "framepack-job/1"
CHECKPOINT_FORMAT = "framepack-checkpoint/2"
MARKER = ".framepack-job"
LOCK = "lock"
# What a job writes, relative to its folder. Removal deletes these and nothing else.
_OWNED_TOP = ("job.json", "checkpoint.safetensors", MARKER, LOCK)
_PARTIAL = r"\..+\.partial-\d+"  # framepack.output.writing.partial_path
_SECTION_FILE = re.compile(r"\d{4}\.safetensors")
_SEGMENT = re.compile(r"(\d{4}|lead-\d)(\.[a-z0-9]+)?")  # lead-N: an extended video's input part
_PNG_FRAME = re.compile(r"\d{6}\.png")


@dataclass
class Checkpoint:
    next_section: int  # generation index of the next section to run
    generated: int  # latent frames of the video so far
    final_frames: int  # pixel frames already written to segments
    segments: list[int]  # segment ids written so far, in generation order
    window: torch.Tensor  # (1, 16, W, h, w) the history frames later sections read
    start_latent: torch.Tensor  # (1, 16, 1, h, w)
    generator_state: torch.Tensor  # uint8, torch.Generator.get_state()
    edge: torch.Tensor | None  # (1, 3, <=33, H, W) float pixels not final yet
    files: dict[str, str] = field(default_factory=dict)  # path relative to the folder -> sha256


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for child in sorted(path.iterdir()):
            h.update(child.name.encode() + b"\0")
            h.update(file_digest(child).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensor_digest(state: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(state.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _holder_pid(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip() or "?"
    except OSError:
        return "?"


class JobDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().absolute()
        self._lock_fd: int | None = None

    @classmethod
    def for_output(cls, output: Path) -> "JobDir":
        return cls(Path(str(output) + ".job"))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.safetensors"

    @property
    def marked(self) -> bool:
        """Made by framepack: the marker, or (folders of earlier versions) a job.json of ours."""
        if (self.path / MARKER).is_file():
            return True
        try:
            job = json.loads((self.path / "job.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(job, dict) and job.get("format") == JOB_FORMAT

    def segment_dir(self, writer: str) -> Path:
        return self.path / "segments" / writer

    def section_latents_path(self, index: int) -> Path:
        return self.path / "latents" / f"{index:04d}.safetensors"

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.path).as_posix()

    # --- ownership and the lock ----------------------------------------------------

    def claim_new(self) -> None:
        """Take the folder for a new job (before anything loads), locked.

        Refuses a file, a folder framepack did not make that is not empty, a
        folder another process is working in, and an unfinished job (which
        ``framepack resume`` continues). A marked folder whose job never
        finished a section is cleared of what that job wrote."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--job-dir {self.path} is a file, not a folder; give a folder name")
        if self.path.is_dir() and not self.marked and any(self.path.iterdir()):
            raise UserError(
                f"--job-dir {self.path} already exists and is not a framepack job folder; framepack uses only an "
                "empty folder or one it made itself (it never deletes files it did not write): give another --job-dir"
            )
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the job folder {self.path}: {exc.strerror}") from None
        if not (self.path / MARKER).exists():
            _atomic_json(self.path / MARKER, {"format": JOB_FORMAT, "created_folder": created})
        self.lock()
        if self.checkpoint_path.exists():
            self.unlock()
            raise UserError(
                f"{self.path} holds an unfinished job: continue it with `framepack resume {self.path}`, "
                "or pick another --output or --job-dir"
            )
        self._remove_owned(keep_marker=True)  # a job that never finished its first section

    def claim_existing(self) -> None:
        """Take an existing job folder for resume, locked."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a framepack job folder (no such folder)")
        if not self.marked:
            raise UserError(f"{self.path} is not a framepack job folder (no job.json)")
        self.lock()

    def lock(self) -> None:
        import fcntl

        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(
                    f"another process (pid {_holder_pid(path)}) is working in {self.path}; "
                    "wait for it to finish or stop it first"
                ) from None
            # The holder may have removed the file between our open and our lock:
            # then we hold a lock on a name nobody else sees. Take the new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- the job -----------------------------------------------------------

    def write_job(self, job: dict) -> None:
        (self.path / "latents").mkdir(exist_ok=True)
        _atomic_json(self.path / "job.json", {"format": JOB_FORMAT, **job})

    def read_job(self) -> dict:
        path = self.path / "job.json"
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a framepack job folder (no job.json)") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is damaged: {exc}") from exc
        if not isinstance(job, dict):
            raise UserError(f"{path} is damaged: expected a JSON object, found {type(job).__name__}")
        if job.get("format") != JOB_FORMAT:
            raise UserError(f"{path} is not a job of this engine (format {job.get('format')!r}, expected {JOB_FORMAT})")
        for key in ("settings", "backends", "extra"):
            if not isinstance(job.get(key, {}), dict):
                raise UserError(f"{path} is damaged: '{key}' must be a JSON object")
        return job

    def job_id(self) -> str:
        return hashlib.sha256((self.path / "job.json").read_bytes()).hexdigest()[:16]

    # --- per-section results --------------------------------------------------

    def save_section_latents(self, index: int, latents: torch.Tensor) -> str:
        """Write section ``index``'s latents; returns the file's sha256."""
        from safetensors.torch import save_file

        path = self.section_latents_path(index)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        latents = latents.contiguous()
        # Its own digest too, so sections stay checkable when the checkpoint is lost.
        meta = {"index": str(index), "sha256": _tensor_digest(str(index), {"latents": latents})}
        try:
            save_file({"latents": latents}, str(tmp), metadata=meta)
            digest = file_digest(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    def load_section_latents(self, index: int) -> torch.Tensor:
        from safetensors import safe_open

        path = self.section_latents_path(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                latents = f.get_tensor("latents")
        except FileNotFoundError:
            raise UserError(f"section {index}'s latents {path} are missing") from None
        except Exception as exc:
            raise UserError(f"section {index}'s latents {path} are damaged ({exc})") from exc
        if meta.get("sha256") != _tensor_digest(str(index), {"latents": latents}) or meta.get("index") != str(index):
            raise UserError(f"section {index}'s latents {path} are damaged: they do not match their sha256")
        return latents

    # --- the checkpoint -------------------------------------------------------

    def write_checkpoint(self, ck: Checkpoint) -> None:
        from safetensors.torch import save_file

        tensors = {"window": ck.window, "start_latent": ck.start_latent, "generator_state": ck.generator_state}
        if ck.edge is not None:
            tensors["edge"] = ck.edge
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        state = json.dumps({"next_section": ck.next_section, "generated": ck.generated,
                            "final_frames": ck.final_frames, "segments": ck.segments, "files": ck.files},
                           sort_keys=True)
        meta = {"format": CHECKPOINT_FORMAT, "job_id": self.job_id(), "state": state,
                "sha256": _tensor_digest(state, tensors)}
        tmp = self.checkpoint_path.with_name(f".checkpoint.safetensors.partial-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_checkpoint(self) -> Checkpoint:
        from safetensors import safe_open

        path = self.checkpoint_path
        if not path.exists():
            raise UserError(f"{self.path} has no checkpoint: the job stopped before its first section finished, so "
                            "there is nothing to continue; run the same `framepack generate` again to start over")
        damaged = f"checkpoint {path} is damaged"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # any damage reads as one clear line
            raise UserError(f"{damaged} or not a framepack checkpoint ({exc})") from exc
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a checkpoint of this engine (format {meta.get('format')!r}, "
                            f"expected {CHECKPOINT_FORMAT})")
        if meta.get("sha256") != _tensor_digest(meta.get("state", ""), tensors):
            raise UserError(f"{damaged}: its contents do not match its sha256 (a changed byte or an edited field)")
        if meta.get("job_id") != self.job_id():
            raise UserError(f"{path} belongs to another job (its job.json differs); refusing to mix them")
        try:
            state = json.loads(meta["state"])
            ck = Checkpoint(
                next_section=int(state["next_section"]), generated=int(state["generated"]),
                final_frames=int(state["final_frames"]), segments=[int(s) for s in state["segments"]],
                window=tensors["window"], start_latent=tensors["start_latent"],
                generator_state=tensors["generator_state"], edge=tensors.get("edge"),
                files={str(k): str(v) for k, v in state["files"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{damaged}: {exc}") from exc
        return ck

    # --- removal ----------------------------------------------------------------

    def remove(self) -> None:
        """Delete what the job wrote, then the folder if nothing else is in it."""
        created = True
        try:
            created = bool(json.loads((self.path / MARKER).read_text()).get("created_folder", True))
        except (OSError, ValueError, AttributeError):
            pass
        self._remove_owned(keep_marker=False)
        self.unlock()
        if created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # not empty: someone else's files stay

    def discard(self, relpaths) -> None:
        """Delete files or segment folders of this job (never anything outside the layout)."""
        for rel in relpaths:
            path = self.path / rel
            if not self._is_owned(path):
                raise ValueError(f"{path} is not a file framepack writes")
            _delete(path)

    def unlisted(self, listed: set[str]) -> list[str]:
        """Section and segment files the checkpoint does not list (written after it,
        by a job killed between a section's files and its checkpoint), and
        leftover partial files."""
        found = []
        for folder in [self.path / "latents", *sorted((self.path / "segments").glob("*"))]:
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                rel = self.relative(child)
                if self._is_owned(child) and rel not in listed:
                    found.append(rel)
        for child in self.path.iterdir():
            if re.fullmatch(_PARTIAL, child.name):
                found.append(child.name)
        return sorted(found)

    def _is_owned(self, path: Path) -> bool:
        try:
            rel = Path(path).relative_to(self.path).parts
        except ValueError:
            return False
        name = rel[-1] if rel else ""
        if len(rel) == 1:
            return name in _OWNED_TOP or bool(re.fullmatch(_PARTIAL, name))
        if len(rel) == 2 and rel[0] == "latents":
            return bool(_SECTION_FILE.fullmatch(name) or re.fullmatch(_PARTIAL, name))
        if len(rel) == 3 and rel[0] == "segments":
            return bool(_SEGMENT.fullmatch(name) or re.fullmatch(_PARTIAL, name))
        return False

    def _remove_owned(self, keep_marker: bool) -> None:
        if not self.path.is_dir():
            return
        for rel in self.unlisted(set()):
            _delete(self.path / rel)
        for name in ("checkpoint.safetensors", "job.json"):
            (self.path / name).unlink(missing_ok=True)
        for folder in [*(self.path / "segments").glob("*"), self.path / "segments", self.path / "latents"]:
            try:
                folder.rmdir()
            except OSError:
                pass  # missing, or holds someone else's files
        if not keep_marker:
            (self.path / MARKER).unlink(missing_ok=True)
            if self._lock_fd is not None:
                (self.path / LOCK).unlink(missing_ok=True)  # while held: see lock()


def _delete(path: Path) -> None:
    """A file, or a png segment folder: its frames and partials, then the folder."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if _PNG_FRAME.fullmatch(child.name) and child.is_file():
                child.unlink()
        try:
            path.rmdir()
        except OSError:
            pass  # someone else's files in it stay
    else:
        path.unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
