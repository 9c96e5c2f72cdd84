"""The ring-buffer reader's protocol handling, on a memfd laid out like the kernel's mapping.

No root: the "map" is a memfd with the consumer page, the producer page and the
data area where the kernel would put them (a real map maps the data area twice;
these tests never wrap, so one copy is enough).
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np
import pytest

from ksift.transport import records
from ksift.transport.ringbuf import BUSY_BIT, DISCARD_BIT, RingBufferReader

PAGE = mmap.PAGESIZE
DATA = 16 * PAGE
STRIDE = 1024  # KSIFT_RECORD_SIZE (1016) + the ring header (8)


@pytest.fixture
def ring():
    fd = os.memfd_create("ksift-test-ringbuf")
    os.ftruncate(fd, 2 * PAGE + 2 * DATA)
    mm = mmap.mmap(fd, 2 * PAGE + 2 * DATA)
    reader = RingBufferReader(fd, DATA)
    state = {"prod": 0}

    def put(tgid: int = 0, length: int = records.RECORD_SIZE, flags: int = 0) -> None:
        pos = state["prod"]
        rec = np.zeros(1, dtype=records.RECORD)
        rec["type"] = 1  # any type: the reader does not look at it
        rec["task"]["tgid"] = tgid
        body = rec.tobytes()[:length].ljust(length, b"\0")
        off = 2 * PAGE + pos
        mm[off:off + 8] = struct.pack("<II", length | flags, 0)
        mm[off + 8:off + 8 + length] = body
        state["prod"] = pos + (length + 8 + 7) // 8 * 8
        mm[PAGE:PAGE + 8] = struct.pack("<Q", state["prod"])

    def consumer_pos() -> int:
        return struct.unpack("<Q", mm[0:8])[0]

    yield reader, put, consumer_pos
    reader.close()
    mm.close()
    os.close(fd)


def test_a_batch_of_committed_records_decodes_in_order(ring):
    reader, put, consumer_pos = ring
    for tgid in range(1, 6):
        put(tgid)
    batch = reader.read()
    assert list(batch["task"]["tgid"]) == [1, 2, 3, 4, 5]
    assert consumer_pos() == 5 * STRIDE and reader.records_read == 5
    assert len(reader.read()) == 0  # nothing twice


def test_reading_stops_at_a_busy_record(ring):
    reader, put, consumer_pos = ring
    put(1)
    put(2, flags=BUSY_BIT)  # reserved, not yet committed
    put(3)
    assert list(reader.read()["task"]["tgid"]) == [1]
    assert consumer_pos() == STRIDE  # the busy record and everything after it wait


def test_discarded_and_malformed_records_are_counted_and_skipped(ring):
    reader, put, consumer_pos = ring
    put(1)
    put(2, flags=DISCARD_BIT)
    put(3, length=100)  # not a ksift record size: never crash, count it
    put(4)
    assert list(reader.read()["task"]["tgid"]) == [1, 4]
    assert reader.discarded == 1 and reader.malformed == 1
    assert consumer_pos() == 2 * STRIDE + STRIDE + (100 + 8 + 7) // 8 * 8


def test_max_records_leaves_the_rest_for_later(ring):
    reader, put, _ = ring
    for tgid in range(1, 4):
        put(tgid)
    assert list(reader.read(max_records=2)["task"]["tgid"]) == [1, 2]
    assert list(reader.read()["task"]["tgid"]) == [3]


def test_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RingBufferReader(-1, 3 * PAGE)


@pytest.mark.parametrize("header_at", [DATA - STRIDE // 2, DATA - 8, DATA - STRIDE - 512])
def test_a_record_that_wraps_around_the_end_is_read_whole(header_at):
    """The data area is mapped once (the kernel's second copy would be resident for nothing): a
    record whose body runs past the end continues at the start of the data area, as in the kernel."""
    fd = os.memfd_create("ksift-test-ringbuf-wrap")
    os.ftruncate(fd, 2 * PAGE + DATA)
    mm = mmap.mmap(fd, 2 * PAGE + DATA)
    try:
        lap = 3 * DATA  # positions keep growing: the ring went round three times already
        pos = lap + header_at
        for tgid in (7, 8, 9):
            rec = np.zeros(1, dtype=records.RECORD)
            rec["task"]["tgid"] = tgid
            rec["task"]["comm"] = b"wrapped"
            raw = struct.pack("<II", records.RECORD_SIZE, 0) + rec.tobytes()
            for i, byte in enumerate(raw):  # byte by byte, each where the kernel puts it
                mm[2 * PAGE + (pos + i) % DATA] = byte
            pos += STRIDE
        mm[0:8] = struct.pack("<Q", lap + header_at)
        mm[PAGE:PAGE + 8] = struct.pack("<Q", pos)
        reader = RingBufferReader(fd, DATA)
        batch = reader.read()
        assert list(batch["task"]["tgid"]) == [7, 8, 9] and set(batch["task"]["comm"]) == {b"wrapped"}
        assert struct.unpack("<Q", mm[0:8])[0] == pos and reader.malformed == 0
        reader.close()
    finally:
        mm.close()
        os.close(fd)
