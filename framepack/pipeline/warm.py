"""What stays loaded between the jobs of one process, and how long each stage took.

A ``ModelStore`` holds the loaded encoders and the transformer, each under a
key of everything that makes it what it is (model source and fingerprint,
dtype, weight format, attention kernel, device), plus the offload policy
that places them. A job asks it for each part: a part whose key matches is
used as it is; one that differs is released and loaded again. After a
stage, parts outside ``keep`` (the plan's resident set, see
``framepack.engine.planning.resident_between_jobs``) are released, so a
low-RAM profile still drops the 16 GB text encoder before the transformer
loads. The one-shot CLI uses a store that keeps nothing.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Callable, Iterator

from framepack.models.heap import release_free_heap

# The store's parts and the model names each one hands the offload policy.
PARTS = ("text", "vision", "vae", "transformer")


class ModelStore:
    def __init__(self, keep: frozenset[str] = frozenset(), alone: frozenset[str] = frozenset()) -> None:
        self.keep = keep  # parts to keep between stages and jobs
        self.alone = alone  # parts loaded only with nothing else held (the others are released first)
        self.entries: dict[str, tuple[Any, Any, dict]] = {}  # part -> (key, object, its modules)
        self.policy = None
        self.policy_key = None
        self.loaded: list[str] = []  # model names loaded since the last take_loaded()

    def policy_for(self, key, make: Callable[[], Any]):
        """The offload policy for ``key``; another key releases every model first."""
        if self.policy is not None and self.policy_key == key:
            return self.policy
        self.close()
        self.policy, self.policy_key = make(), key
        return self.policy

    def get(self, part: str, key, load: Callable[[], Any], modules: Callable[[Any], dict]) -> Any:
        """The loaded ``part`` for ``key``, loading (and preparing) it only when it differs."""
        held = self.entries.get(part)
        if held is not None and held[0] == key:
            return held[1]
        if held is not None:
            self.drop(part)
        if part in self.alone:
            for other in list(self.entries):
                self.drop(other)
        obj = load()
        release_free_heap()  # what quantizing on load freed (framepack.models.heap)
        mods = modules(obj)
        self.policy.prepare(mods)
        self.entries[part] = (key, obj, mods)
        self.loaded.extend(mods)
        return obj

    def has(self, part: str, key) -> bool:
        held = self.entries.get(part)
        return held is not None and held[0] == key

    def done_with(self, *parts: str) -> None:
        """The job needs these parts no more: drop those the store does not keep."""
        for part in parts:
            if part in self.entries and part not in self.keep:
                self.drop(part)

    def drop(self, part: str) -> None:
        _, obj, mods = self.entries.pop(part)
        self.policy.release(*mods)
        del obj, mods
        gc.collect()
        release_free_heap()

    def take_loaded(self) -> list[str]:
        loaded, self.loaded = self.loaded, []
        return loaded

    def close(self) -> None:
        for part in list(self.entries):
            self.drop(part)
        self.policy = self.policy_key = None
        gc.collect()
        release_free_heap()


class StageTimes:
    """Seconds per stage of a job: load, encode, sample, decode, write."""

    STAGES = ("load", "encode", "sample", "decode", "write")

    def __init__(self) -> None:
        self.seconds = {stage: 0.0 for stage in self.STAGES}

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started
