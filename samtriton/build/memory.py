"""Keeping the build's peak resident memory down."""

from __future__ import annotations

import gc

from samtriton.serving.allocator import M_ARENA_MAX, malloc_trim, mallopt


def release_memory() -> None:
    """Give the memory a finished build step freed back to the system: glibc keeps
    freed heap (in every thread's arena) for reuse, so without this one step's
    peak stays resident under the next one's."""
    gc.collect()
    malloc_trim()


def bound_malloc_arenas(count: int = 2) -> bool:
    """At most `count` glibc heaps in this process from now on.  By default each
    thread that allocates (ONNX Runtime's and PyTorch's pools) may get a heap of
    its own, and what one keeps freed the others cannot reuse: sam-vit-b's build
    peaked 0.4-0.6 GB higher in 2 runs of 6 that way (perf/README.md).  False
    where the C library is not glibc."""
    return mallopt(M_ARENA_MAX, count)
