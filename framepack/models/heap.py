"""Give freed heap memory back to the operating system (glibc only; a no-op elsewhere).

Why: torch allocates CPU tensors through malloc. glibc serves anything under its mmap
threshold (which grows to 32 MB as large blocks are freed) from the heap, and a heap
does not shrink past a live block. Loading a model casts tensor after tensor (read
bf16, keep fp8, free the bf16), leaving free holes between kept tensors: measured
2.8 GB of the 18.3 GB the fp8 transformer's process held after loading
(benchmarks/ram_bench.py). ``malloc_trim(0)`` returns every free page in those holes.

The section loop needs the opposite: no holes to begin with. Each section decodes,
blends and encodes buffers of 0.1-30 MB; once the threshold has grown past them they
come from the heap, and each section's VAE decode peak lands on whatever holes the
heap has left: the resting RSS drifted up by 80 MB over 16 sections, and the peak of
one and the same 5-second job ranged from 800 to 1000 MB between runs (tiny model,
CPU, 128x128; benchmarks/length_bench.py). Inside ``fixed_mmap_threshold`` such
buffers get mmaps of their own, which go back to the OS when freed: the peak is
776-785 MB for 4 to 50 sections. Trimming after each section instead flattens the
resting RSS but not the peak (840-976 MB). The price is page faults: the tiny model,
all of whose buffers are mid-sized, takes about 20 % longer per section; a real
model's frames are far above 32 MB and were mmaps already.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os

M_MMAP_THRESHOLD = -3  # mallopt() parameter, <malloc.h>
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # where glibc's threshold starts
GLIBC_MAX_THRESHOLD = 32 * 2**20  # where it stops growing on 64-bit


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    """A glibc function, or None where the C library has no such function."""
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        return getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def _user_set_threshold() -> bool:
    """The user tuned glibc's mmap threshold themselves: leave it to them."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


@contextlib.contextmanager
def fixed_mmap_threshold(size: int = GLIBC_DEFAULT_THRESHOLD):
    """Inside: blocks of ``size`` bytes or more get mmaps of their own, whatever is freed.

    Used as a decorator on the section loop. glibc cannot turn its growing threshold
    back on; on the way out it is set to its 32 MB ceiling, where loading a real model
    takes it anyway, so code after the loop (a next job's loading, and
    ``release_free_heap``) finds the heap behaving as it does after loading.
    Yields False (and changes nothing) off glibc or when the environment sets the
    threshold.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None or _user_set_threshold() or not mallopt(M_MMAP_THRESHOLD, size):
        yield False
        return
    try:
        yield True
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_THRESHOLD)


def release_free_heap() -> bool:
    """Return free heap pages to the OS; True when the C library could do it."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
