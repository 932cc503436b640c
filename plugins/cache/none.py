"""Step cache `none`: compute every transformer call (the exact baseline)."""

from __future__ import annotations

from framepack.backends import CacheBackend
from framepack.hookspecs import hookimpl
from framepack.caching.stepcache import CacheCounts


class NoCache:
    def __init__(self) -> None:
        self.counts = CacheCounts()

    def bind(self, transformer) -> None:
        pass

    def begin_section(self, steps: int) -> None:
        self.counts = CacheCounts()

    def __call__(self, forward, *, branch, step, steps, **inputs):
        self.counts.computed += 1
        return forward(**inputs)


@hookimpl
def framepack_register_cache(register):
    register(CacheBackend(name="none", make_cache=lambda options: NoCache(), description="no caching: every step computed"))
