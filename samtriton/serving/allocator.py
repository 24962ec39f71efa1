"""glibc heap settings for processes that make numpy temporaries of a few MB per request.

By default glibc serves an allocation above its (adaptive) mmap threshold with a fresh
mmap and trims freed heap back to the system, so a request whose temporaries are a few
MB pays a page fault per 4 KB on every call: upscaling one 1024x683 mask took 3.3 ms
that way and 1.1 ms with its memory reused (perf/README.md, the cache hit).  Fixing
both thresholds keeps up to `trim_threshold` of freed heap for the next request;
anything larger than `mmap_threshold` still gets its own mapping and goes back when freed.
"""

from __future__ import annotations

import ctypes

# mallopt(3) options, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the adaptive threshold
TRIM_THRESHOLD = 64 << 20


def _glibc():
    """The C library, or None where it is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def mallopt(option: int, value: int) -> bool:
    """glibc's mallopt(3) for this process; False where it failed or the C library is not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(option, value))


def malloc_trim() -> bool:
    """Give freed heap back to the system (glibc's malloc_trim(3)); False where nothing was
    given back or the C library is not glibc."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


def keep_freed_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the thresholds to this process; False where the C library is not glibc."""
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold)
