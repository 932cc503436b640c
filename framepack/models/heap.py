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
resting RSS but not the peak (840-976 MB). The loop's threshold is 2 MB
(``LOOP_THRESHOLD``; it was glibc's starting 128 KB): the peak stays as flat
(tiny model, 64x64, 5 s against 10 s: 538/547 MB at 2 MB, 535/539 MB at 128 KB;
128x128: 763/773 against 762/764 MB) while the buffers under 2 MB, which cost
fresh page faults every section at 128 KB, come from the heap again. A real model's frames are far above 32 MB and were mmaps
already, so for it the threshold changes nothing either way.

The price is page faults, and faults are most of what a CPU decode costs with or
without the fixed threshold: PyTorch's slow_conv3d path (small channel counts, as
in the tiny VAE) builds a fresh im2col buffer of tens of MB per convolution,
always an mmap of its own, faulted in 4 KB at a time. A 5-section 64x64
tiny-model job took 2.9 million minor faults with the 128 KB threshold (2.1
million with glibc's own, as in the original FramePack code) and more system
than user CPU time (benchmarks/overhead_bench.py). Backed by transparent huge
pages (``enable_huge_pages``: PyTorch's own switch, 2 MB pages for its CPU
tensors of 2 MB or more) the same decodes take about 0.5 million faults and half
the time, and the peak RSS stays where it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt() parameter, <malloc.h>
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # where glibc's threshold starts
GLIBC_MAX_THRESHOLD = 32 * 2**20  # where it stops growing on 64-bit
LOOP_THRESHOLD = 2 * 2**20  # the section loop's: buffers from 2 MB get their own mmaps
# PyTorch (c10/core/alloc_cpu.cpp) reads this once, at its first CPU allocation of
# 2 MB or more: "1" aligns such allocations to 2 MB and madvise()s them MADV_HUGEPAGE.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


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
def fixed_mmap_threshold(size: int = LOOP_THRESHOLD):
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


def enable_huge_pages() -> bool:
    """Have PyTorch back CPU tensors of 2 MB or more with transparent huge pages.

    For an entry point (the CLI) to call before anything allocates: PyTorch reads
    the switch once, at its first such allocation, so a later call changes
    nothing, and once torch is imported this leaves it alone. Sets it in
    ``os.environ`` (child processes inherit it) unless the user set it either
    way. Where the kernel's THP mode is ``never`` the advice is ignored and
    nothing changes. True when it was switched on here.
    """
    if not sys.platform.startswith("linux") or THP_ENV in os.environ:
        return False
    if "torch" in sys.modules:
        return False  # it may have allocated already; and children would inherit a switch this process lacks
    os.environ[THP_ENV] = "1"
    return True
