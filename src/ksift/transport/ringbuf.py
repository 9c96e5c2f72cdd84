"""BPF ring buffer consumer through mmap, decoding batches with numpy.

Why not libbpf's ring_buffer__poll: a ctypes callback per record costs about
1.2 us and the poll does not return while the producer keeps up (DESIGN.md).

Layout of the mapping (kernel/bpf/ringbuf.c):
  page 0            consumer_pos (u64), mapped read-write
  page 1            producer_pos (u64), read-only
  page 2..          data area. The kernel offers it twice back to back, so that a
                    record that wraps around the end is contiguous; we map it once
                    (the kernel maps every page of a ring-buffer mapping at mmap time,
                    so the second copy would be 1 MiB more resident, for nothing) and
                    copy the rare record that wraps in two parts.
Each record: 8-byte header {u32 len | BUSY bit 31 | DISCARD bit 30, u32 pgoff},
then the payload; the next record starts at round_up(len + 8, 8).

Memory ordering: we rely on x86-64's TSO. Loads are not reordered with other
loads, so once we read producer_pos the headers before it are visible, and the
per-record BUSY bit tells us which are committed. Our store to consumer_pos is
not reordered before the loads that copied the records out.
"""

from __future__ import annotations

import mmap
import platform

import numpy as np

from ksift.transport.records import RECORD, RECORD_SIZE, RINGBUF_HDR_SIZE

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
_STRIDE = (RECORD_SIZE + RINGBUF_HDR_SIZE + 7) // 8 * 8

# A record as it sits in the ring: kernel header, then our fixed-size record.
_SLOT = np.dtype({"names": ["len", "rec"], "formats": ["<u4", RECORD], "offsets": [0, RINGBUF_HDR_SIZE],
                  "itemsize": _STRIDE})


class RingBufferReader:
    """Reads committed ksift records from one BPF_MAP_TYPE_RINGBUF map fd."""

    def __init__(self, map_fd: int, data_size: int, page_size: int = mmap.PAGESIZE):
        if platform.machine() not in ("x86_64", "AMD64"):
            # The lock-free protocol below leans on x86-64 ordering (see module doc).
            raise RuntimeError(f"ring buffer reader supports x86-64 only, not {platform.machine()}")
        if data_size & (data_size - 1) or data_size < page_size:
            raise ValueError(f"ring buffer size {data_size} is not a power of two >= {page_size}")
        self.fd = map_fd
        self.data_size = data_size
        self._mask = data_size - 1
        self._page = page_size
        self._cons_mm = mmap.mmap(map_fd, page_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_mm = mmap.mmap(map_fd, page_size + data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                                  offset=page_size)
        self._cons = memoryview(self._cons_mm).cast("Q")
        self._prod = memoryview(self._prod_mm)[:8].cast("Q")
        self.records_read = 0
        self.bytes_read = 0
        self.discarded = 0
        self.malformed = 0

    def close(self) -> None:
        for view in (self._cons, self._prod):
            view.release()
        self._cons_mm.close()
        self._prod_mm.close()

    def unread_bytes(self) -> int:
        return int(self._prod[0] - self._cons[0])

    def read(self, max_records: int | None = None) -> np.ndarray:
        """Copy out every committed record (up to max_records) and release the space."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        runs: list[np.ndarray] = []  # views of the ring (or of a wrapped record's two parts), copied out below
        taken = 0
        while cons < prod and (max_records is None or taken < max_records):
            off = cons & self._mask
            # Fast path: a run of fixed-size committed records decodes in one view, up to the
            # end of the data area (a record that wraps goes through the slow path).
            n = min(prod - cons, self.data_size - off) // _STRIDE
            if max_records is not None:
                n = min(n, max_records - taken)
            if n:
                slots = np.frombuffer(self._prod_mm, dtype=_SLOT, count=n, offset=self._page + off)
                bad = np.flatnonzero(slots["len"] != RECORD_SIZE)
                good = int(bad[0]) if len(bad) else n
                if good:
                    runs.append(slots["rec"][:good])
                    taken += good
                    cons += good * _STRIDE
                    continue
            # Slow path: one header at a time (busy, discarded or odd-sized record).
            hdr = int.from_bytes(self._prod_mm[self._page + off:self._page + off + 4], "little")
            if hdr & BUSY_BIT:
                break  # not committed yet: everything after it waits too
            length = hdr & ~(BUSY_BIT | DISCARD_BIT)
            stride = (length + RINGBUF_HDR_SIZE + 7) // 8 * 8
            if cons + stride > prod:
                # The kernel commits whole records, so only a corrupt header claims more than the
                # producer holds. Never step past it: with consumer_pos ahead of producer_pos the
                # kernel would see a full ring and refuse every record from then on.
                self.malformed += 1
                cons = prod
                break
            if hdr & DISCARD_BIT:
                self.discarded += 1
            elif length != RECORD_SIZE:
                self.malformed += 1  # never crash on one bad record: count and skip it
            else:  # a whole record that wraps around the end of the data area: its two parts
                start = self._page + off + RINGBUF_HDR_SIZE
                first = min(RECORD_SIZE, self.data_size - off - RINGBUF_HDR_SIZE)
                body = self._prod_mm[start:start + first] + self._prod_mm[self._page:self._page + RECORD_SIZE - first]
                runs.append(np.frombuffer(body, dtype=RECORD))
                taken += 1
            cons += stride
        # Copied out before consumer_pos moves (the kernel may reuse the space at once): into one
        # array, never through np.concatenate, which is slow on a nested structured dtype.
        out = np.empty(taken, dtype=RECORD)
        at = 0
        for run in runs:
            out[at:at + len(run)] = run
            at += len(run)
        if cons != int(self._cons[0]):
            self.bytes_read += cons - int(self._cons[0])
            self._cons[0] = cons  # one 8-byte store: the kernel never sees a torn value
        self.records_read += taken
        return out
