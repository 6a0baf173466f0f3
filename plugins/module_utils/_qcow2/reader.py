# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read one point of a qcow2 chain straight from its layer files, without QEMU (read-only).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``PointMap.open(top)`` opens the point's layer and, following each header's backing file name
(relative to the layer's directory), every layer below it; it parses each header and reads the
L1/L2 tables as it goes, so that for any guest range it can tell, top-most layer first::

    DATA   this layer's file holds the bytes at this host offset (raw backing: same offset)
    ZERO   reads as zeroes: a zero cluster (v3), past the end of a backing layer, or nothing allocated anywhere
    (unallocated in a layer: look one layer down)

exactly as QEMU reads the chain (qcow2 spec, "Cluster mapping"; QEMU's qcow2_get_cluster_type:
a compressed cluster is one, the zero flag wins over a host offset, an offset 0 without the zero
flag is unallocated; file-posix pads reads past the end of a file with zeroes, the block layer
reads zeroes past the end of a backing layer).

Only what it can prove is handled; anything else raises ``Unsupported`` before a byte is copied,
and the caller reads the point through qemu-nbd instead.  Supported: qcow2 version 2 and 3, any
cluster size (512 B to 2 MiB), zero clusters (v3), internal snapshots (only the active L1 table is
read), backing files given relative to the layer's directory (or absolute), in format qcow2 (named
or probed by its magic) or raw (named).  Unsupported: encryption, compressed clusters (one is
enough), an external data file, extended L2 entries, a dirty or corrupt image, an unknown
incompatible feature bit, reserved bits set in L1/L2 entries, a protocol or json: backing name.

Memory does not grow with the image: ranges are resolved one window at a time (at most 4096
clusters of the smallest cluster size, at most 64 MiB), reading only the slices of the L1 and L2
tables that cover the window; the resulting runs are streamed (``runs``, ``jobs``), never listed.

Reading data (``plan_reads``, then ``read_into``): a layer mostly in the page cache already is
read as it is; any other one is read through the page cache with sequential readahead and
dropped behind (POSIX_FADV_DONTNEED over each 32 MiB read), so that a restore neither leaves the
image in the cache nor pushes the host's useful pages out.  Measured here (2 GiB, cold, 2 cores,
a VM): as fast as the disk allows with the least CPU; O_DIRECT was half as fast (no readahead),
a plain page-cache read cost up to 4x the system time (new pages for every byte).

Locking: the qemu-nbd --read-only path leaves, on EVERY layer file of the chain, QEMU's
OFD byte-range read locks (block/file-posix.c, raw_apply_lock_bytes; RAW_LOCK_PERM_BASE 100,
RAW_LOCK_SHARED_BASE 200; a format node's file child needs BLK_PERM_CONSISTENT_READ (bit 0) and
never shares WRITE (bit 1) or RESIZE (bit 3)): bytes 100, 201 and 203, as /proc/locks shows for
qemu-nbd 7.2.  ``PointMap.open`` takes the very same locks the same way (F_OFD_SETLK, F_RDLCK), then
checks like raw_check_lock_bytes that nobody holds the WRITE or RESIZE permission (bytes 101, 103)
or refuses to share CONSISTENT_READ (byte 200).  So while a restore reads, ``qemu-img commit`` or
``rebase`` of any layer by retention fails with "Failed to get "write" lock", exactly as before,
and a layer that some QEMU process is writing is refused (ConflictError).  A file system without OFD
locks makes the caller fall back to qemu-nbd (QEMU then decides).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import stat
import struct
import threading

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, RepositoryError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.header import (
    EXT_DATA_FILE, EXT_ENCRYPTION, INCOMPAT_COMPRESSION, HeaderError, has_magic, read_header)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2.writer import (
    OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO)

MAX_DEPTH = 4096
WINDOW_CLUSTERS = 4096
MAX_WINDOW = 64 << 20
MIN_WINDOW = 1 << 20
L1_SLICE = 4096  # L1 entries read at once (32 KiB)
HOT_FRACTION = 0.5  # a layer with at least this much of its file in the page cache is read as it is
DROP_BATCH = 32 << 20  # bytes read from a layer before the span they cover is dropped from the page cache
CACHE_SAMPLES = 64  # ranges of a layer file looked at to tell whether it is in the page cache
CACHE_SAMPLE = 1 << 20
MAX_KEPT_RUNS = 1 << 16  # runs kept from scan() for the copy (about 10 MB), else mapped again
MAX_GAP = 1 << 20  # pieces of one layer at most this far apart in its file are read with one preadv
MAX_GROUP = 256  # pieces per preadv (IOV_MAX is 1024: pieces and gaps)
_SCRATCH = memoryview(bytearray(MAX_GAP))  # where the bytes between them go (shared: never read)
_INF = float("inf")


L1E_OFFSET_MASK = L2E_OFFSET_MASK = OFFSET_MASK
L1E_RESERVED = 0x7F000000000001FF  # bits 0-8 and 56-62
L2E_ZERO = OFLAG_ZERO
L2E_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61
L2E_COMPRESSED = OFLAG_COMPRESSED

# The compression type only says how compressed clusters are compressed; those are refused one by one.
INCOMPAT_SUPPORTED = INCOMPAT_COMPRESSION

# QEMU's image locking bytes (block/file-posix.c) and permission bits (include/block/block-common.h).
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
BLK_PERM_CONSISTENT_READ = 0
BLK_PERM_WRITE = 1
BLK_PERM_RESIZE = 3
LOCKED_BYTES = (RAW_LOCK_PERM_BASE + BLK_PERM_CONSISTENT_READ, RAW_LOCK_SHARED_BASE + BLK_PERM_WRITE,
                RAW_LOCK_SHARED_BASE + BLK_PERM_RESIZE)
CHECKED_BYTES = ((RAW_LOCK_SHARED_BASE + BLK_PERM_CONSISTENT_READ, "refuses to share consistent reads of"),
                 (RAW_LOCK_PERM_BASE + BLK_PERM_WRITE, "is writing"),
                 (RAW_LOCK_PERM_BASE + BLK_PERM_RESIZE, "may resize"))
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux


class Unsupported(RepositoryError):
    """The chain uses something this reader does not handle (or cannot prove it reads right): use qemu-nbd."""


# --------------------------------------------------------------------------------------------
# Files


def _pread_exact(fd, length, offset, path, what):
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise RepositoryError("cannot read %s of %s: %s" % (what, path, exc.strerror), path=path)
    if len(data) != length:
        raise Unsupported("%s: %s at offset %d is cut short by the end of the file" % (path, what, offset), path=path)
    return data


def _lock_like_qemu(fd, path):
    """QEMU's shared read locks on a layer (see the module docstring); ConflictError if a writer holds it."""
    try:
        for byte in LOCKED_BYTES:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
        conflicts = []
        for byte, what in CHECKED_BYTES:
            got = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)))
            if got[0] != fcntl.F_UNLCK:
                conflicts.append(what)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ConflictError("%s is locked by another process (a QEMU process using it exclusively?)" % path,
                                path=path)
        raise Unsupported("cannot take QEMU's shared read locks on %s: %s" % (path, exc.strerror), path=path)
    if conflicts:
        raise ConflictError("another process %s %s (qemu-img commit or rebase by retention, or a VM?); try again "
                            "when it is done" % (" and ".join(conflicts), path), path=path)


def _open_ro(path):
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RepositoryError("cannot open layer %s: %s" % (path, exc.strerror), path=path)


_LIBC = []
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore(2) defines only the lowest bit of each byte


def _libc():
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        _LIBC.append(libc)
    return _LIBC[0]


def cached_fraction(fd, length, samples=CACHE_SAMPLES, sample=CACHE_SAMPLE):
    """The fraction of the file ``fd`` (``length`` bytes) that is in the page cache, estimated from
    ``samples`` ranges of ``sample`` bytes spread evenly over it (the whole file when it is small):
    mincore(2) over a read-only shared mapping of each range (address space only: nothing is faulted
    in or read), so the cost does not grow with the file.  None when it cannot be told."""
    if length <= 0:
        return 1.0
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    if length <= samples * sample:
        ranges = [(0, length)]
    else:
        step = length // samples
        ranges = [(i * step - i * step % mmap.PAGESIZE, sample) for i in range(samples)]
    resident = total_pages = 0
    for start, span in ranges:
        addr = libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = ctypes.create_string_buffer(-(-span // mmap.PAGESIZE))
            if libc.mincore(addr, span, vec) != 0:
                return None
        finally:
            libc.munmap(addr, span)
        resident += vec.raw.translate(_LOW_BIT).count(1)
        total_pages += len(vec.raw)
    return resident / float(total_pages)


# --------------------------------------------------------------------------------------------
# Layers


class _Layer:
    """One file of the chain: ``size``, ``runs(start, end)``, ``read_into`` / ``read_group``."""

    kind = None

    def __init__(self, path, fd, st):
        self.path = path
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.size = 0
        self.backing = None  # (name, format or None)
        self.drop_behind = False
        self._lock = threading.Lock()
        self._batch = [0, None, None]  # bytes read, lowest offset, highest end since the last drop

    def plan_reads(self):
        """Read a layer that is mostly in the page cache as it is; read any other one ahead
        (sequential readahead) and drop each range from the cache once read: a restore reads each
        byte once, and must not push the rest of the host out of the cache."""
        fraction = cached_fraction(self.fd, os.fstat(self.fd).st_size)
        self.drop_behind = fraction is not None and fraction < HOT_FRACTION
        if self.drop_behind:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fraction

    def close(self):
        if self.fd is not None:
            self._drop(force=True)
            try:
                os.close(self.fd)  # closing the open file description drops its OFD locks
            except OSError:
                pass
            self.fd = None

    def runs(self, start, end):
        raise NotImplementedError

    def read_into(self, view, offset):
        """Fill ``view`` with the file's bytes from ``offset``; past the end of the file, zeroes (as QEMU)."""
        length = len(view)
        pos = 0
        while pos < length:
            try:
                n = os.preadv(self.fd, [view[pos:]], offset + pos)
            except OSError as exc:
                raise TransferError("read of %d bytes at offset %d of %s failed: %s"
                                    % (length - pos, offset + pos, self.path, exc.strerror), path=self.path)
            if n == 0:
                view[pos:] = bytes(length - pos)
                break
            pos += n
        self._done(offset, length)

    def read_group(self, group, view):
        """Read [(host offset, position in view, length)], sorted and at most MAX_GAP apart, at once."""
        if len(group) == 1:
            host, pos, n = group[0]
            self.read_into(view[pos:pos + n], host)
            return
        buffers = []
        end = group[0][0]
        for host, pos, n in group:
            if host > end:
                buffers.append(_SCRATCH[:host - end])
            buffers.append(view[pos:pos + n])
            end = host + n
        start = group[0][0]
        try:
            got = os.preadv(self.fd, buffers, start)
        except OSError as exc:
            raise TransferError("read of %d bytes at offset %d of %s failed: %s"
                                % (end - start, start, self.path, exc.strerror), path=self.path)
        if got < end - start:  # the end of the file (or a signal): piece by piece, zeroes past the end
            for host, pos, n in group:
                self.read_into(view[pos:pos + n], host)
            return
        self._done(start, end - start)

    def _done(self, offset, length):
        """Drop behind, in batches: one POSIX_FADV_DONTNEED per DROP_BATCH bytes read, over the span
        they cover (holes included: read ahead for nothing), not one per piece (each call can make
        the kernel drain every CPU's LRU lists).  Dropping is only advice: a page another reader
        still needs is read again, never lost (these pages are clean)."""
        if not self.drop_behind:
            return
        with self._lock:
            batch = self._batch
            batch[0] += length
            batch[1] = offset if batch[1] is None else min(batch[1], offset)
            batch[2] = offset + length if batch[2] is None else max(batch[2], offset + length)
        if batch[0] >= DROP_BATCH:
            self._drop()

    def _drop(self, force=False):
        with self._lock:
            count, low, high = self._batch
            if low is None or not (force or count >= DROP_BATCH):
                return
            self._batch = [0, None, None]
        try:
            os.posix_fadvise(self.fd, low, high - low, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # only advice


class RawLayer(_Layer):
    """A raw backing file: every byte up to its size is data at the same offset."""

    kind = "raw"

    def __init__(self, path, fd, st):
        super().__init__(path, fd, st)
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)

    def runs(self, start, end):
        if start < end:
            yield start, end, DATA, start


class Qcow2Layer(_Layer):
    """A qcow2 file: header checked at open, L1/L2 slices read on demand."""

    kind = "qcow2"

    def __init__(self, path, fd, st):
        super().__init__(path, fd, st)
        try:
            header = read_header(path, fd=fd)
        except HeaderError as exc:
            if exc.details.get("reason") == "magic":
                raise
            raise Unsupported(exc.msg, path=path)
        if header.crypt_method or any(ext == EXT_ENCRYPTION for ext, _body in header.extensions):
            raise Unsupported("%s is encrypted" % path, path=path)
        if any(ext == EXT_DATA_FILE for ext, _body in header.extensions):
            raise Unsupported("%s names an external data file" % path, path=path)
        bad = header.incompatible_names(~INCOMPAT_SUPPORTED)
        if bad:
            raise Unsupported("%s has incompatible feature(s): %s" % (path, ", ".join(bad)), path=path)
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.l2_cover = cs * (cs // 8)
        size = header.size
        if size % 512:
            raise Unsupported("%s has a virtual size of %d bytes, not a multiple of 512" % (path, size), path=path)
        self.size = size
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        if l1_offset % cs or (l1_size and not l1_offset):
            raise Unsupported("%s has an invalid L1 table offset %d" % (path, l1_offset), path=path)
        if l1_size < -(-size // self.l2_cover):
            raise Unsupported("%s: its L1 table (%d entries) is too small for %d bytes" % (path, l1_size, size),
                              path=path)
        self.l1_offset = l1_offset
        self.l1_size = l1_size
        self._l1_first = None
        self._l1 = ()
        if header.backing_file is not None:
            self.backing = (header.backing_file, header.backing_format)

    def _l2_offset(self, index):
        if self._l1_first is None or not self._l1_first <= index < self._l1_first + len(self._l1):
            first = index - index % L1_SLICE
            count = min(L1_SLICE, self.l1_size - first)
            raw = _pread_exact(self.fd, count * 8, self.l1_offset + first * 8, self.path, "the L1 table")
            self._l1 = struct.unpack(">%dQ" % count, raw)
            self._l1_first = first
        entry = self._l1[index - self._l1_first]
        if entry & L1E_RESERVED:
            raise Unsupported("%s: L1 entry %d has reserved bits set (0x%016x)" % (self.path, index, entry),
                              path=self.path)
        offset = entry & L1E_OFFSET_MASK
        if offset % self.cluster_size:
            raise Unsupported("%s: L2 table %d at an unaligned offset %d" % (self.path, index, offset), path=self.path)
        return offset

    def runs(self, start, end):
        """(start, end, DATA|ZERO|None, host offset) covering [start, end), merged; None means unallocated."""
        pos = start
        while pos < end:
            index = pos // self.l2_cover
            base = index * self.l2_cover
            stop = min(end, base + self.l2_cover)
            l2_offset = self._l2_offset(index)
            if not l2_offset:
                yield pos, stop, None, 0
            else:
                yield from self._l2_runs(l2_offset, base, pos, stop)
            pos = stop

    def _l2_runs(self, l2_offset, base, start, stop):
        cs = self.cluster_size
        first = (start - base) // cs
        count = (stop - 1 - base) // cs - first + 1
        raw = _pread_exact(self.fd, count * 8, l2_offset + first * 8, self.path, "an L2 table")
        entries = struct.unpack(">%dQ" % count, raw)
        run = None  # [start, end, kind, host]
        done = start
        for i in itertools.compress(range(count), memoryview(raw).cast("Q")):  # the non-zero entries only
            entry = entries[i]
            cluster = base + (first + i) * cs
            lo, hi = max(cluster, start), min(cluster + cs, stop)
            if entry & L2E_COMPRESSED:
                raise Unsupported("%s: the cluster at guest offset %d is compressed" % (self.path, cluster),
                                  path=self.path)
            if entry & L2E_RESERVED:
                raise Unsupported("%s: the L2 entry of guest offset %d has reserved bits set (0x%016x)"
                                  % (self.path, cluster, entry), path=self.path)
            if entry & L2E_ZERO:
                if self.version < 3:
                    raise Unsupported("%s: zero cluster at guest offset %d in a version 2 image"
                                      % (self.path, cluster), path=self.path)
                kind, host = ZERO, 0
            else:
                host = entry & L2E_OFFSET_MASK
                if not host:
                    continue  # only the COPIED flag: unallocated
                if host % cs:
                    raise Unsupported("%s: the cluster at guest offset %d is at an unaligned host offset %d"
                                      % (self.path, cluster, host), path=self.path)
                kind, host = DATA, host + (lo - cluster)
            if run is not None and run[1] == lo and run[2] == kind and (kind != DATA or run[3] + lo - run[0] == host):
                run[1] = hi
                continue
            if run is not None:
                yield tuple(run)
                done = run[1]
            if lo > done:
                yield done, lo, None, 0
            run = [lo, hi, kind, host]
        if run is not None:
            yield tuple(run)
            done = run[1]
        if done < stop:
            yield done, stop, None, 0


def _open_layer(path, fmt):
    fd = _open_ro(path)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise Unsupported("%s is not a regular file or a block device" % path, path=path)
        if fmt is None:
            if not has_magic(os.pread(fd, 4, 0)):
                raise Unsupported("%s has no backing format and is not qcow2 (QEMU would probe it)" % path, path=path)
            fmt = "qcow2"
        if fmt == "qcow2":
            layer = Qcow2Layer(path, fd, st)
        elif fmt == "raw":
            layer = RawLayer(path, fd, st)
        else:
            raise Unsupported("%s is in format %r" % (path, fmt), path=path)
        _lock_like_qemu(fd, path)
        return layer
    except BaseException:
        os.close(fd)
        raise


def _backing_path(layer_path, name):
    head = name.split("/", 1)[0]
    if name.startswith("json:") or ":" in head:
        raise Unsupported("%s has the backing file %r, which QEMU reads as a protocol" % (layer_path, name),
                          path=layer_path)
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(layer_path), name)


# --------------------------------------------------------------------------------------------
# The point


class PointMap:
    """The point read from ``top`` down through its backing chain; a context manager (closes, unlocks)."""

    def __init__(self, layers):
        self.layers = layers
        self.size = layers[0].size
        smallest = min([layer.cluster_size for layer in layers if layer.kind == "qcow2"] or [MAX_WINDOW])
        self.window = max(MIN_WINDOW, min(MAX_WINDOW, smallest * WINDOW_CLUSTERS))
        self._kept = None

    @classmethod
    def open(cls, top, fmt="qcow2"):
        layers = []
        seen = set()
        try:
            path, fmt_ = top, fmt
            while True:
                layer = _open_layer(path, fmt_)
                layers.append(layer)
                if layer.identity in seen:
                    raise Unsupported("%s appears twice in the backing chain of %s" % (path, top), path=top)
                seen.add(layer.identity)
                if layer.backing is None:
                    break
                if len(layers) >= MAX_DEPTH:
                    raise Unsupported("the backing chain of %s is more than %d layers deep" % (top, MAX_DEPTH),
                                      path=top)
                name, fmt_ = layer.backing
                path = _backing_path(path, name)
                if not os.path.exists(path):
                    raise RepositoryError("%s needs its backing file %s, which is missing" % (layer.path, path),
                                          path=path)
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(layers)

    def close(self):
        for layer in self.layers:
            layer.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    # -- mapping ------------------------------------------------------------------------------
    def resolve(self, start, end):
        """Sorted, merged (start, end, DATA|ZERO, layer index, host offset) covering [start, end).

        Top-most layer first; ``todo`` holds the sorted ranges no layer above has allocated.  Each
        layer's tables are read once for the span of ``todo``, and each of its allocated runs takes
        its part of ``todo`` (found by bisection): the work grows with the runs, not with the number
        of holes an upper layer left (a deep chain of small incrementals)."""
        out = []
        todo = [(start, end)]
        for index, layer in enumerate(self.layers):
            while todo and todo[-1][1] > layer.size:  # past the end of a backing layer: zeroes
                lo, hi = todo.pop()
                if lo < layer.size:
                    todo.append((lo, layer.size))
                    lo = layer.size
                out.append((lo, hi, ZERO, -1, 0))
            if not todo:
                break
            i = 0
            for s, e, kind, host in layer.runs(todo[0][0], todo[-1][1]):
                if kind is None:
                    continue
                i = bisect.bisect_right(todo, (s, _INF), i) - 1
                if i < 0 or todo[i][1] <= s:
                    i += 1
                j = i
                rest = []
                while j < len(todo) and todo[j][0] < e:
                    lo, hi = todo[j]
                    a, b = max(lo, s), min(hi, e)
                    out.append((a, b, kind, index, host + a - s))
                    if lo < a:
                        rest.append((lo, a))
                    if b < hi:
                        rest.append((b, hi))
                    j += 1
                if j > i:
                    todo[i:j] = rest
                if not todo:
                    break
            if not todo:
                break
        out.extend((lo, hi, ZERO, -1, 0) for lo, hi in todo)  # unallocated in every layer
        out.sort()
        merged = []
        for run in out:
            if merged and _mergeable(merged[-1], run):
                last = merged[-1]
                merged[-1] = (last[0], run[1], last[2], last[3], last[4])
            else:
                merged.append(run)
        return merged

    def runs(self):
        """Every run of the point in order, merged across windows: the ones ``scan`` kept when there
        were at most MAX_KEPT_RUNS of them, else mapped again (a generator: memory stays bounded)."""
        if self._kept is not None:
            return iter(self._kept)
        return self._map_runs()

    def _map_runs(self):
        current = None
        for start in range(0, self.size, self.window):
            for run in self.resolve(start, min(self.size, start + self.window)):
                if current is not None and _mergeable(current, run):
                    current = (current[0], run[1], current[2], current[3], current[4])
                    continue
                if current is not None:
                    yield current
                current = run
        if current is not None:
            yield current

    def scan(self):
        """(data bytes, zero bytes) of the whole point; raises Unsupported before anything is copied."""
        data = zero = 0
        kept = []
        for run in self._map_runs():
            start, end, kind = run[0], run[1], run[2]
            if kind == DATA:
                data += end - start
            else:
                zero += end - start
            if kept is not None:
                kept.append(run)
                if len(kept) > MAX_KEPT_RUNS:
                    kept = None
        self._kept = kept
        return data, zero

    def jobs(self, chunk, zero_piece):
        """(offset, length, pieces) in order: data cut at multiples of ``chunk`` with ``pieces`` the
        [(layer index, host offset, length)] to read in guest order; zeroes cut at multiples of
        ``zero_piece`` with ``pieces`` None."""
        job = None
        for start, end, kind, index, host in self.runs():
            if kind == ZERO:
                if job is not None:
                    yield job[0], job[1] - job[0], job[2]
                    job = None
                pos = start
                while pos < end:
                    stop = min(end, (pos // zero_piece + 1) * zero_piece)
                    yield pos, stop - pos, None
                    pos = stop
                continue
            pos = start
            while pos < end:
                stop = min(end, (pos // chunk + 1) * chunk)
                piece = (index, host + pos - start, stop - pos)
                if job is not None and job[1] == pos and pos % chunk:
                    job[1] = stop
                    job[2].append(piece)
                else:
                    if job is not None:
                        yield job[0], job[1] - job[0], job[2]
                    job = [pos, stop, [piece]]
                pos = stop
        if job is not None:
            yield job[0], job[1] - job[0], job[2]

    # -- reading ------------------------------------------------------------------------------
    def plan_reads(self):
        """Decide, layer by layer, how to read (see _Layer.plan_reads); [fraction cached or None]."""
        return [layer.plan_reads() for layer in self.layers]

    def _groups(self, pieces):
        """(layer, [(host offset, position in the job, length)]): layer by layer, pieces close to
        each other in its file (at most MAX_GAP apart: clusters hidden by an upper layer)."""
        by_layer = {}
        pos = 0
        for index, host, n in pieces:
            by_layer.setdefault(index, []).append((host, pos, n))
            pos += n
        for index, items in by_layer.items():
            items.sort()
            group = [items[0]]
            for item in items[1:]:
                last = group[-1]
                if 0 <= item[0] - (last[0] + last[2]) <= MAX_GAP and len(group) < MAX_GROUP:
                    group.append(item)
                else:
                    yield self.layers[index], group
                    group = [item]
            yield self.layers[index], group

    def read_into(self, pieces, buf):
        """Fill the start of the writable buffer ``buf`` with one data job (``pieces`` from ``jobs``):
        one preadv per group of ``_groups``, the bytes between its pieces into a scratch buffer (one
        system call instead of one per piece, and a sequential stream for readahead)."""
        view = memoryview(buf)
        try:
            for layer, group in self._groups(pieces):
                layer.read_group(group, view)
        finally:
            view.release()
        return buf

    def read(self, pieces, length):
        """One data job as a new bytearray."""
        return self.read_into(pieces, bytearray(length))


def _mergeable(a, b):
    if a[1] != b[0] or a[2] != b[2]:
        return False
    if a[2] == ZERO:
        return True
    return a[3] == b[3] and a[4] + (a[1] - a[0]) == b[4]
