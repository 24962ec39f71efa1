"""The embedding arena: image_embedding's slots in /dev/shm, read in place by the decoder."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from samtriton import spec
from samtriton.serving import embedding_arena
from samtriton.serving.embedding_arena import ArenaReader, EmbeddingArena, remove_stale_arenas
from samtriton.serving.embedding_cache import EmbeddingCache
from samtriton.serving.errors import EmbeddingGone, InvalidInput


def _embedding(value: float) -> np.ndarray:
    return np.full((1, *spec.EMBEDDING_SHAPE), value, np.float32)


@pytest.fixture
def make_arena(tmp_path):
    """EmbeddingArena(slots, **options) in tmp_path, closed at the test's end unless it was already."""
    made = []

    def make(slots: int, **options) -> EmbeddingArena:
        made.append(EmbeddingArena(slots, directory=str(tmp_path), **options))
        return made[-1]

    yield make
    for a in made:
        if os.path.exists(a.path):
            a.close()


@pytest.fixture
def arena(make_arena):
    return make_arena(3)


@pytest.fixture
def reader(tmp_path):
    return ArenaReader(str(tmp_path))


def test_a_handle_reads_the_embedding_in_place_from_another_mapping(arena, reader):
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((1, *spec.EMBEDDING_SHAPE)).astype(np.float32)
    stored = arena.store(embedding)
    handle = arena.handle(stored)
    assert handle.shape == (1, 3) and handle.dtype == np.int64
    reading = reader.read(handle[0])
    np.testing.assert_array_equal(reading.embedding, embedding)
    assert not reading.embedding.flags.writeable
    assert reading.finish()
    np.testing.assert_array_equal(arena.copy(stored), embedding)
    assert os.path.exists(f"{arena.path}.reads-{os.getpid()}")  # the reader's count of slots read


def test_a_slot_whose_handles_are_out_is_passed_over_until_they_are_read(make_arena, reader):
    arena = make_arena(2)
    first, second = arena.store(_embedding(1.0)), arena.store(_embedding(2.0))
    handle = arena.handle(first)  # on its way to the decoder
    arena.release(first)  # evicted: released longest ago ...
    arena.release(second)
    third = arena.store(_embedding(3.0))  # ... but its handle is out: the other slot goes
    assert third.slot == second.slot and arena.forced_reuses == 0
    reading = reader.read(handle[0])
    np.testing.assert_array_equal(reading.embedding, _embedding(1.0))
    assert reading.finish()  # read: the decoder gives it back
    arena.release(third)
    assert arena.store(_embedding(4.0)).slot == first.slot and arena.forced_reuses == 0


def test_a_handle_never_read_stops_holding_its_slot_after_the_expiry(make_arena, reader):
    arena = make_arena(1, expiry_s=0.05)
    first = arena.store(_embedding(1.0))
    lost = arena.handle(first)  # its request dies between the two steps
    arena.release(first)
    time.sleep(0.1)
    second = arena.store(_embedding(2.0))
    assert second.slot == first.slot and arena.forced_reuses == 0  # written off, not forced
    with pytest.raises(EmbeddingGone):
        reader.read(lost[0])


def test_a_handle_read_after_its_write_off_does_not_free_the_next_one(make_arena, reader):
    arena = make_arena(1, expiry_s=0.05)
    first = arena.store(_embedding(1.0))
    slow = reader.read(arena.handle(first)[0])  # a decoder call longer than the expiry
    arena.release(first)
    time.sleep(0.1)
    second = arena.store(_embedding(2.0))  # writes the handle off and reuses the slot
    assert not slow.finish()  # fails, and its read is counted after the write-off
    out = arena.handle(second)
    arena.release(second)
    arena.store(_embedding(3.0))
    assert arena.forced_reuses == 1  # `out` still held the slot: reused only by force
    with pytest.raises(EmbeddingGone):
        reader.read(out[0])


def test_a_reused_slot_is_never_read_as_the_old_image(make_arena, reader):
    arena = make_arena(1)
    first = arena.store(_embedding(1.0))
    reading = reader.read(arena.handle(first)[0])  # being read ...
    arena.release(first)
    second = arena.store(_embedding(2.0))  # ... when its slot is reused, the only one there is
    assert second.slot == first.slot and second.seq > first.seq and arena.forced_reuses == 1
    assert not reading.finish()  # the decoder fails that request
    with pytest.raises(EmbeddingGone, match="evicted"):
        reader.read(arena.handle(first)[0])  # a handle not yet read fails at once
    assert arena.copy(first) is None
    reading = reader.read(arena.handle(second)[0])
    np.testing.assert_array_equal(reading.embedding, _embedding(2.0))
    assert reading.finish()
    arena.release(second)
    arena.store(_embedding(3.0))  # the first image's handles were written off with it
    assert arena.forced_reuses == 1


def test_the_slot_released_longest_ago_is_reused_first(arena):
    stored = [arena.store(_embedding(i)) for i in range(3)]
    with pytest.raises(RuntimeError, match="all 3 embedding slots are taken"):
        arena.store(_embedding(9))
    for s in (stored[1], stored[0], stored[2]):
        arena.release(s)
    assert [arena.store(_embedding(9)).slot for _ in range(3)] == [stored[1].slot, stored[0].slot, stored[2].slot]


def test_the_cache_gives_back_the_slots_it_evicts_or_does_not_admit(arena):
    slot_bytes = embedding_arena.EMBEDDING_BYTES
    cache = EmbeddingCache(slot_bytes, on_drop=arena.release)  # holds one embedding
    a, b = arena.store(_embedding(1)), arena.store(_embedding(2))
    cache.put(b"a", a)
    assert arena.free_slots == 1
    cache.put(b"b", b)  # evicts a: its slot is free again
    assert cache.get(b"a") is None and cache.get(b"b") == b and arena.free_slots == 2
    cache.put(b"b", b)  # the same entry again: nothing given back twice
    assert arena.free_slots == 2
    off = EmbeddingCache(0, on_drop=arena.release)
    c = arena.store(_embedding(3))
    off.put(b"c", c)  # not admitted: back at once, behind the slots released before it
    assert arena.free_slots == 2 and off.get(b"c") is None


def test_bad_handles_fail_naming_the_input(arena, reader):
    stored = arena.store(_embedding(1))
    epoch = arena.epoch
    for handle, problem in (
        (np.array([epoch, stored.slot], np.int64), "expected INT64 \\[3\\]"),
        (np.array([epoch, stored.slot, stored.seq], np.int32), "expected INT64 \\[3\\]"),
        (np.array([epoch, 7, stored.seq], np.int64), "outside the arena"),
        (np.array([epoch, stored.slot, stored.seq + 1], np.int64), "not a handle"),
        (np.array([-5, stored.slot, stored.seq], np.int64), "not a handle"),
    ):
        with pytest.raises(InvalidInput, match=problem) as info:
            reader.read(handle)
        assert info.value.field == spec.EMBEDDING_HANDLE.name
    with pytest.raises(EmbeddingGone, match="arena is gone"):
        reader.read(np.array([epoch ^ 1, stored.slot, stored.seq], np.int64))


def test_a_reader_moves_to_a_new_arena_and_the_old_file_goes_with_its_writer(make_arena, reader, tmp_path):
    old = make_arena(1)
    old_handle = old.handle(old.store(_embedding(1)))[0]
    reader.read(old_handle)
    old.close()  # image_embedding reloaded: a new arena, a new epoch
    assert not list(tmp_path.iterdir())  # the arena and the reader's count of slots read
    new = make_arena(1)
    np.testing.assert_array_equal(reader.read(new.handle(new.store(_embedding(2)))[0]).embedding, _embedding(2))
    with pytest.raises(EmbeddingGone):
        reader.read(old_handle)


def test_arenas_of_dead_servers_or_stubs_are_removed_and_live_ones_kept(make_arena, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getpid()
    dead_server = tmp_path / f"{embedding_arena.PREFIX}-{dead_pid}-{live_pid}-00000000000000ab"
    dead_stub = tmp_path / f"{embedding_arena.PREFIX}-{live_pid}-{dead_pid}-00000000000000cd"
    for path in (dead_server, dead_stub):
        path.write_bytes(b"x")
    live = make_arena(1, server_pid=live_pid)
    assert not dead_server.exists() and not dead_stub.exists()
    assert remove_stale_arenas(str(tmp_path)) == []
    assert os.path.exists(live.path)


def test_slots_are_reserved_when_first_written(arena):
    # A sparse file: a full /dev/shm fails a store with an error, not a SIGBUS.
    assert os.stat(arena.path).st_blocks * 512 < embedding_arena.EMBEDDING_BYTES
    arena.store(_embedding(1))
    assert os.stat(arena.path).st_blocks * 512 >= embedding_arena.EMBEDDING_BYTES
