"""The web UI's way to the render service: its REST API (docs/api.md), over HTTP.

The UI runs in the server's process but goes through the same endpoints any
client uses, so it can do nothing a script could not, and the API's checks
(settings, uploads, auth) are the UI's checks. Files are fetched server-side
into a cache folder and handed to Gradio as paths: the browser never needs the
API token."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from framepack.errors import UserError


class ApiError(UserError):
    """The service said no: ``status`` and the service's own one-line message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, cache_dir: Path | None = None,
                 timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="framepack-ui-"))

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------- requests

    def _call(self, method: str, url: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"the render service cannot be reached: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if isinstance(detail, list):  # FastAPI's validation errors
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            raise ApiError(response.status_code, str(detail))
        return response.json() if response.content else None

    def submit(self, settings: dict, *, image: Path | None = None, end_image: Path | None = None,
               keyframes: list[Path] = (), extend: Path | None = None, priority: int = 0) -> str:
        files = []
        handles = []
        try:
            uploads = [("image", image), ("end_image", end_image), ("extend", extend)]
            for field, path in uploads + [("keyframes", k) for k in keyframes]:
                if path is None:
                    continue
                handle = open(path, "rb")
                handles.append(handle)
                files.append((field, (Path(path).name, handle, "application/octet-stream")))
            data = {"settings": json.dumps(settings), "priority": str(int(priority))}
            return self._call("POST", "/api/jobs", data=data, files=files or None)["id"]
        finally:
            for handle in handles:
                handle.close()

    def jobs(self, status: str | None = None, limit: int = 200) -> list[dict]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self._call("GET", "/api/jobs", params=params)["jobs"]

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/api/jobs/{job_id}")

    def patch(self, job_id: str, **fields) -> dict:
        return self._call("PATCH", f"/api/jobs/{job_id}", json={k: v for k, v in fields.items() if v is not None})

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/api/jobs/{job_id}")

    def resume(self, job_id: str) -> dict:
        return self._call("POST", f"/api/jobs/{job_id}/resume")

    def retry(self, job_id: str) -> dict:
        return self._call("POST", f"/api/jobs/{job_id}/retry")

    def presets(self) -> dict[str, dict]:
        found = self._call("GET", "/api/presets")
        if isinstance(found, list):  # [{name, settings}] or {name: settings}: take either
            return {p["name"]: p["settings"] for p in found}
        return found

    def put_preset(self, name: str, settings: dict) -> None:
        self._call("PUT", f"/api/presets/{name}", json=settings)

    def delete_preset(self, name: str) -> None:
        self._call("DELETE", f"/api/presets/{name}")

    def fetch(self, job_id: str, name: str) -> Path | None:
        """A job's file in the cache folder (fetched again when it changed), or None."""
        folder = self.cache_dir / job_id
        folder.mkdir(parents=True, exist_ok=True)
        safe = Path(name).name  # the service's names, but never a path here either
        dest = folder / safe
        try:
            with self.http.stream("GET", f"/api/jobs/{job_id}/files/{name}") as response:
                if response.status_code == 404:
                    return None
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, response.text)
                size = response.headers.get("content-length")
                stamp = response.headers.get("last-modified", "") + "|" + (size or "")
                marker = folder / f".{safe}.stamp"
                if dest.exists() and marker.exists() and marker.read_text() == stamp:
                    return dest
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{safe}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                    os.replace(tmp, dest)  # a reader sees the old file or the whole new one
                except BaseException:
                    os.unlink(tmp)
                    raise
                marker.write_text(stamp)
                return dest
        except httpx.HTTPError as exc:
            raise ApiError(503, f"the render service cannot be reached: {exc}") from None
