"""Image embeddings handed from `image_embedding` to the mask decoder through shared memory.

A 4 MiB embedding sent as a tensor goes from one python stub's shared memory
through Triton into the next stub's: about 2 ms of a cache hit's 6-9 ms beyond
the decoder's compute in the twelfth stop's trace (perf/README).  Instead `image_embedding` keeps its embeddings in the slots of
one file in /dev/shm, the arena, and answers the `sam` ensemble with a handle
(the arena's epoch, the slot, the slot's sequence number); the decoder maps
the same file and reads the slot in place.

There is one writer (the `image_embedding` instance that owns the arena) and
any number of readers (decoder instances).  A slot is a seqlock: the writer
makes its sequence number odd, writes, then makes it even again, one more than
before.  A reader checks the number against its handle before it reads and
again after the decoder has run, so a slot overwritten in between is noticed
and the request fails UNAVAILABLE (`EmbeddingGone`); it is never answered
with another image's masks.

That must stay rare, so the writer reuses a released slot (evicted by the
cache, or at once with the cache off) only once every handle it gave out for
the slot has been read: it counts its handles per slot, and each decoder
process counts the slots it has finished reading in a small file of its own
beside the arena.  Among the released slots the one released longest ago
goes first; a handle never read (its request failed or was cancelled between
the two steps) stops counting after `expiry_s`.  Only when every released slot
still has handles out does the writer reuse one anyway (`forced_reuses`),
and those readers fail UNAVAILABLE.  A read counts only if the slot was
unchanged at its end: the handles of an overwritten embedding are written off
when it is overwritten, and their reads, which fail, are not counted again.

The file is named after the Triton server's pid, its owner's (the stub's) pid
and the epoch; an arena whose server or owner is gone (killed before it could
clean up; Triton restarts a dead stub, which makes a new arena) is removed by
the next arena created on the host.
"""

from __future__ import annotations

import glob
import mmap
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from samtriton import spec
from samtriton.serving.errors import EmbeddingGone, InvalidInput

DIRECTORY = "/dev/shm"
PREFIX = "samtriton-embeddings"
_MAGIC = 0x53414D5452544E31  # "SAMTRTN1"
_PAGE = mmap.PAGESIZE
EMBEDDING_BYTES = int(np.prod(spec.EMBEDDING_SHAPE)) * 4
_SLOT_BYTES = -(-EMBEDDING_BYTES // _PAGE) * _PAGE
# Header words: magic, epoch, slots, slot bytes, then one sequence number per slot.
_HEADER_WORDS = 4
# A handle not read within this long (its request died between the steps) no longer holds its slot.
HANDLE_EXPIRY_S = 120.0
_READS = ".reads-"  # a decoder process's file of slots read: <arena>.reads-<pid>


def _header_bytes(slots: int) -> int:
    return -(-(_HEADER_WORDS + slots) * 8 // _PAGE) * _PAGE


def _name(server_pid: int, owner_pid: int, epoch: int) -> str:
    return f"{PREFIX}-{server_pid}-{owner_pid}-{epoch:016x}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_arenas(directory: str = DIRECTORY) -> list[str]:
    """Arenas whose server or owner process is gone; removed, and their paths returned."""
    removed = []
    for path in glob.glob(os.path.join(directory, f"{PREFIX}-*-*-*")):
        try:
            pids = [int(p) for p in os.path.basename(path)[len(PREFIX) + 1:].split("-")[:2]]
        except ValueError:
            continue
        if not all(_alive(pid) for pid in pids):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


@dataclass(frozen=True)
class Stored:
    """An embedding in slot `slot`, as written under sequence number `seq`."""

    slot: int
    seq: int
    nbytes: int = EMBEDDING_BYTES


def _map_readonly(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


class _Layout:
    def __init__(self, buffer: mmap.mmap, slots: int):
        header = _header_bytes(slots)
        # The arrays keep `buffer` mapped for as long as any of them lives.
        self.words = np.frombuffer(buffer, np.int64, _HEADER_WORDS + slots)
        self.seq = self.words[_HEADER_WORDS:]
        data = np.frombuffer(buffer, np.uint8, slots * _SLOT_BYTES, offset=header).reshape(slots, _SLOT_BYTES)
        self.data = data[:, :EMBEDDING_BYTES].view(np.float32).reshape(slots, 1, *spec.EMBEDDING_SHAPE)


class EmbeddingArena:
    """The writer: `slots` embeddings in one /dev/shm file owned by this process."""

    def __init__(self, slots: int, server_pid: int | None = None, directory: str = DIRECTORY,
                 expiry_s: float = HANDLE_EXPIRY_S):
        if slots < 1:
            raise ValueError(f"an arena needs at least one slot, got {slots}")
        remove_stale_arenas(directory)
        self.slots = slots
        self.server_pid = os.getppid() if server_pid is None else server_pid
        self.epoch = secrets.randbits(63) or 1
        self.path = os.path.join(directory, _name(self.server_pid, os.getpid(), self.epoch))
        header = _header_bytes(slots)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Sparse: a slot's pages are reserved when it is first written (`store`), so
            # that a full /dev/shm is an error there and not a SIGBUS inside a write.
            os.ftruncate(fd, header + slots * _SLOT_BYTES)
            os.posix_fallocate(fd, 0, header)
            self._fd = fd
            buffer = mmap.mmap(fd, header + slots * _SLOT_BYTES)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._layout = _Layout(buffer, slots)
        self._layout.words[:_HEADER_WORDS] = (_MAGIC, self.epoch, slots, _SLOT_BYTES)
        self._reserved = [False] * slots
        self._free = deque(range(slots))  # released longest ago first
        self._lock = threading.Lock()
        self.expiry_s = expiry_s
        self._handed = np.zeros(slots, np.int64)  # handles given out, per slot, ever
        self._written_off = np.zeros(slots, np.int64)  # of those, never read and expired
        self._last_handed = np.zeros(slots)
        self._reads: dict[str, np.ndarray] = {}  # the decoders' files of slots read
        self.forced_reuses = 0

    def _slots_read(self) -> np.ndarray:
        for path in glob.glob(f"{glob.escape(self.path)}{_READS}*"):
            if path not in self._reads:
                try:
                    self._reads[path] = np.frombuffer(_map_readonly(path), np.int64, self.slots)
                except (OSError, ValueError):  # being created: counted next time
                    continue
        total = np.zeros(self.slots, np.int64)
        for counts in self._reads.values():
            total += counts
        return total

    def _reusable(self, slot: int, read: np.ndarray, now: float) -> bool:
        out = self._out(slot, read)
        if out <= 0:
            return True
        if now - self._last_handed[slot] > self.expiry_s:
            self._written_off[slot] += out
            return True
        return False

    def _out(self, slot: int, read: np.ndarray) -> int:
        """Handles out for `slot`'s embedding: given out, not read, not written off.  A
        handle counts as read only when its reader found the slot unchanged at the end,
        so the handles of an embedding that was overwritten are written off when it is."""
        out = int(self._handed[slot] - self._written_off[slot] - read[slot])
        if out < 0:  # a read finished just as its handle was written off: count it once
            self._written_off[slot] = max(0, int(self._written_off[slot]) + out)
            out = 0
        return out

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.slots} embedding slots are taken")
        read, now = self._slots_read(), time.monotonic()
        for i, slot in enumerate(self._free):
            if self._reusable(slot, read, now):
                del self._free[i]
                return slot
        self.forced_reuses += 1
        slot = self._free.popleft()
        self._written_off[slot] += self._out(slot, read)  # their readers will fail, uncounted
        return slot

    def store(self, embedding: np.ndarray) -> Stored:
        """Write `embedding` (1, 256, 64, 64) into a released slot whose handles
        have all been read, the one released longest ago.  The slot stays taken
        until `release`."""
        with self._lock:
            slot = self._take()
        try:
            if not self._reserved[slot]:
                os.posix_fallocate(self._fd, _header_bytes(self.slots) + slot * _SLOT_BYTES, _SLOT_BYTES)
                self._reserved[slot] = True
            seq = self._layout.seq
            seq[slot] += 1  # odd: being written
            np.copyto(self._layout.data[slot], embedding.reshape(1, *spec.EMBEDDING_SHAPE), casting="no")
            seq[slot] += 1
            return Stored(slot, int(seq[slot]))
        except BaseException:
            with self._lock:
                self._free.appendleft(slot)
            raise

    def release(self, stored: Stored) -> None:
        with self._lock:
            self._free.append(stored.slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def handle(self, stored: Stored) -> np.ndarray:
        """The handle (INT64 [1, 3]) a decoder reads `stored` by; counted until a decoder has read it."""
        with self._lock:
            if int(self._layout.seq[stored.slot]) == stored.seq:  # else it fails unread: not counted
                self._handed[stored.slot] += 1
                self._last_handed[stored.slot] = time.monotonic()
        return np.array([[self.epoch, stored.slot, stored.seq]], np.int64)

    def copy(self, stored: Stored) -> np.ndarray | None:
        """A copy of the embedding, or None if its slot was overwritten meanwhile."""
        out = self._layout.data[stored.slot].copy()
        return out if int(self._layout.seq[stored.slot]) == stored.seq else None

    def close(self) -> None:
        for path in [self.path, *glob.glob(f"{glob.escape(self.path)}{_READS}*")]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        # The mapping goes with the last array that views it.


@dataclass
class Reading:
    """A slot being read in place: `embedding` is valid only if `finish()` says so
    after its last use; `finish()` also tells the writer the slot was read."""

    embedding: np.ndarray  # (1, 256, 64, 64), read-only, in the arena
    _seq: np.ndarray
    _reads: np.ndarray
    slot: int
    expected: int
    _finished: bool = False

    def still_valid(self) -> bool:
        return int(self._seq[self.slot]) == self.expected

    def finish(self) -> bool:
        """Whether the slot still held this handle's embedding; call it when done with it,
        whatever happened.  A valid read is counted (once) as read for the writer; one the
        writer overwrote was written off when it did."""
        valid = self.still_valid()
        if valid and not self._finished:
            self._reads[self.slot] += 1
        self._finished = True
        return valid


class ArenaReader:
    """The decoder's side: maps the arenas its handles name (the newest one only:
    an older arena belongs to an `image_embedding` that was reloaded)."""

    def __init__(self, directory: str = DIRECTORY):
        self.directory = directory
        self._epoch: int | None = None
        self._layout: _Layout | None = None
        self._reads: np.ndarray | None = None

    def _open(self, epoch: int) -> _Layout:
        if epoch == self._epoch:
            return self._layout
        paths = glob.glob(os.path.join(self.directory, f"{PREFIX}-*-*-{epoch:016x}"))
        if not paths:
            raise EmbeddingGone("the embedding's arena is gone (image_embedding was reloaded); retry")
        buffer = _map_readonly(paths[0])
        words = np.frombuffer(buffer, np.int64, _HEADER_WORDS)
        if int(words[0]) != _MAGIC or int(words[1]) != epoch or int(words[3]) != _SLOT_BYTES:
            raise InvalidInput(spec.EMBEDDING_HANDLE.name, f"{paths[0]} is not an embedding arena of this version")
        slots = int(words[2])
        reads_path = f"{paths[0]}{_READS}{os.getpid()}"
        fd = os.open(reads_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, slots * 8)
            reads = mmap.mmap(fd, slots * 8)
        finally:
            os.close(fd)
        self._epoch, self._layout = epoch, _Layout(buffer, slots)
        self._reads = np.frombuffer(reads, np.int64, slots)
        return self._layout

    def read(self, handle: np.ndarray) -> Reading:
        """The slot `handle` (INT64 [epoch, slot, seq]) names, to be read in place."""
        flat = np.asarray(handle).reshape(-1)
        if flat.size != 3 or flat.dtype != np.int64:
            raise InvalidInput(spec.EMBEDDING_HANDLE.name,
                               f"expected INT64 [3] (epoch, slot, sequence), got {flat.dtype} {list(flat.shape)}")
        epoch, slot, seq = (int(v) for v in flat)
        if epoch <= 0 or seq <= 0 or seq % 2:
            raise InvalidInput(spec.EMBEDDING_HANDLE.name, "not a handle image_embedding issued")
        layout = self._open(epoch)
        if not 0 <= slot < layout.seq.size:
            raise InvalidInput(spec.EMBEDDING_HANDLE.name, f"slot {slot} is outside the arena's {layout.seq.size}")
        reading = Reading(layout.data[slot], layout.seq, self._reads, slot, seq)
        if not reading.still_valid():
            raise EmbeddingGone("the image's embedding was evicted before the decoder read it; retry")
        return reading
