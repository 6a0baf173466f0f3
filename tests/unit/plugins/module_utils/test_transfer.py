import io
import threading
import time

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import ZERO_DIGEST, block_digest
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffReader, DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import (
    IN_FLIGHT_BYTES, DiffStreamSink, RateLimit, align_to_blocks, chunk_for, copy_extents, resize_edge)

K = 1024
B = 64 * K


class MemSource:
    def __init__(self, data):
        self.data = bytes(data)
        self.size = len(data)
        self.reads = []
        self.lock = threading.Lock()

    def read(self, offset, length):
        with self.lock:
            self.reads.append((offset, length))
        return self.data[offset:offset + length]


class MemSink:
    ordered = False

    def __init__(self, base):
        self.buf = bytearray(base)
        self.zeroed = []
        self.lock = threading.Lock()

    def write(self, offset, data):
        with self.lock:
            self.buf[offset:offset + len(data)] = data

    def zero(self, offset, length):
        with self.lock:
            self.buf[offset:offset + length] = bytes(length)
            self.zeroed.append((offset, length))


def test_align_widens_data_and_keeps_whole_zero_blocks():
    size = 10 * B + 100
    exts = [Extent(5, 10), Extent(3 * B, 2 * B, ZERO), Extent(3 * B + 7, 1), Extent(6 * B + 1, B, ZERO),
            Extent(10 * B + 50, 10)]
    out = align_to_blocks(exts, B, size)
    assert out == [Extent(0, B, DATA), Extent(3 * B, B, DATA), Extent(4 * B, B, ZERO),
                   Extent(6 * B, 2 * B, DATA), Extent(10 * B, 100, DATA)]


def test_copy_writes_data_zeroes_and_digests_every_block():
    data = bytearray(b"\x01" * (8 * B))
    data[2 * B:3 * B] = bytes(B)          # data extent that reads as zero: sent as zero
    src = MemSource(data)
    sink = MemSink(b"\xff" * (8 * B))    # the "backing" holds other data everywhere
    exts = [Extent(0, 4 * B), Extent(4 * B, 2 * B, ZERO), Extent(6 * B, 2 * B)]
    stats, digests = copy_extents(src, exts, sink, parallel=3, chunk=B, block_size=B)
    assert bytes(sink.buf) == bytes(data[:4 * B]) + bytes(2 * B) + bytes(data[6 * B:])
    assert (4 * B, 2 * B) in sink.zeroed and any(zeroed[0] == 2 * B for zeroed in sink.zeroed)
    assert stats.bytes_read == 6 * B and stats.zero_bytes == 3 * B and stats.bytes_written == 5 * B
    assert sorted(digests) == list(range(8))
    assert digests[2] == ZERO_DIGEST and digests[4] == ZERO_DIGEST and digests[0] == block_digest(bytes(data[:B]))


def test_ordered_sink_gets_ascending_records_and_a_valid_stream():
    data = bytes(range(256)) * (B // 256) * 16
    src = MemSource(data)
    out = io.BytesIO()
    writer = DiffWriter(out)
    writer.header(size=len(data), to_snap="s1")
    exts = [Extent(0, 3 * B), Extent(3 * B, B, ZERO), Extent(5 * B, 11 * B)]
    copy_extents(src, exts, DiffStreamSink(writer), parallel=4, chunk=B)
    writer.end()
    out.seek(0)
    rebuilt = bytearray(len(data))
    offsets = []
    for ext, chunk in DiffReader(out).records():
        offsets.append(ext.offset)
        if ext.kind == DATA:
            rebuilt[ext.offset:ext.end] = chunk
    assert offsets == sorted(offsets)
    expected = bytearray(data)
    expected[3 * B:4 * B] = bytes(B)
    expected[4 * B:5 * B] = bytes(B)  # never transferred: reads as zero in a fresh target
    assert rebuilt == expected


def test_a_failing_read_stops_the_copy_with_its_error():
    class Broken(MemSource):
        def read(self, offset, length):
            if offset >= 4 * B:
                raise TransferError("read failed at %d" % offset, offset=offset)
            return super().read(offset, length)

    sink = MemSink(bytes(64 * B))
    with pytest.raises(TransferError, match="read failed"):
        copy_extents(Broken(b"\x02" * (64 * B)), [Extent(0, 64 * B)], sink, parallel=2, chunk=B)


def test_short_read_is_an_error():
    class Short(MemSource):
        def read(self, offset, length):
            return super().read(offset, length)[:-1]

    with pytest.raises(TransferError, match="short read"):
        copy_extents(Short(b"\x03" * B), [Extent(0, B)], MemSink(bytes(B)), parallel=1, chunk=B)


def test_zero_blocks_inside_a_data_chunk_become_zero_writes():
    """librbd reports a new object from its start: the zero blocks before the written one must
    become zero clusters over the backing data, not stored data."""
    data = bytearray(8 * B)
    data[5 * B + 100:5 * B + 200] = b"\x07" * 100
    data[7 * B:] = b"\x08" * B
    sink = MemSink(b"\xff" * (8 * B))
    stats, digests = copy_extents(MemSource(data), [Extent(0, 8 * B)], sink, parallel=2, chunk=8 * B, block_size=B)
    assert bytes(sink.buf) == bytes(data)
    assert sorted(sink.zeroed) == [(0, 5 * B), (6 * B, B)]
    assert stats.bytes_written == 2 * B and stats.zero_bytes == 6 * B
    assert [digests[i] == ZERO_DIGEST for i in range(8)] == [True] * 5 + [False, True, False]


@pytest.mark.parametrize("old, new, expected", [
    (32 * B, 48 * B, []),                              # whole blocks: nothing cut
    (32 * B, 32 * B, []),                              # no resize
    (32 * B + 4608, 48 * B, [(32 * B, B)]),            # grown from inside block 32: all of it
    (32 * B + 4608, 32 * B + 9216, [(32 * B, 9216)]),  # grown inside the same block: up to the new end
    (48 * B, 33 * B + 12288, [(33 * B, 12288)]),       # shrunk to inside block 33: what is left of it
    (33 * B + 512, 32 * B + 1024, [(32 * B, 1024)]),   # shrunk across a block boundary to an odd size
])
def test_resize_edge(old, new, expected):
    assert [(e.offset, e.length) for e in resize_edge(old, new, B)] == expected
    assert all(e.kind == DATA for e in resize_edge(old, new, B))


@pytest.mark.parametrize("parallel, expected", [
    (1, 4 << 20), (8, 4 << 20), (12, 42 * B), (16, 2 << 20), (64, 512 * K), (1024, B),
])
def test_chunk_for_keeps_the_bytes_in_flight_bounded(parallel, expected):
    assert chunk_for(parallel, 4 << 20, B) == expected
    assert expected % B == 0
    assert parallel * expected <= max(IN_FLIGHT_BYTES, parallel * B)


def test_many_threads_read_smaller_chunks_and_the_copy_is_the_same():
    data = bytes(range(256)) * (64 * B // 256)
    for parallel in (2, 64):
        src = MemSource(data)
        sink = MemSink(bytes(len(data)))
        stats, digests = copy_extents(src, [Extent(0, len(data))], sink, parallel=parallel, chunk=32 * B,
                                      block_size=B)
        assert bytes(sink.buf) == data and stats.bytes_read == len(data) and len(digests) == 64
        assert max(length for _offset, length in src.reads) == chunk_for(parallel, 32 * B, B)
    assert chunk_for(64, 32 * B, B) == 8 * B < 32 * B
    assert chunk_for(4, 4 * K, B) == 4 * K  # never more than asked for


def test_rate_limit_is_shared_by_every_thread():
    """4 threads reading 8 x 64 KiB each through one 2 MiB/s limit: 2 MiB in all, so at least 1 s,
    not a quarter of it (a lower bound only: a slow machine makes it longer, never shorter)."""
    limit = RateLimit(2 << 20)
    read = limit.wrap(lambda offset, length: bytes(length))
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [read(0, 65536) for _i in range(8)]) for _t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 0.99
    with pytest.raises(ValueError):
        RateLimit(0)
