"""Give freed heap memory back to the operating system (glibc only; a no-op elsewhere).

Why: torch allocates CPU tensors through malloc. glibc serves anything under its mmap
threshold (which grows to 32 MB as large blocks are freed) from the heap, and a heap
does not shrink past a live block. Loading a model casts tensor after tensor (read
bf16, keep fp8, free the bf16), leaving free holes between kept tensors: measured
2.8 GB of the 18.3 GB the fp8 transformer's process held after loading
(benchmarks/ram_bench.py). ``malloc_trim(0)`` returns every free page in those holes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_free_heap() -> bool:
    """Return free heap pages to the OS; True when the C library could do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
