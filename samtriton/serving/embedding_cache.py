"""The image-embedding cache: embeddings keyed by the image's encoded bytes, LRU, bounded in bytes.

A cache hit must cost the decoder and little else, so the key is a digest of
the encoded image (what the client sends) plus what else decides the
embedding — the model variant and its preprocessing settings — not of the
12 MB encoder input, which takes a decode, a resize and a normalisation to
produce.

Concurrent requests for the same new image compute it once: the first
starts the computation, the others wait for its result (or its error).  The
computations live in one asyncio event loop (the `image_embedding` python
model's); `hit` is also called from the model's `execute()` thread, which
answers hits itself, so the entries and counters are guarded by a lock.

The values are anything with `nbytes`: arrays, or the `Stored` slots of an
`embedding_arena.EmbeddingArena`, which `on_drop` hands back to the arena
once the cache lets go of them (evicted, or never admitted).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def image_key(image_bytes: bytes, context: str) -> bytes:
    """sha256 of the encoded image, salted with `context` (variant and preprocessing settings)."""
    h = hashlib.sha256(context.encode())
    h.update(b"\0")
    h.update(image_bytes)
    return h.digest()


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    # Waited for another request's computation of the same image.
    shared: int = 0
    evictions: int = 0


class EmbeddingCache:
    """LRU of key -> embedding, at most `capacity_bytes` of values (0: no caching,
    though concurrent requests for one image still share its computation)."""

    def __init__(self, capacity_bytes: int, on_event: Callable[[str, int], None] | None = None,
                 on_drop: Callable[[Any], None] | None = None):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.counters = CacheCounters()
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[bytes, asyncio.Future] = {}
        # on_event(name, count): "hit", "miss", "shared", "eviction"; metrics hook.
        self._on_event = on_event or (lambda name, count: None)
        # on_drop(value): a value the cache no longer holds (evicted, replaced or not admitted).
        self._on_drop = on_drop or (lambda value: None)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    _FIELDS = {"hit": "hits", "miss": "misses", "shared": "shared", "eviction": "evictions"}

    def _count(self, event: str, count: int = 1) -> None:
        field = self._FIELDS[event]
        with self._lock:
            setattr(self.counters, field, getattr(self.counters, field) + count)
        self._on_event(event, count)

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        return value

    def hit(self, key: bytes) -> Any | None:
        """`get`, counted as a hit when it finds the embedding (a miss is counted where it is computed)."""
        value = self.get(key)
        if value is not None:
            self._count("hit")
        return value

    def put(self, key: bytes, value: Any) -> None:
        if value.nbytes > self.capacity_bytes:
            self._on_drop(value)
            return
        dropped = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
                if old is not value:
                    dropped.append(old)
            self._entries[key] = value
            self._bytes += value.nbytes
            evicted = 0
            while self._bytes > self.capacity_bytes:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= victim.nbytes
                dropped.append(victim)
                evicted += 1
        for victim in dropped:
            self._on_drop(victim)
        if evicted:
            self._count("eviction", evicted)

    async def get_or_compute(self, key: bytes, compute: Callable[[], Awaitable[Any]]) -> Any:
        """The cached embedding of `key`, or `compute()`'s, computed once however
        many requests ask for it meanwhile.  Call it on the cache's event loop."""
        value = self.hit(key)
        if value is not None:
            return value
        pending = self._pending.get(key)
        if pending is not None:
            self._count("shared")
            # shield: a waiter that is cancelled must not cancel the computation others wait for.
            return await asyncio.shield(pending)
        self._count("miss")
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await compute()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        else:
            if isinstance(value, np.ndarray):  # read-only: every request gets the same array
                value.setflags(write=False)
            self.put(key, value)
            future.set_result(value)
            return value
        finally:
            del self._pending[key]
