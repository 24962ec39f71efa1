"""Keeping the build's peak resident memory down."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Give the memory a finished build step freed back to the system: glibc keeps
    freed heap (in every thread's arena) for reuse, so without this one step's
    peak stays resident under the next one's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
