# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Move extents from a source to a sink: bounded parallel reads, zero detection, block digests.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

    plan_blocks() ─▶ [Extent, ...] ─▶ N reader threads ─▶ sink.write / sink.zero
                                      (bounded window)     (parallel, or in order for a stream)

A *source* has ``size`` and ``read(offset, length) -> bytes`` (thread-safe).
A *sink* has ``write(offset, data)``, ``zero(offset, length)`` and an ``ordered``
flag: an ordered sink (a diff stream) receives calls in ascending offset order
from one thread; an unordered one (NBD) is called from the reader threads.

Memory is bounded whatever the image size and whatever ``parallel`` is: each of the
``parallel`` threads holds one chunk at a time (plus librbd's and the writer's copy of
it), and the chunk shrinks as ``parallel`` grows so that all of them together hold
about IN_FLIGHT_BYTES (see chunk_for).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import (
    DIGEST_SIZE, ZERO_DIGEST, BlockDigests, block_digest)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.writer import LayerWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, split, zero_blocks
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero

DEFAULT_CHUNK = 4 << 20
IN_FLIGHT_BYTES = 32 << 20  # chunks being read or written, summed over the threads (8 x 4 MiB)


def chunk_for(parallel, chunk=DEFAULT_CHUNK, unit=65536):
    """The read size for ``parallel`` threads: ``chunk``, or less so that the threads together
    hold about IN_FLIGHT_BYTES; a multiple of ``unit`` (the block size), never below one unit
    (unless ``chunk`` itself is smaller).

    Each chunk in flight is held three times (librbd's buffer, the bytes handed to Python,
    the writer's aligned copy): with 4 MiB chunks at parallel 16 the module peaked at 321-341 MB;
    with 2 MiB chunks at 217 MB, as fast (make bench, 2026-11-23).
    """
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    share = IN_FLIGHT_BYTES // parallel // unit * unit
    return min(chunk, max(unit, share))


def align_to_blocks(extents, block_size, size):
    """Widen extents to whole blocks of ``block_size`` (clipped at ``size``).

    A block wholly covered by ZERO extents stays ZERO; any other touched block
    becomes DATA and is read whole, so every written block gets a digest and
    every write fills whole qcow2 clusters (no copy-on-write from the backing file).

    Works on block ranges, not on a set of blocks: time and memory grow with the
    number of extents, not with the size of the disk (a full backup of a 1 TiB
    image is 262144 object extents, not 16 million block numbers).
    """
    nblocks = -(-size // block_size)

    def blen(b):
        return min(block_size, size - b * block_size)

    data, zero, edges = [], [], collections.defaultdict(int)
    for ext in extents:
        if ext.length == 0:
            continue
        first, last = ext.offset // block_size, min((ext.end - 1) // block_size, nblocks - 1)
        if first > last:
            continue
        if ext.kind == DATA:
            data.append((first, last + 1))
            continue
        for b in sorted({first, last}):
            lo, hi = max(ext.offset, b * block_size), min(ext.end, (b + 1) * block_size)
            edges[b] += hi - lo
        if last - first > 1:
            zero.append((first + 1, last))
    interior = _merge_ranges(zero)
    for b, covered in edges.items():
        if covered >= blen(b) or _in_ranges(interior, b):
            zero.append((b, b + 1))
        else:
            data.append((b, b + 1))
    data, zero = _merge_ranges(data), _merge_ranges(zero)
    out = []

    def emit(first, end, kind):
        if first >= end:
            return
        off, stop = first * block_size, min(end * block_size, size)
        if out and out[-1].kind == kind and out[-1].end == off:
            out[-1] = Extent(out[-1].offset, stop - out[-1].offset, kind)
        else:
            out.append(Extent(off, stop - off, kind))

    # DATA wins over ZERO: walk both sorted lists, cutting zero ranges around data ranges.
    i, done = 0, 0
    for zfirst, zend in zero:
        while i < len(data) and data[i][0] < zend:
            emit(max(zfirst, done), data[i][0], ZERO)
            emit(data[i][0], data[i][1], DATA)
            done = max(done, data[i][1])
            i += 1
        emit(max(zfirst, done), zend, ZERO)
        done = max(done, zend)
    for first, end in data[i:]:
        emit(first, end, DATA)
    return out


def resize_edge(old_size, new_size, block_size):
    """The block a resize cuts through, as a DATA extent to copy whole ([] if none).

    When a disk grows from (or shrinks to) a size that ends inside a block, that block
    reads differently afterwards (old bytes then zeroes, or fewer bytes) although the
    source's diff may not report it: the new layer must hold it, so that its digest,
    and any tool that reads the layer alone, sees what the point reads as.
    """
    edge = min(old_size, new_size)
    if old_size == new_size or not edge % block_size:
        return []
    start = edge - edge % block_size
    return [Extent(start, min(start + block_size, new_size) - start, DATA)]


def _merge_ranges(ranges):
    """Sorted, disjoint, non-adjacent half-open (first, end) ranges covering ``ranges``."""
    out = []
    for first, end in sorted(ranges):
        if out and first <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((first, end))
    return out


def _in_ranges(ranges, b):
    i = bisect.bisect_right(ranges, (b, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= b < ranges[i][1]


class Stats:
    def __init__(self):
        self.bytes_read = 0
        self.bytes_written = 0
        self.zero_bytes = 0
        self.extents = 0
        self.scanned = 0  # bytes of the source covered so far (read, or skipped as holes): the progress
        self.started = time.monotonic()
        self.seconds = 0.0

    def as_dict(self):
        seconds = self.seconds or (time.monotonic() - self.started)
        return dict(bytes_read=self.bytes_read, bytes_written=self.bytes_written, zero_bytes=self.zero_bytes,
                    extents=self.extents, seconds=round(seconds, 3),
                    mb_per_s=round(self.bytes_read / 1e6 / seconds, 1) if seconds > 0 else None)


class RateLimit:
    """At most ``rate`` bytes per second, summed over every thread that calls ``take``: each call
    reserves the next ``n / rate`` seconds of a shared clock and sleeps until its share ends, so a
    transfer with N reader threads runs at ``rate`` in all, not N times it (vzdump's ``bwlimit``),
    and ``total / rate`` seconds at least."""

    def __init__(self, rate):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n):
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            end = self._next
        time.sleep(max(0.0, end - now))

    def wrap(self, read):
        """``read(offset, length)`` paced by this limit."""
        def limited(offset, length):
            self.take(length)
            return read(offset, length)
        return limited


class Window:
    """The one bounded thread pool of every copy: at most ``2 * parallel`` jobs in flight.

    ``submit(fn, *args)`` queues a job (blocking while the window is full); the results are
    handed IN SUBMISSION ORDER to ``on_result`` in the calling thread, so the bookkeeping needs
    no lock and an ordered sink (a stream) sees ascending offsets.  ``span=(start, end)`` names
    the byte range a job writes: a job whose span overlaps one in flight waits until every
    earlier job is done (writes that overlap land in order).  ``drain()`` waits for every queued
    job.  Leaving the block normally drains; leaving it on an error cancels what has not started
    and waits for what has (no thread outlives the copy).
    """

    def __init__(self, parallel, on_result=None, name="snapchain-io"):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.parallel = parallel
        self.on_result = on_result
        self.name = name
        self.pending = collections.deque()
        self.executor = None

    def __enter__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel,
                                                              thread_name_prefix=self.name)
        return self

    def submit(self, fn, *args, span=None):
        if span is not None and any(s is not None and s[0] < span[1] and span[0] < s[1] for _f, s in self.pending):
            self.drain()
        self.pending.append((self.executor.submit(fn, *args), span))
        while len(self.pending) >= 2 * self.parallel:
            self._finish_one()

    def _finish_one(self):
        result = self.pending.popleft()[0].result()
        if self.on_result is not None:
            self.on_result(result)

    def drain(self):
        while self.pending:
            self._finish_one()

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.drain()
        finally:
            for fut, _span in self.pending:
                fut.cancel()
            self.pending.clear()
            self.executor.shutdown(wait=True)


def block_runs(blocks, max_blocks):
    """Sorted block indexes -> ``(first, count)`` runs of consecutive blocks, at most ``max_blocks`` long."""
    first = count = None
    for b in sorted(blocks):
        if first is not None and b == first + count and count < max_blocks:
            count += 1
            continue
        if first is not None:
            yield first, count
        first, count = b, 1
    if first is not None:
        yield first, count


def copy_extents(source, extents, sink, parallel=4, chunk=DEFAULT_CHUNK, block_size=None, progress=None,
                 digest=block_digest, digests=None):
    """Copy ``extents`` of ``source`` to ``sink``; return (Stats, digests).

    ``digests`` (a BlockDigests of ``block_size``, e.g. ``Pending.new_digests()``, spooled to a
    file) receives the digest of every whole block written or zeroed, run by run as the
    pieces land: no per-block Python object is kept, so memory does not grow with the disk.
    Without it, and with a ``block_size``, an in-memory BlockDigests is returned; without a
    ``block_size``, None (no digests).  Reads run on ``parallel`` threads, with at most
    ``2 * parallel`` reads queued, each of ``chunk_for(parallel, chunk)`` bytes at most.
    All-zero data is sent as zero (WRITE_ZEROES / a ``z`` record), never as literal zeroes.
    """
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    if block_size and chunk % block_size:
        raise ValueError("chunk must be a multiple of block_size")
    if digests is not None and digests.block_size != block_size:
        raise ValueError("digests use %d-byte blocks, not %r" % (digests.block_size, block_size))
    chunk = chunk_for(parallel, chunk, block_size or 65536)
    stats = Stats()
    if block_size and digests is None:
        digests = BlockDigests(block_size)
    lock = threading.Lock()

    def digest_range(off, data):
        """(first block, concatenated digests) of the whole blocks in ``data`` at ``off``."""
        view = memoryview(data)
        first = -(-off // block_size)
        out = []
        pos = first * block_size - off
        while pos < len(view):
            n = min(block_size, len(view) - pos)
            if n < block_size and off + pos + n != source.size:
                break  # a partial block (never with block-aligned extents): no digest
            out.append(digest(view[pos:pos + n]))
            pos += n
        return first, b"".join(out)

    def zero_range(off, length):
        """(first, end) of the whole blocks inside a zeroed range."""
        first = -(-off // block_size)
        end = (off + length) // block_size
        if off + length == source.size and source.size % block_size:
            end += 1
        return first, max(first, end)

    def split_zero_blocks(ext, data):
        """Runs of data and all-zero whole blocks inside one read: a changed object is often
        mostly zeroes (librbd reports a new object from its start), and those must become
        zero clusters, not stored data."""
        view = memoryview(data)
        runs = []
        pos = 0
        while pos < ext.length:
            n = min(block_size - (ext.offset + pos) % block_size, ext.length - pos)
            kind = ZERO if all_zero(view[pos:pos + n]) else DATA
            if runs and runs[-1][0] == kind:
                runs[-1][2] += n
            else:
                runs.append([kind, pos, n])
            pos += n
        return [(Extent(ext.offset + p, n, kind), None if kind == ZERO else view[p:p + n]) for kind, p, n in runs]

    def read(ext):
        """The pieces to write for one extent: [(Extent, data or None for zeroes)]."""
        if ext.kind == ZERO:
            return [(ext, None)]
        data = source.read(ext.offset, ext.length)
        if len(data) != ext.length:
            raise TransferError("short read at offset %d: %d of %d bytes" % (ext.offset, len(data), ext.length),
                                offset=ext.offset)
        if all_zero(data):
            return [(Extent(ext.offset, ext.length, ZERO), None)]
        if block_size and not sink.ordered:
            return split_zero_blocks(ext, data)
        return [(ext, data)]

    def emit(pieces):
        for ext, data in pieces:
            if data is None:
                sink.zero(ext.offset, ext.length)
                run = zero_range(ext.offset, ext.length) if block_size else None
            else:
                sink.write(ext.offset, data)
                run = digest_range(ext.offset, data) if block_size else None
            with lock:
                stats.extents += 1
                if ext.kind == ZERO:
                    stats.zero_bytes += ext.length
                else:
                    stats.bytes_written += ext.length
                if run is None:
                    continue
                if data is None:
                    digests.set_zero_run(*run)
                else:
                    digests.set_run(*run)

    def job(ext):
        pieces = read(ext)
        with lock:
            if ext.kind == DATA:
                stats.bytes_read += ext.length
        if not sink.ordered:
            emit(pieces)
            return None
        return pieces

    def on_result(res):
        if res is not None:
            emit(res)
        if progress is not None:
            progress(stats)

    with Window(parallel, on_result) as window:
        for ext in split(extents, chunk):
            window.submit(job, ext)
    stats.seconds = time.monotonic() - stats.started
    return stats, digests


def digest_scan(source, target, base=None, parallel=4, chunk=DEFAULT_CHUNK, block_size=65536, digest=block_digest,
                digests=None, progress=None):
    """Read all of ``source``, write to ``target`` the blocks whose digest differs from ``base``.

    The copy for a source whose changed extents are unknown (a raw file or device).

    ``base`` is the effective BlockDigests of the parent point (every block
    present) or None for a full layer without backing (then all-zero blocks are
    skipped, the others written).  Runs of changed blocks are written as one
    request per chunk; changed blocks that are all zero become ``target.zero``.
    Blocks wholly inside what ``source.zero_extents`` names (the holes of a
    sparse file) are not read: they are zero.  Returns ``(Stats, BlockDigests of
    the blocks written)``: ``digests`` (e.g. ``Pending.new_digests()``) filled run
    by run, or a new in-memory one.  ``Stats.bytes_read`` counts what was read.
    ``progress(stats)`` is called after each chunk.
    """
    if chunk % block_size:
        raise ValueError("chunk must be a multiple of block_size")
    chunk = chunk_for(parallel, chunk, block_size)
    size = source.size
    stats = Stats()
    digests = BlockDigests(block_size) if digests is None else digests

    def job(offset, length):
        first = offset // block_size
        count = -(-length // block_size)
        olds = base.run(first, first + count) if base is not None else None
        holes = set(zero_blocks(source.zero_extents(offset, length), range(first, first + count), block_size, size))
        if len(holes) == count and (olds is None or olds == ZERO_DIGEST * count):
            return 0, [], [0, 0, 0]  # a hole where the parent reads zeroes too: nothing to read or write
        changed = []
        counters = [0, 0, 0]  # bytes written, zero bytes, requests
        run = [None, None]  # start (in chunk), kind
        read = [0]
        piece = [0, None]  # start (in chunk) and view of the data read for the current stretch of non-hole blocks

        def close_run(end):
            start, kind = run
            if start is None:
                return
            if kind == ZERO:
                target.zero(offset + start, end - start)
                counters[1] += end - start
            else:
                target.write(offset + start, piece[1][start - piece[0]:end - piece[0]])
                counters[0] += end - start
            counters[2] += 1
            run[0] = run[1] = None

        def data_of(i, pos, n):
            if piece[1] is None or pos >= piece[0] + len(piece[1]):
                close_run(pos)  # a data run never spans two reads
                stop = i
                while stop < count and first + stop not in holes:
                    stop += 1
                end = min(stop * block_size, length)
                piece[0], piece[1] = pos, memoryview(source.read(offset + pos, end - pos))
                read[0] += end - pos
            return piece[1][pos - piece[0]:pos - piece[0] + n]

        for i, pos in enumerate(range(0, length, block_size)):
            n = min(block_size, length - pos)
            index = first + i
            if index in holes:
                got = ZERO_DIGEST
            else:
                got = digest(data_of(i, pos, n))
            old = ZERO_DIGEST if olds is None else olds[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
            if got == old:
                close_run(pos)
                continue
            if changed and changed[-1][0] + len(changed[-1][1]) // DIGEST_SIZE == index:
                changed[-1][1] += got
            else:
                changed.append([index, bytearray(got)])  # runs of consecutive changed blocks
            kind = ZERO if got == ZERO_DIGEST else "data"
            if run[1] != kind:
                close_run(pos)
                run[0], run[1] = pos, kind
        close_run(length)
        return read[0], changed, counters

    def scan(offset, length):
        return length, job(offset, length)

    def on_result(result):
        covered, (length, changed, counters) = result
        stats.scanned += covered
        for index, values in changed:
            digests.set_run(index, values)
        stats.bytes_read += length
        stats.bytes_written += counters[0]
        stats.zero_bytes += counters[1]
        stats.extents += counters[2]
        if progress is not None:
            progress(stats)

    with Window(parallel, on_result) as window:
        for offset in range(0, size, chunk):
            window.submit(scan, offset, min(chunk, size - offset))
    stats.seconds = time.monotonic() - stats.started
    return stats, digests


class DiffStreamSink:
    """Ordered sink writing an ``rbd diff v1`` stream through a DiffWriter."""

    ordered = True

    def __init__(self, writer):
        self.writer = writer

    def write(self, offset, data):
        self.writer.write(offset, data)

    def zero(self, offset, length):
        self.writer.zero(offset, length)


class NbdSink:
    """Unordered sink writing into an NBD export (a new qcow2 layer) from many threads."""

    ordered = False

    def __init__(self, pool):
        self.pool = pool

    def write(self, offset, data):
        self.pool.pwrite(data, offset)

    def zero(self, offset, length):
        self.pool.zero(offset, length)

    def read(self, offset, length):
        return self.pool.pread(length, offset)


@contextlib.contextmanager
def layer_sink(pending, writer="direct", parallel=8, nbd_cache="none"):
    """A sink that fills ``pending``'s new layer (from ``Repository.begin_point(..., create=False)``).

    ``direct``: a LayerWriter (cluster = the repository's block size); ``nbd``: the layer
    created by ``qemu-img create`` and served by qemu-nbd.  When the block ends without an
    error the layer is complete on disk (metadata written, or qemu-nbd flushed and stopped),
    ready for ``Repository.publish``; on an error nothing more is written.
    """
    repo = pending.repo
    if writer == "direct":
        sink = LayerWriter(pending.path, pending.size, cluster_size=repo.block_size, backing=pending.backing,
                           mode=repo.file_mode)
        try:
            yield sink
        except BaseException:
            sink.abort()
            raise
        sink.close()
        return
    if writer != "nbd":
        raise ValueError("unknown writer %r" % (writer,))
    _nbd.require_nbd()
    pending.create()
    cache = _nbd.usable_cache_mode(nbd_cache, repo.disk_dir)
    with _nbd.QemuNbd(pending.path, fmt="qcow2", cache=cache, shared=parallel) as server:
        pool = server.pool(parallel)
        try:
            yield NbdSink(pool)
            pool.flush()
        finally:
            pool.close()
