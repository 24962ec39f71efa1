"""The embedding cache (LRU by bytes, one computation per new image however many
ask, errors not cached) and the header-only image size the served preprocess uses."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from samtriton.serving.embedding_cache import EmbeddingCache, image_key
from samtriton.serving.errors import InvalidInput
from samtriton.serving.preprocessing import decode_image, image_size
from tests.test_ensemble_fidelity import IMAGES

EMBEDDING_BYTES = 256 * 64 * 64 * 4


def _embedding(value: float) -> np.ndarray:
    return np.full((1, 256, 64, 64), value, np.float32)


def test_key_depends_on_bytes_and_context():
    a, b = b"image-a", b"image-b"
    assert image_key(a, "mobilesam|1024") == image_key(a, "mobilesam|1024")
    assert len({image_key(a, "mobilesam|1024"), image_key(b, "mobilesam|1024"), image_key(a, "vit-b|1024"),
                image_key(a, "mobilesam|512")}) == 4


def test_hits_from_another_thread_while_the_loop_computes_and_evicts():
    """The image_embedding model answers hits on its execute() thread while its event loop
    computes and evicts: every hit must be the right embedding, and every lookup counted."""
    small = 64  # bytes an entry: many evictions quickly
    cache = EmbeddingCache(4 * small)
    keys = [bytes([k]) for k in range(8)]
    done, wrong, errors, found = threading.Event(), [], [], [0]

    def hits():
        try:
            while not done.is_set():
                for k in keys:
                    value = cache.hit(k)
                    if value is not None:
                        found[0] += 1
                        if value[0] != k[0]:
                            wrong.append((k, value[0]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    async def churn():
        async def compute(k):
            return np.full(small // 4, k[0], np.float32)

        for i in range(60000):
            k = keys[i % len(keys)]
            await cache.get_or_compute(k, lambda k=k: compute(k))

    thread = threading.Thread(target=hits)
    thread.start()
    try:
        asyncio.run(churn())
    finally:
        done.set()
        thread.join(timeout=30)
    assert not errors and not wrong, (errors[:3], wrong[:3])
    c = cache.counters
    assert found[0] > 0 and c.hits + c.misses == 60000 + found[0]  # no count lost between the threads
    assert len(cache) == 4 and c.evictions == c.misses - 4


def test_lru_eviction_by_bytes_and_counters():
    events = []
    cache = EmbeddingCache(2 * EMBEDDING_BYTES, on_event=lambda name, n: events.append((name, n)))

    async def run():
        computed = []

        async def compute(v):
            computed.append(v)
            return _embedding(v)

        for v in (1, 2):
            await cache.get_or_compute(bytes([v]), lambda v=v: compute(v))
        assert (await cache.get_or_compute(b"\x01", lambda: compute(99)))[0, 0, 0, 0] == 1  # hit; 1 is now newest
        await cache.get_or_compute(b"\x03", lambda: compute(3))  # evicts 2, the least recently used
        assert cache.get(b"\x02") is None and cache.get(b"\x01") is not None and cache.get(b"\x03") is not None
        return computed

    assert asyncio.run(run()) == [1, 2, 3]
    assert len(cache) == 2 and cache.size_bytes == 2 * EMBEDDING_BYTES
    c = cache.counters
    assert (c.hits, c.misses, c.shared, c.evictions) == (1, 3, 0, 1)
    assert events == [("miss", 1), ("miss", 1), ("hit", 1), ("miss", 1), ("eviction", 1)]
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_concurrent_requests_for_one_image_compute_it_once():
    cache = EmbeddingCache(4 * EMBEDDING_BYTES)
    calls = []

    async def compute():
        calls.append(1)
        await asyncio.sleep(0.05)
        return _embedding(7)

    async def run():
        return await asyncio.gather(*(cache.get_or_compute(b"same", compute) for _ in range(5)))

    results = asyncio.run(run())
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and not results[0].flags.writeable
    assert (cache.counters.misses, cache.counters.shared, cache.counters.hits) == (1, 4, 0)


def test_a_failed_computation_fails_its_waiters_and_is_not_cached():
    cache = EmbeddingCache(4 * EMBEDDING_BYTES)
    attempts = []

    async def failing():
        attempts.append(1)
        await asyncio.sleep(0.02)
        raise InvalidInput("image", "cannot be decoded")

    async def run():
        return await asyncio.gather(*(cache.get_or_compute(b"bad", failing) for _ in range(3)),
                                    return_exceptions=True)

    outcomes = asyncio.run(run())
    assert len(attempts) == 1 and all(isinstance(o, InvalidInput) for o in outcomes)
    assert cache.get(b"bad") is None and len(cache) == 0

    async def retry():
        async def ok():
            return _embedding(1)
        return await cache.get_or_compute(b"bad", ok)

    assert asyncio.run(retry()) is not None  # the next request computes again


def test_a_cancelled_waiter_does_not_cancel_the_computation():
    cache = EmbeddingCache(4 * EMBEDDING_BYTES)

    async def compute():
        await asyncio.sleep(0.05)
        return _embedding(3)

    async def run():
        first = asyncio.ensure_future(cache.get_or_compute(b"k", compute))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(cache.get_or_compute(b"k", compute))
        await asyncio.sleep(0.01)
        waiter.cancel()
        return await first

    assert asyncio.run(run())[0, 0, 0, 0] == 3 and cache.get(b"k") is not None


def test_capacity_zero_caches_nothing():
    cache = EmbeddingCache(0)

    async def run():
        async def compute():
            return _embedding(1)
        await cache.get_or_compute(b"a", compute)
        await cache.get_or_compute(b"a", compute)

    asyncio.run(run())
    assert len(cache) == 0 and cache.counters.misses == 2 and cache.counters.evictions == 0


def _png_with_late_exif(orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after the image data (allowed by the PNG spec):
    Pillow finds it only once the pixels are decoded."""
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def _png_with_text_profile_exif(orientation: int) -> bytes:
    """A PNG carrying its EXIF as ImageMagick's hex text profile, which Pillow also reads."""
    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\0\0") else exif.tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(payload):8}\n{payload.hex()}\n", zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 30)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


EXTRA_PNGS = {"png-late-exif-6": lambda: _png_with_late_exif(6), "png-late-exif-1": lambda: _png_with_late_exif(1),
              "png-text-profile-exif-6": lambda: _png_with_text_profile_exif(6)}


@pytest.mark.parametrize("name", list(IMAGES) + list(EXTRA_PNGS))
def test_header_size_is_the_decoded_size(name):
    """The served preprocess takes the size from the header (no pixels decoded);
    it must be the size of what the image embedding decodes, EXIF orientation included."""
    data = IMAGES[name] if name in IMAGES else EXTRA_PNGS[name]()
    assert image_size(data) == decode_image(data).shape[:2]
    if name.endswith("-6"):
        assert image_size(data) == (40, 20)  # turned by its orientation


def test_header_size_refuses_what_decoding_refuses():
    for data, message in ((b"", "empty"), (b"GIF89a" + b"\0" * 20, "not a decodable image"),
                          (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "not a decodable image")):
        with pytest.raises(InvalidInput, match=message):
            image_size(data)
