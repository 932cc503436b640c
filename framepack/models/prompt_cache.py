"""Prompt embeddings cached on disk, so a repeated prompt never loads the
16 GB Llama encoder again (the common case: same prompt, other seeds).

Key: the prompt, the encoding recipe, and a fingerprint of the text encoders
(framepack.models.fingerprint: stat of the local files, or the hub snapshot commit;
plus dtype and weight format). A changed model gives a new
key, never a stale hit. Entries are safetensors files written atomically;
the cache keeps at most ``max_entries`` and ``max_bytes``, dropping the least
recently used. ``framepack cache clear`` empties it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from framepack.models.fingerprint import fingerprint

# Bump when the text encoding changes (template, crop, layer), so old entries miss.
RECIPE = "hunyuan-llama[-3]+clip-pooler/v1"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def cache_dir() -> Path:
    explicit = os.environ.get("FRAMEPACK_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / "prompts"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "framepack" / "prompts"


def encoder_fingerprint(source, backend: str, dtype: torch.dtype, quantize: str) -> str | None:
    """A stable id of the text encoders, or None when it cannot be known
    without downloading (hub files not in the local cache yet)."""
    return fingerprint(source, TEXT_PARTS, RECIPE, backend, dtype, quantize)


class PromptCache:
    def __init__(self, root: Path | None = None, max_entries: int = 512, max_bytes: int = 2 * 1024**3) -> None:
        self.root = Path(root) if root is not None else cache_dir()
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    @staticmethod
    def key(prompt: str, fingerprint: str) -> str:
        return hashlib.sha256(json.dumps([fingerprint, prompt]).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        try:
            tensors = load_file(str(path))
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError):
            path.unlink(missing_ok=True)  # a damaged entry is just a miss
            return None
        return tensors["llama"], tensors["pooler"]

    def put(self, key: str, llama: torch.Tensor, pooler: torch.Tensor, prompt: str) -> None:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tensors = {"llama": llama.detach().cpu().contiguous(), "pooler": pooler.detach().cpu().contiguous()}
        save_file(tensors, str(tmp), metadata={"prompt": prompt[:1000]})
        os.replace(tmp, path)
        self.evict()

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)

    def evict(self) -> None:
        entries = self.entries()  # oldest first
        total = sum(p.stat().st_size for p in entries)
        while entries and (len(entries) > self.max_entries or total > self.max_bytes):
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    def clear(self) -> int:
        entries = self.entries()
        for path in entries:
            path.unlink(missing_ok=True)
        return len(entries)
