# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_restore module's logic: one point of a disk's chain onto an RBD image, a file or a device.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Data path (one restore)::

    point's layer ──_qcow2_map.PointMap (the layer files read directly: headers, L1/L2 tables)──▶
        runs, top-most layer first ─▶ DATA (layer file, host offset) / ZERO, cut into 4 MiB jobs
        DATA  ─▶ 2 reader threads (preads, readahead, dropped behind) ─▶ pooled buffers
              ─▶ N writer threads ─▶ sink.write (librbd aio_write without a copy; a file or
                 device: pwrite with O_DIRECT from the pooled buffers, page-aligned mmaps, else
                 through the page cache, see DirectWrites)
        ZERO  ─▶ nothing on a NEW image or file (it reads as zeroes already);
                 written as zeroes, never skipped, on an existing image (in-place) or a device:
                 librbd write_zeroes; fallocate(PUNCH_HOLE|KEEP_SIZE), else BLKZEROOUT, else zero pwrite.

    fallback, for a chain _qcow2_map does not handle (compressed clusters, encryption, an
    external data file...; the result says so in ``reader_fallback``):
    point's layer ──qemu-nbd --read-only (backing chain resolved by QEMU)──▶ NbdPool
        block_status ─▶ DATA / ZERO extents ─▶ N reader threads (NBD pread) ─▶ sink, as above.

Why not always qemu-nbd: it serves every connection on one thread and copies each byte through
a socket twice; measured on a 2 GiB point, the direct path needs about a third of the CPU time
(no qemu-nbd process, no socket, no copy in librbd) and takes about the time of ``rbd import``.

No repository lock is taken: a restore only reads, and QEMU's own image locks
make a concurrent ``qemu-img commit``/``rebase`` by retention fail instead of
changing the layers under us: the direct path takes, on every layer, the same OFD
read locks as qemu-nbd does (see _qcow2_map), and qemu-nbd takes its own.  A
backup running at the same time only adds a new layer.  So a restore is never
blocked by a long backup of the same disk.

Destinations, and what is safe about each:

new RBD image   written under ``<image>.snapchain-partial``, renamed when complete: an
                interrupted restore never leaves a half-written image under the final name.
                ``force`` replaces an existing image (refused when it has snapshots or is open).
in-place RBD    ``in_place`` + ``force``: refused while any client has the image open; takes the
                exclusive lock, then the safety snapshot ``snapchain-safety-<UTC stamp>`` (kept),
                resizes to the point's size, writes data and zeroes.
file            raw (sparse) or qcow2 (``qemu-img convert``), written to ``.<name>.partial``,
                fsynced, renamed; refused when it exists unless ``force``.
device          an existing block device at least as large as the point; opened O_EXCL (the
                kernel refuses while it is mounted, held by dm/md/LVM or swap), and refused when
                /proc/self/mountinfo, /proc/swaps or its holders show a user, unless ``force``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import mmap
import os
import re
import stat
import struct
import subprocess
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, RepositoryError, SnapchainError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import (
    DIRECT_ALIGN, aligned, all_zero, fsync_dir, parse_mode, pwrite_all)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, total

DEFAULT_CHUNK = 4 << 20
ZERO_PIECE = 1 << 30  # zero extents are cut to this size (parallelism, progress)
SAFETY_PREFIX = "snapchain-safety-"
PARTIAL_IMAGE_SUFFIX = ".snapchain-partial"
PARTIAL_FILE_SUFFIX = ".partial"
FORMATS = ("raw", "qcow2")
PROGRESS_INTERVAL = 2.0
ZERO_COPY_CONF = ("rbd_disable_zero_copy_writes", "false")
# Reader threads of copy_mapped: the kernel's readahead already keeps the disk busy; more threads
# reading the same files only contend (2 GiB, cold: 1.2 s with 2 readers, 1.4-1.6 s with 4, 1.9 s with 1).
READERS = 2
POINT_INFO_KEYS = ("name", "created", "snapshot", "size", "segment", "parent", "bad")

# fallocate(2) and ioctl numbers (linux/falloc.h, linux/fs.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKSSZGET = 0x1268  # _IO(0x12, 104)

_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,]\d+)?)?\s*(Z|z|UTC|[+-]\d{2}(?::?\d{2})?)$")
_STAMP_RE = re.compile(r"^\d{8}T\d{6}Z$")


# --------------------------------------------------------------------------------------------
# Choosing the point


def parse_time(text, what="before"):
    """An ISO 8601 time WITH its zone (``2026-11-20T03:00Z``, ``2026-11-20 04:00:00+01:00``) or a
    point-style stamp (``20261120T030000Z``), as an aware UTC datetime.  A time without a zone is
    refused: a restore from the wrong point is worse than a second try."""
    value = str(text).strip() if text is not None else ""
    if _STAMP_RE.match(value):
        parsed = _naming.parse_managed(value, prefix="")
        if parsed is not None:
            return parsed
    m = _TIME_RE.match(value)
    if not m:
        raise InputError("%s %r is not a time with a zone: write it like 2026-11-20T03:00Z (UTC), "
                         "2026-11-20T04:00+01:00 or 20261120T030000Z" % (what, text))
    year, month, day, hour, minute, second, zone = m.groups()
    if zone in ("Z", "z", "UTC"):
        tz = datetime.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise InputError("%s %r has an invalid zone offset %s" % (what, text, zone))
        tz = datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))
    try:
        when = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
                                 tzinfo=tz)
    except ValueError as exc:
        raise InputError("%s %r is not a valid time: %s" % (what, text, exc))
    return when.astimezone(datetime.timezone.utc)


def iso(when):
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def point_time(point):
    """The UTC time of a point: its name (the time of the snapshot it was taken from)."""
    return _naming.parse_managed(point["name"], prefix="")


def describe_points(points, limit=20):
    """``name, name [bad], ...`` newest first, at most ``limit`` names."""
    if not points:
        return "none"
    shown = []
    for point in reversed(points[-limit:]):
        shown.append(point["name"] + (" [bad]" if point.get("bad") else ""))
    text = ", ".join(shown)
    if len(points) > limit:
        text += " and %d older" % (len(points) - limit)
    return text


def _bad_in_chain(point, by_name):
    """(the point marked bad that makes ``point`` unsafe: itself or an ancestor it reads through, why),
    or None.  The repository's one rule (``unsound_point``): an ancestor's bad mark does not count
    when chain_verify recorded that the point reads none of that ancestor's corrupt data."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import unsound_point

    return unsound_point(by_name, point["name"])


def select_point(points, point=None, before=None, allow_bad=False):
    """(the point to restore, [skipped points as 'name (reason)']).

    ``point``: a name, or None / ``latest``.  ``before``: an aware datetime; the newest
    point at or before it.  A point that is marked bad, or reads through a layer of a
    point marked bad (and is not recorded as reading around its corrupt data), is refused
    by name and skipped by ``latest``/``before``, unless ``allow_bad``.
    """
    if not points:
        raise NotFoundError("the repository has no points yet")
    by_name = dict((p["name"], p) for p in points)
    available = "available points (newest first): %s" % describe_points(points)
    if point not in (None, "", "latest"):
        if before is not None:
            raise InputError("give either point or before, not both")
        if point not in by_name:
            hint = ""
            try:
                parse_time(point)
                hint = " (to choose by time, use before: %s)" % point
            except InputError:
                pass
            raise NotFoundError("no point %r%s; %s" % (point, hint, available), point=point,
                                available_points=[p["name"] for p in points])
        chosen = by_name[point]
        found = _bad_in_chain(chosen, by_name)
        if found and not allow_bad:
            raise ConflictError("point %s %s; set allow_bad: true to restore it anyway, or choose another; %s"
                                % (point, found[1], available),
                                point=point, bad_point=found[0], available_points=[p["name"] for p in points])
        return chosen, []
    candidates = points
    if before is not None:
        candidates = [p for p in points if point_time(p) is not None and point_time(p) <= before]
        if not candidates:
            raise NotFoundError("no point at or before %s: the oldest is %s; %s"
                                % (iso(before), points[0]["name"], available),
                                available_points=[p["name"] for p in points])
    skipped = []
    for candidate in reversed(candidates):
        found = _bad_in_chain(candidate, by_name)
        if found and not allow_bad:
            how = "marked bad" if found[0] == candidate["name"] else "reads through bad point %s" % found[0]
            skipped.append("%s (%s, %s)" % (candidate["name"], how, _bad_reason(by_name[found[0]])))
            continue
        return candidate, skipped
    raise ConflictError("every point%s is marked bad or reads through a bad point: %s; set allow_bad: true to "
                        "restore one anyway" % (" at or before %s" % iso(before) if before else "", "; ".join(skipped)),
                        available_points=[p["name"] for p in points])


def _bad_reason(point):
    reason = (point.get("extra") or {}).get("bad_reason")
    return "reason: %s" % reason if reason else "no reason recorded"


def load_chain(chain_dir, point=None, before=None, allow_bad=False):
    """(repository, the chosen point, its chain oldest first, skipped).  Checks only the chosen chain's files."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain

    if not os.path.isdir(chain_dir):
        raise NotFoundError("chain directory %s does not exist (a disk's repository is "
                            "<repository>/<cluster>/<pool>/[<namespace>/]<image>)" % chain_dir, path=chain_dir)
    repo = _chain.Repository(chain_dir)
    if not os.path.isfile(repo.manifest_path):
        raise NotFoundError("%s has no manifest.json: it is not the repository of a disk" % chain_dir, path=chain_dir)
    repo.load(verify=False)
    chosen, skipped = select_point(repo.points(), point, before, allow_bad)
    chain = repo.chain(chosen["name"])
    parent = None
    for item in chain:
        layer = repo.path(item["layer"])
        if not os.path.isfile(layer):
            raise RepositoryError("point %s needs the layer %s of point %s, which is missing"
                                  % (chosen["name"], layer, item["name"]), path=layer)
        size, backing = _chain.read_qcow2_header(layer)
        if size != item["size"]:
            raise RepositoryError("layer %s is %d bytes but the manifest says %d" % (layer, size, item["size"]),
                                  path=layer)
        if backing != (parent["layer"] if parent else None):
            raise RepositoryError("layer %s has backing file %r but the manifest says %r"
                                  % (layer, backing, parent and parent["layer"]), path=layer)
        parent = item
    return repo, chosen, chain, skipped


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Rewrites a small JSON file atomically every ``interval`` seconds while a restore runs.

    ``{"state": "running|done|failed", "phase": ..., "bytes_done": N, "bytes_total": N,
    "percent": P, "rate_bytes_per_s": R, "eta_seconds": E, ...}``; ``bytes_*`` count the
    data to copy (what takes the time); ``zero_bytes_*`` the ranges written as zeroes.
    Without a path every call is a no-op.
    """

    def __init__(self, path, interval=PROGRESS_INTERVAL, **static):
        self.path = path
        self.interval = interval
        self.static = static
        self.lock = threading.Lock()
        self.state = "running"
        self.phase = "starting"
        self.bytes_done = 0
        self.bytes_total = None
        self.zero_done = 0
        self.zero_total = 0
        self.message = None
        self.started = time.time()
        self.transfer_started = None
        self.samples = collections.deque()
        self._stop = threading.Event()
        self._thread = None
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise InputError("the directory of progress_file %s does not exist" % path)

    def __enter__(self):
        if self.path:
            self.write()
            self._thread = threading.Thread(target=self._run, name="snapchain-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close("done")
        else:
            self.close("failed", getattr(exc, "msg", None) or str(exc) or exc_type.__name__)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError:
                pass  # progress is best effort; the restore goes on

    def set_phase(self, phase, bytes_total=None, zero_total=None):
        with self.lock:
            self.phase = phase
            if bytes_total is not None:
                self.bytes_total = bytes_total
            if zero_total is not None:
                self.zero_total = zero_total
            if phase == "writing" and self.transfer_started is None:
                self.transfer_started = time.time()

    def update(self, bytes_done=None, zero_done=None):
        with self.lock:
            if bytes_done is not None:
                self.bytes_done = bytes_done
            if zero_done is not None:
                self.zero_done = zero_done

    def snapshot(self, now=None):
        """The document as it would be written now (also used by the tests)."""
        now = time.time() if now is None else now
        with self.lock:
            done, total_ = self.bytes_done, self.bytes_total
            self.samples.append((now, done))
            while len(self.samples) > 2 and now - self.samples[0][0] > 10.0:
                self.samples.popleft()
            first_t, first_done = self.samples[0]
            rate = None
            if now - first_t >= 0.5:
                rate = (done - first_done) / (now - first_t)
            elif self.transfer_started and now > self.transfer_started:
                rate = done / (now - self.transfer_started)
            eta = None
            if self.state == "done":
                eta = 0
            elif rate and total_ is not None:
                eta = int(round(max(total_ - done, 0) / rate))
            doc = dict(self.static)
            doc.update(
                state=self.state, phase=self.phase, message=self.message,
                bytes_done=done, bytes_total=total_,
                percent=round(100.0 * done / total_, 1) if total_ else (100.0 if self.state == "done" else 0.0),
                zero_bytes_done=self.zero_done, zero_bytes_total=self.zero_total,
                rate_bytes_per_s=int(rate) if rate is not None else None, eta_seconds=eta,
                elapsed_seconds=round(now - self.started, 1), pid=os.getpid(),
                started=iso(datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)),
                updated=iso(datetime.datetime.fromtimestamp(now, datetime.timezone.utc)))
        return doc

    def write(self):
        if not self.path:
            return
        data = (json.dumps(self.snapshot(), sort_keys=True) + "\n").encode("utf-8")
        temp = "%s.%d.tmp" % (self.path, os.getpid())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, self.path)

    def close(self, state, message=None):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:
            self.state = state
            self.message = message
            if state == "done":
                self.phase = "done"
                if self.bytes_total is not None:
                    self.bytes_done = self.bytes_total
        try:
            self.write()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Planning and copying


def plan(extents, chunk=DEFAULT_CHUNK, zero_piece=ZERO_PIECE):
    """Data extents cut at multiples of ``chunk`` (whole RBD objects), zero extents at ``zero_piece``."""
    out = []
    for ext in extents:
        step = chunk if ext.kind == DATA else zero_piece
        off = ext.offset
        while off < ext.end:
            end = min(ext.end, (off // step + 1) * step)
            out.append(Extent(off, end - off, ext.kind))
            off = end
    return out


class NbdSource:
    """The point as qemu-nbd serves it: ``size``, thread-safe ``read``."""

    def __init__(self, pool):
        self.pool = pool
        self.size = pool.size

    def read(self, offset, length):
        data = self.pool.pread(length, offset)
        return data if isinstance(data, bytes) else bytes(data)


class SinkCounters:
    def __init__(self):
        self.lock = threading.Lock()
        self.written = 0
        self.zero_written = 0
        self.zero_skipped = 0

    def add(self, written=0, zero_written=0, zero_skipped=0):
        with self.lock:
            self.written += written
            self.zero_written += zero_written
            self.zero_skipped += zero_skipped


def _ignore(*_args):
    pass


class RbdSink(SinkCounters):
    """Writes into an open librbd image from many threads; zeroes via write_zeroes, or skipped.

    Each write is an ``aio_write`` waited for at once, the buffer referenced until it completes:
    with ``rbd_disable_zero_copy_writes`` off on the session (``ZERO_COPY_CONF``, set before the
    image is opened) librbd then sends the caller's buffer instead of copying it first, as
    ``rbd import`` does with its own buffers (a plain ``write`` always copies)."""

    ordered = False

    def __init__(self, img, write_zeroes, fadvise=0):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd import rbd
        super().__init__()
        self.error = rbd.Error
        self.img = img
        self.write_zeroes = write_zeroes
        self.fadvise = fadvise
        self.zero_method = "write_zeroes" if write_zeroes else None

    def write(self, offset, data):
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        try:
            completion = self.img.aio_write(data, offset, _ignore, self.fadvise)
            completion.wait_for_complete_and_cb()
            ret = completion.get_return_value()
        except self.error as exc:
            ret, reason = None, str(exc)
        else:
            reason = os.strerror(-ret) if ret < 0 else None
        if reason is not None:
            raise TransferError("write of %d bytes at offset %d to %s failed: %s"
                                % (len(data), offset, self.img.get_name(), reason), offset=offset)
        self.add(written=len(data))

    def zero(self, offset, length):
        if not self.write_zeroes:
            self.add(zero_skipped=length)
            return
        try:
            self.img.write_zeroes(offset, length)
        except self.error as exc:
            raise TransferError("write_zeroes of %d bytes at offset %d to %s failed: %s"
                                % (length, offset, self.img.get_name(), exc), offset=offset)
        self.add(zero_written=length)


class DirectWrites(SinkCounters):
    """Data writes of FileSink and DeviceSink: with O_DIRECT where the file or device takes it.

    On a virtualised host the page cache of a new file costs more CPU than the copy (2 GiB to a
    raw file, 2 cores: 7.2 s and 5.0 s of CPU through the page cache, 1.8 s and 0.8 s with
    O_DIRECT, about ``qemu-img convert -t none``), so, as _qcow2.LayerWriter does, whole
    ``align``-byte blocks go through a second descriptor opened with O_DIRECT (the same file:
    reopened through /proc/self/fd), from page-aligned memory: the caller's buffer when it is
    (copy_mapped's pooled buffers, see ``aligned_buffers``), else a per-thread aligned copy.
    A head or tail that is not whole blocks (an image size that is not a multiple of 4096) goes
    through ``fd``, the page cache; they are other pages than the direct ones.

    Buffered writes only (``direct`` False) when O_DIRECT is refused: the reopen fails (EINVAL:
    a filesystem without O_DIRECT), or a direct write fails with EINVAL (then that write is done
    again through ``fd``, and so are all later ones).  Nothing changes but the way the bytes go:
    the caller still fsyncs ``fd`` (which flushes the device's cache too) before reporting success.
    """

    ordered = False

    def __init__(self, fd, path, align=DIRECT_ALIGN, direct=True):
        super().__init__()
        self.fd = fd
        self.path = path
        self.align = max(align, DIRECT_ALIGN)
        self.direct = False
        self.direct_refused = None  # why not O_DIRECT (strerror), when it was refused
        self._direct_fd = None
        self._local = threading.local()
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open("/proc/self/fd/%d" % fd, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                self.direct = True
            except OSError as exc:
                # EINVAL: no O_DIRECT on this filesystem.  Anything else (no /proc, a mode that does
                # not let us open the file again): the descriptor we have writes correctly anyway.
                self.direct_refused = exc.strerror

    @property
    def aligned_buffers(self):
        """Whether page-aligned buffers save a copy (copy_mapped then reads into mmap buffers)."""
        return self.direct

    def write(self, offset, data):
        view = memoryview(data)
        length = len(view)
        if self.direct:
            align = self.align
            start = -(-offset // align) * align
            end = (offset + length) // align * align
            if end > start:
                if start > offset:
                    pwrite_all(self.fd, view[:start - offset], offset, self.path)
                self._write_direct(start, view[start - offset:end - offset])
                if offset + length > end:
                    pwrite_all(self.fd, view[end - offset:], end, self.path)
                self.add(written=length)
                return
        pwrite_all(self.fd, view, offset, self.path)
        self.add(written=length)

    def _write_direct(self, offset, view):
        """``view`` (whole blocks) at ``offset`` (block-aligned) with O_DIRECT, else through ``fd``."""
        fd = self._direct_fd
        if self.direct and fd is not None:
            try:
                pwrite_all(fd, aligned(self._local, view), offset, self.path)
                return
            except TransferError as exc:
                if exc.details.get("errno") != errno.EINVAL:
                    raise
                # Opened with O_DIRECT but this write refused: the page cache, from now on.
                self.direct = False
                self.direct_refused = os.strerror(errno.EINVAL)
        pwrite_all(self.fd, view, offset, self.path)

    def close(self):
        """Close the O_DIRECT descriptor (``fd`` is the caller's)."""
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


class FileSink(DirectWrites):
    """A new sparse file: data written (O_DIRECT where possible), zero ranges left as holes."""

    zero_method = None

    def zero(self, offset, length):
        self.add(zero_skipped=length)


_LIBC = None


def _fallocate():
    global _LIBC  # pylint: disable=global-statement
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _LIBC = func
    return _LIBC


class DeviceSink(DirectWrites):
    """An existing block device: data written (O_DIRECT where possible), zero ranges zeroed, never skipped.

    Zeroing tries, in order and remembering what worked: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``
    (unmaps on thin LVs, zvols, loop devices; the kernel guarantees zeroes on read),
    ``BLKZEROOUT`` (the kernel writes zeroes itself when the device cannot), then plain
    zero-filled writes.  Unaligned heads and tails are written as zero bytes.
    """

    METHODS = ("punch_hole", "blkzeroout", "write")

    def __init__(self, fd, path, logical_block=512, direct=True):
        super().__init__(fd, path, logical_block, direct)
        self.logical_block = logical_block
        self.zero_method = None
        self._method_index = 0
        self._zero_buf = bytes(1 << 20)

    def _write_zero_bytes(self, offset, length):
        end = offset + length
        while offset < end:
            n = min(len(self._zero_buf), end - offset)
            pwrite_all(self.fd, memoryview(self._zero_buf)[:n], offset, self.path)
            offset += n

    def zero(self, offset, length):
        block = self.logical_block
        start = -(-offset // block) * block
        end = ((offset + length) // block) * block
        if end <= start:
            self._write_zero_bytes(offset, length)
        else:
            if start > offset:
                self._write_zero_bytes(offset, start - offset)
            self._zero_aligned(start, end - start)
            if offset + length > end:
                self._write_zero_bytes(end, offset + length - end)
        self.add(zero_written=length)

    def _zero_aligned(self, offset, length):
        while True:
            index = self._method_index
            method = self.METHODS[index]
            if method == "write":
                self._write_zero_bytes(offset, length)
                self.zero_method = method
                return
            try:
                if method == "punch_hole":
                    if _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                else:
                    fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
                self.zero_method = method
                return
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENODEV, errno.EBUSY,
                                 errno.ENOSYS, errno.EPERM):
                    with self.lock:
                        if self._method_index == index:
                            self._method_index = index + 1
                    continue
                raise TransferError("zeroing %d bytes at offset %d of %s (%s) failed: %s"
                                    % (length, offset, self.path, method, exc.strerror), offset=offset)


def copy(source, extents, sink, parallel, progress):
    """Copy the point's extents into ``sink``; return the transfer Stats."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import copy_extents

    def report(stats):
        progress.update(bytes_done=stats.bytes_read, zero_done=sink.zero_written)

    return copy_extents(source, extents, sink, parallel=parallel, chunk=DEFAULT_CHUNK, progress=report)[0]


# --------------------------------------------------------------------------------------------
# Block devices: who uses them


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text):
    """[{devno: 'MAJ:MIN', mountpoint, fstype, source}] from /proc/self/mountinfo text."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        if len(parts) < sep + 3:
            continue
        out.append(dict(devno=parts[2], mountpoint=_unescape(parts[4]), fstype=parts[sep + 1],
                        source=_unescape(parts[sep + 2])))
    return out


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _block_rdev(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def device_users(rdev, sys_root="/sys", mountinfo=None, swaps=None):
    """What uses the block device ``rdev`` or one of its partitions: mounts, swap, holders."""
    devnos = {"%d:%d" % (os.major(rdev), os.minor(rdev)): None}
    base = os.path.join(sys_root, "dev", "block", "%d:%d" % (os.major(rdev), os.minor(rdev)))
    real = os.path.realpath(base)
    names = {"%d:%d" % (os.major(rdev), os.minor(rdev)): os.path.basename(real)}
    sysdirs = {"%d:%d" % (os.major(rdev), os.minor(rdev)): real}
    try:
        entries = sorted(os.listdir(real))
    except OSError:
        entries = []
    for entry in entries:
        sub = os.path.join(real, entry)
        if os.path.isfile(os.path.join(sub, "partition")):
            devno = _read(os.path.join(sub, "dev")).strip()
            if devno:
                devnos[devno] = None
                names[devno] = entry
                sysdirs[devno] = sub
    users = []
    mounts = parse_mountinfo(_read("/proc/self/mountinfo") if mountinfo is None else mountinfo)
    rdevs = set()
    for devno in devnos:
        major, minor = (int(x) for x in devno.split(":"))
        rdevs.add(os.makedev(major, minor))
    for mount in mounts:
        by_source = mount["source"].startswith("/") and _block_rdev(mount["source"]) in rdevs
        if mount["devno"] in devnos or by_source:
            name = names.get(mount["devno"]) or mount["source"]
            users.append("%s is mounted on %s (%s)" % (name, mount["mountpoint"], mount["fstype"]))
    swap_text = _read("/proc/swaps") if swaps is None else swaps
    for line in swap_text.splitlines()[1:]:
        fields = line.split()
        if fields and _block_rdev(_unescape(fields[0])) in rdevs:
            users.append("%s is used as swap" % fields[0])
    for devno, sysdir in sorted(sysdirs.items()):
        try:
            holders = sorted(os.listdir(os.path.join(sysdir, "holders")))
        except OSError:
            holders = []
        for holder in holders:
            dm_name = _read(os.path.join(sysdir, "holders", holder, "dm", "name")).strip()
            users.append("%s is held by %s%s" % (names[devno], holder, " (%s)" % dm_name if dm_name else ""))
    return users


# --------------------------------------------------------------------------------------------
# Destinations


def nocache_flag():
    """LIBRADOS_OP_FLAG_FADVISE_NOCACHE (what rbd import and import-diff pass), or 0."""
    try:
        import rados  # pylint: disable=import-outside-toplevel
    except ImportError:
        return 0
    return getattr(rados, "LIBRADOS_OP_FLAG_FADVISE_NOCACHE", 0)


def _free_bytes(directory):
    """Bytes free for us in ``directory``'s filesystem, or None when it does not say (a ramfs
    reports no size at all: 0 blocks, 0 free)."""
    st = os.statvfs(directory)
    if not st.f_blocks:
        return None
    return st.f_bavail * st.f_frsize


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


class FileTarget:
    """A raw or qcow2 file, written to ``.<name>.partial`` beside it and renamed into place."""

    kind = "file"

    def __init__(self, path, fmt, force, mode):
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.force = force
        self.mode = mode
        self.directory = os.path.dirname(self.path)
        self.temp = os.path.join(self.directory, "." + os.path.basename(self.path) + PARTIAL_FILE_SUFFIX)
        self.replaced = False
        self._lock_fd = None

    def describe(self):
        return dict(type="file", path=self.path, format=self.fmt)

    def check(self):
        if not os.path.isdir(self.directory):
            raise InputError("the directory of %s does not exist" % self.path, path=self.path)
        if os.path.lexists(self.path):
            st = os.stat(self.path) if os.path.exists(self.path) else os.lstat(self.path)
            if stat.S_ISBLK(st.st_mode):
                raise InputError("%s is a block device: use device: instead of file:" % self.path, path=self.path)
            if stat.S_ISDIR(st.st_mode):
                raise InputError("%s is a directory; name the file to write" % self.path, path=self.path)
            if not self.force:
                raise ConflictError("%s already exists; set force: true to replace it" % self.path, path=self.path)
            self.replaced = True

    def check_space(self, needed):
        free = _free_bytes(self.directory)
        if free is not None and needed > free:
            raise InputError("%s needs about %s but only %s is free in %s"
                             % (self.path, _human(needed), _human(free), self.directory),
                             needed_bytes=needed, free_bytes=free)

    def open_temp(self):
        """Create (or take over from an interrupted run) the temporary file; hold an flock on it."""
        try:
            fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), self.mode)
        except OSError as exc:
            raise InputError("cannot create %s: %s" % (self.temp, exc.strerror), path=self.temp)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConflictError("another restore is writing %s (%s is locked)" % (self.path, self.temp),
                                path=self.temp)
        os.ftruncate(fd, 0)
        os.fchmod(fd, self.mode)
        self._lock_fd = fd
        return fd

    def commit(self):
        os.chmod(self.temp, self.mode)
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self.force and os.path.lexists(self.path):
            raise ConflictError("%s appeared during the restore; it was not replaced (force is false)" % self.path,
                                path=self.path)
        os.rename(self.temp, self.path)
        fsync_dir(self.directory)
        self._release()

    def abort(self):
        if self._lock_fd is not None:
            try:
                os.unlink(self.temp)
            except OSError:
                pass
        self._release()

    def _release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class DeviceTarget:
    """An existing block device, at least as large as the point."""

    kind = "device"

    def __init__(self, path, force):
        self.path = path
        self.force = force
        self.size = None
        self.users = []
        self.fd = None

    def describe(self):
        return dict(type="device", path=self.path, device_size=self.size)

    def check(self, point_size):
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise NotFoundError("device %s: %s" % (self.path, exc.strerror), path=self.path)
        if not stat.S_ISBLK(st.st_mode):
            raise InputError("%s is not a block device: use file: to write a file" % self.path, path=self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if self.size < point_size:
            raise InputError("device %s is too small: %d bytes (%s), the point is %d bytes (%s)"
                             % (self.path, self.size, _human(self.size), point_size, _human(point_size)),
                             path=self.path, device_size=self.size, point_size=point_size)
        self.users = device_users(st.st_rdev)
        if self.users and not self.force:
            raise ConflictError("device %s is in use: %s; unmount/deactivate it first (or set force: true to "
                                "overwrite it anyway)" % (self.path, "; ".join(self.users)),
                                path=self.path, users=self.users)

    def open(self):
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if not self.force:
            flags |= os.O_EXCL  # on a block device: EBUSY while mounted or claimed by dm/md/swap/another restore
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise ConflictError("device %s is in use (the kernel refused an exclusive open: mounted, part of "
                                    "LVM/dm/md, swap, or another restore); set force: true to overwrite it anyway"
                                    % self.path, path=self.path)
            raise InputError("cannot open %s: %s" % (self.path, exc.strerror), path=self.path)
        try:
            block = struct.unpack("=i", fcntl.ioctl(self.fd, BLKSSZGET, struct.pack("=i", 0)))[0]
        except OSError:
            block = 512
        return self.fd, max(block, 512)

    def finish(self):
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise TransferError("fsync of %s failed: %s" % (self.path, exc.strerror), path=self.path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------
# RBD destinations


def safety_snapshot_name(existing, when=None):
    return _naming.unique_managed_name(existing, prefix=SAFETY_PREFIX, when=when)


def _other_watchers(img, own_id=None):
    try:
        watchers = list(img.watchers_list())
    except Exception:  # pylint: disable=broad-except
        return []
    return ["%s (client.%s)" % (w.get("addr"), w.get("id")) for w in watchers if own_id is None or w.get("id") != own_id]


class RbdTarget:
    """A new image (under a temporary name, renamed at the end), a replaced one, or an in-place rollback."""

    kind = "rbd"

    def __init__(self, sess, image, in_place, force):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
        self._rbd = _rbd
        self.sess = sess
        self.image = _rbd.check_name("image", image)
        self.in_place = in_place
        self.force = force
        self.spec = _rbd.spec(sess.pool, image, sess.namespace)
        self.temp = image + PARTIAL_IMAGE_SUFFIX
        self.exists = False
        self.old_size = None
        self.snapshots = []
        self.safety_snapshot = None
        self.created = False
        self.replaced = False
        self.map_features = 0

    def describe(self):
        return dict(type="rbd", pool=self.sess.pool, namespace=self.sess.namespace, image=self.image, spec=self.spec,
                    in_place=self.in_place, replaced=self.replaced, created=self.created)

    def _open(self, name, read_only):
        rbd = self._rbd.rbd
        try:
            return rbd.Image(self.sess.ioctx, name, read_only=read_only)
        except rbd.ImageNotFound:
            return None
        except rbd.Error as exc:
            raise self._ceph_error("cannot open %s: %s" % (self._spec(name), exc))

    def _spec(self, name):
        return self._rbd.spec(self.sess.pool, name, self.sess.namespace)

    def _ceph_error(self, msg):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CephError
        return CephError(msg, image=self.spec)

    def check(self):
        img = self._open(self.image, read_only=True)
        if img is None:
            if self.in_place:
                raise NotFoundError("in_place rolls back an existing image, but %s does not exist (drop in_place "
                                    "to restore into a new image)" % self.spec, image=self.spec)
            return
        try:
            self.exists = True
            self.old_size = img.size()
            self.snapshots = [s["name"] for s in img.list_snaps()]
            watchers = _other_watchers(img)
        finally:
            img.close()
        if not self.force:
            raise ConflictError("image %s already exists; set force: true to %s" % (
                self.spec, "roll it back in place" if self.in_place else
                "replace it (or in_place: true with force: true to roll it back, keeping its snapshots)"),
                image=self.spec)
        if watchers:
            raise ConflictError("image %s is open by %s (a running VM?); stop it before %s" % (
                self.spec, ", ".join(watchers), "rolling it back" if self.in_place else "replacing it"),
                image=self.spec, watchers=watchers)
        if not self.in_place and self.snapshots:
            raise ConflictError("image %s has %d snapshot(s) (%s); replacing it would delete them: roll it back with "
                                "in_place: true instead (keeps them, takes a safety snapshot), or remove them first"
                                % (self.spec, len(self.snapshots), ", ".join(self.snapshots[:5])), image=self.spec)

    # -- a new (or replacing) image, written under a temporary name -------------------------------
    def create_temp(self, size):
        """Create the temporary image; one left by an interrupted restore (ours by its name) is
        replaced, unless a client has it open or it has snapshots (another restore is running)."""
        rbd = self._rbd.rbd
        try:
            rbd.RBD().create(self.sess.ioctx, self.temp, size, old_format=False)
            return
        except rbd.ImageExists:
            pass
        except rbd.Error as exc:
            raise self._ceph_error("cannot create %s: %s" % (self.temp, exc))
        leftover = self._open(self.temp, read_only=True)
        if leftover is not None:
            try:
                busy = _other_watchers(leftover)
                snaps = list(leftover.list_snaps())
            finally:
                leftover.close()
            if busy or snaps:
                raise ConflictError("%s exists and is %s: another restore to %s is running (or one was killed less "
                                    "than a minute ago and its client has not timed out yet; try again then)"
                                    % (self.temp, "open by " + ", ".join(busy) if busy else "snapshotted", self.spec),
                                    image=self.spec)
            self._remove(self.temp)
        try:
            rbd.RBD().create(self.sess.ioctx, self.temp, size, old_format=False)
        except rbd.Error as exc:
            raise self._ceph_error("cannot create %s: %s" % (self.temp, exc))

    def _remove(self, name):
        rbd = self._rbd.rbd
        try:
            rbd.RBD().remove(self.sess.ioctx, name)
        except rbd.ImageNotFound:
            pass
        except rbd.Error as exc:
            raise self._ceph_error("cannot remove %s: %s" % (self._spec(name), exc))

    def open_temp(self):
        """Open the temporary image, its object map (and fast-diff) off while it is written: every
        first write into an object would otherwise wait for an object map update, one more OSD
        operation (2 GiB, 2 cores: 1.05-1.23 s to write with it, 0.88-0.96 s without).
        ``finish_temp`` turns them back on and rebuilds the map (0.03 s for 2 GiB)."""
        rbd = self._rbd.rbd
        img = self._open(self.temp, read_only=False)
        if img is None:
            raise self._ceph_error("%s vanished while the restore was starting" % self.temp)
        try:
            features = img.features() & (rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
            if features:
                img.update_features(features, False)
                self.map_features = features
        except rbd.Error:
            pass  # not allowed, or not supported: written with its object map, only slower
        return img

    def finish_temp(self, img):
        """Turn the features ``open_temp`` turned off back on and rebuild the object map: the image
        ends with the features it was created with (the pool's defaults) and a valid object map."""
        rbd = self._rbd.rbd
        if not self.map_features:
            return
        try:
            img.update_features(self.map_features, True)
            img.rebuild_object_map()
        except rbd.Error as exc:
            raise self._ceph_error("cannot rebuild the object map of %s: %s" % (self.temp, exc))
        self.map_features = 0

    def publish_temp(self):
        rbd = self._rbd.rbd
        if self.exists:
            # Re-checked now: a VM may have been started meanwhile.
            img = self._open(self.image, read_only=True)
            if img is not None:
                try:
                    busy, snaps = _other_watchers(img), list(img.list_snaps())
                finally:
                    img.close()
                if busy or snaps:
                    raise ConflictError("image %s was opened or snapshotted during the restore; it was left as it "
                                        "was" % self.spec, image=self.spec)
                self._remove(self.image)
                self.replaced = True
        try:
            rbd.RBD().rename(self.sess.ioctx, self.temp, self.image)
        except rbd.Error as exc:
            raise self._ceph_error("cannot rename %s to %s: %s (the restored data is in %s)"
                                   % (self.temp, self.image, exc, self.temp))
        self.created = True

    def abort_temp(self):
        try:
            self._remove(self.temp)
        except SnapchainError:
            pass

    # -- in place ------------------------------------------------------------------------------
    def open_in_place(self, size):
        """Open read-write, take the exclusive lock and the safety snapshot, resize; return the image."""
        rbd = self._rbd.rbd
        img = self._open(self.image, read_only=False)
        if img is None:
            raise NotFoundError("image %s vanished" % self.spec, image=self.spec)
        try:
            own = self.sess.cluster.get_instance_id()
            busy = _other_watchers(img, own)
            if busy:
                raise ConflictError("image %s is open by %s (a running VM?); stop it before rolling it back"
                                    % (self.spec, ", ".join(busy)), image=self.spec, watchers=busy)
            if img.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
                try:
                    img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
                except rbd.Error as exc:
                    raise ConflictError("cannot take the exclusive lock of %s: %s" % (self.spec, exc),
                                        image=self.spec)
            names = [s["name"] for s in img.list_snaps()]
            self.safety_snapshot = safety_snapshot_name(names)
            try:
                img.create_snap(self.safety_snapshot)
            except rbd.Error as exc:
                self.safety_snapshot = None
                raise self._ceph_error("cannot take the safety snapshot of %s: %s" % (self.spec, exc))
            if img.size() != size:
                try:
                    img.resize(size)
                except rbd.Error as exc:
                    raise self._ceph_error("cannot resize %s from %d to %d bytes: %s (safety snapshot %s)"
                                           % (self.spec, img.size(), size, exc, self.safety_snapshot))
        except BaseException:
            img.close()
            raise
        return img


# --------------------------------------------------------------------------------------------
# The restore


def check_params(params):
    kinds = [k for k in ("rbd", "file", "device") if params.get(k)]
    if len(kinds) != 1:
        raise InputError("give exactly one destination: rbd, file or device (got %s)"
                         % (", ".join(kinds) if kinds else "none"))
    kind = kinds[0]
    if params.get("point") not in (None, "", "latest") and params.get("before"):
        raise InputError("give either point or before, not both")
    if params.get("in_place"):
        if kind != "rbd":
            raise InputError("in_place rolls back an RBD image: it needs an rbd destination, not %s" % kind)
        if not params.get("force"):
            raise InputError("in_place overwrites the image %s and needs force: true (a safety snapshot of its "
                             "current state is taken first and kept)" % params["rbd"].get("image"))
    if params.get("format") and kind != "file":
        raise InputError("format applies to a file destination only")
    if (params.get("format") or "raw") not in FORMATS:
        raise InputError("format must be one of %s" % ", ".join(FORMATS))
    parallel = params.get("parallel") or 4
    if not 1 <= parallel <= 64:
        raise InputError("parallel must be between 1 and 64, not %r" % parallel)
    if params.get("progress_file"):
        directory = os.path.dirname(os.path.abspath(params["progress_file"]))
        if not os.path.isdir(directory):
            raise InputError("the directory of progress_file %s does not exist" % params["progress_file"])
    return kind


def restore(params, check_mode=False):
    kind = check_params(params)
    before = parse_time(params["before"]) if params.get("before") else None
    repo, point, chain, skipped = load_chain(params["chain"], params.get("point"), before,
                                             params.get("allow_bad", False))
    result = dict(changed=True, chain=repo.disk_dir, point=point["name"], point_time=iso(point_time(point)),
                  point_info=dict((k, point.get(k)) for k in POINT_INFO_KEYS),
                  chain_depth=len(chain), size=point["size"], skipped_points=skipped,
                  before=iso(before) if before else None, safety_snapshot=None, warnings=[])
    if skipped:
        result["warnings"].append("skipped newer point(s) that are marked bad or read through a bad point: %s"
                                  % "; ".join(skipped))
    layer = repo.path(point["layer"])
    parallel = params.get("parallel") or 4
    progress_static = dict(point=point["name"], chain=repo.disk_dir)
    if kind == "rbd":
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
        dest = params["rbd"]
        with _rbd.session(params, dest["pool"], dest.get("namespace")) as sess:
            target = RbdTarget(sess, dest["image"], params.get("in_place", False), params.get("force", False))
            target.check()
            result["destination"] = target.describe()
            if check_mode:
                result["would"] = ("roll back %s in place (safety snapshot first)" % target.spec if target.in_place
                                   else ("replace %s" % target.spec if target.exists else "create %s" % target.spec))
                return result
            with Progress(params.get("progress_file"), destination=target.spec, **progress_static) as progress:
                _restore_rbd(target, layer, point, parallel, progress, result)
            result["destination"] = target.describe()
    elif kind == "file":
        fmt = params.get("format") or "raw"
        target = FileTarget(params["file"], fmt, params.get("force", False), parse_mode(params.get("mode") or "0600"))
        target.check()
        result["destination"] = target.describe()
        if check_mode:
            result["would"] = "%s %s (%s)" % ("replace" if target.replaced else "create", target.path, fmt)
            return result
        with Progress(params.get("progress_file"), destination=target.path, **progress_static) as progress:
            if fmt == "qcow2":
                _restore_qcow2(target, layer, point, parallel, progress, result)
            else:
                _restore_raw(target, layer, point, parallel, progress, result)
        result["destination"]["replaced"] = target.replaced
    else:
        target = DeviceTarget(params["device"], params.get("force", False))
        target.check(point["size"])
        result["destination"] = target.describe()
        if target.users:
            result["warnings"].append("force: overwriting %s although %s" % (target.path, "; ".join(target.users)))
        if target.size > point["size"]:
            result["warnings"].append("device %s is %d bytes larger than the point; the bytes past %d are left as "
                                      "they were" % (target.path, target.size - point["size"], point["size"]))
        if check_mode:
            result["would"] = "overwrite the first %d bytes of %s" % (point["size"], target.path)
            return result
        with Progress(params.get("progress_file"), destination=target.path, **progress_static) as progress:
            _restore_device(target, layer, point, parallel, progress, result)
    if not result["warnings"]:
        del result["warnings"]
    return result


class _PointReader:
    """qemu-nbd --read-only on the point's layer, an NbdPool, and the point's extents: the fallback
    for a chain that _qcow2_map does not read itself (compressed clusters, encryption...)."""

    name = "qemu-nbd"

    def __init__(self, layer, size, parallel):
        self.layer = layer
        self.server = None
        self.size = size
        self.parallel = parallel
        self.pool = None
        self.cache = None
        self._extents = None
        self.data_bytes = self.zero_bytes = None

    def _start(self, cache):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_nbd as _nbd
        self.server = _nbd.QemuNbd(self.layer, fmt="qcow2", read_only=True, shared=self.parallel, cache=cache,
                                   detect_zeroes="off")
        self.server.start()
        self.cache = cache

    def __enter__(self):
        # O_DIRECT (cache=none): a restore reads every layer once, and must not push the rest of
        # the host out of the page cache; measured as fast as the page cache here, and it keeps the
        # deep-chain penalty lower.  A file system without O_DIRECT (tmpfs) gets the page cache.
        try:
            self._start("none")
        except TransferError:
            self._start("writeback")
        try:
            self.pool = self.server.pool(self.parallel)
            if self.pool.size != self.size:
                raise RepositoryError("qemu-nbd serves %d bytes for %s but the point is %d bytes"
                                      % (self.pool.size, self.server.path, self.size))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def extents(self):
        return self.pool.block_status()

    def source(self):
        return NbdSource(self.pool)

    def measure(self):
        """Map the point: sets ``data_bytes`` and ``zero_bytes``."""
        self._extents = plan(self.extents())
        self.data_bytes, self.zero_bytes = total(self._extents, DATA), total(self._extents, ZERO)

    def copy(self, sink, parallel, progress):
        """Copy the point into ``sink``: (bytes read, write and zero operations)."""
        stats = copy(self.source(), self._extents, sink, parallel, progress)
        return stats.bytes_read, stats.extents

    def __exit__(self, exc_type, exc, tb):
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        try:
            self.server.stop()
        except TransferError:
            if exc_type is None:
                raise


class _MapReader:
    """The point read straight from its layer files (_qcow2_map.PointMap): no qemu-nbd, no socket."""

    name = "qcow2"

    def __init__(self, point_map):
        self.map = point_map
        self.data_bytes = self.zero_bytes = None

    def measure(self):
        """Map the whole point once (raises _qcow2_map.Unsupported before anything is written), and
        choose how to read each layer (page cache as it is, or read ahead and dropped behind)."""
        self.data_bytes, self.zero_bytes = self.map.scan()
        self.map.plan_reads()

    def copy(self, sink, parallel, progress):
        return copy_mapped(self.map, sink, parallel, progress)


@contextlib.contextmanager
def _open_reader(layer, size, parallel, result):
    """The reader of the point whose top layer is ``layer``, already measured (so that anything it does
    not handle shows before a byte is written): _MapReader when _qcow2_map can prove it reads the chain
    as QEMU does, else _PointReader (qemu-nbd).  Sets ``reader`` and ``reader_fallback`` in ``result``."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._qcow2 import reader as _qcow2_map
    reader = fallback = None
    try:
        reader = _MapReader(_qcow2_map.PointMap.open(layer))
        if reader.map.size != size:
            raise RepositoryError("layer %s is %d bytes but the point is %d bytes" % (layer, reader.map.size, size),
                                  path=layer)
        reader.measure()
    except _qcow2_map.Unsupported as exc:
        fallback = exc.msg
    except BaseException:
        if reader is not None:
            reader.map.close()
        raise
    if fallback is not None:
        if reader is not None:
            reader.map.close()
        result.update(reader=_PointReader.name, reader_fallback=fallback)
        with _PointReader(layer, size, parallel) as nbd:
            nbd.measure()
            yield nbd
        return
    result.update(reader=_MapReader.name, reader_fallback=None)
    try:
        yield reader
    finally:
        reader.map.close()


def copy_mapped(point_map, sink, parallel, progress, chunk=DEFAULT_CHUNK, zero_piece=ZERO_PIECE):
    """Copy every job of ``point_map`` into ``sink``; return (bytes read, write and zero operations).

    Two stages, so that reading (the disk) and writing (the network, librbd) overlap: READERS
    threads read ahead, in order; ``parallel`` writer threads write (``sink.write``, or
    ``sink.zero`` for zero ranges and all-zero data).  At most ``2 * parallel`` jobs are in
    flight.  Whole-chunk jobs are read into bytearrays taken from a pool and given back once
    written (a sink is done with the data when ``write`` returns: RbdSink waits for librbd),
    so memory is a fixed ``chunk`` x (jobs in flight + readers) whatever the image size, and is
    not allocated and faulted in again for every chunk (page faults are costly in VMs).

    A sink with ``aligned_buffers`` (one writing with O_DIRECT) gets page-aligned buffers
    instead: every job is read into a pooled anonymous mmap of ``chunk`` bytes and handed over
    as a memoryview of its first ``length`` bytes, so that it goes to the disk without a copy."""
    lock = threading.Lock()
    counts = [0, 0]
    pool = collections.deque()  # free whole-chunk buffers (deque append/pop are atomic)
    use_mmap = bool(getattr(sink, "aligned_buffers", False))

    def read(length, pieces):
        if use_mmap or length == chunk:
            try:
                buf = pool.pop()
            except IndexError:
                buf = mmap.mmap(-1, chunk) if use_mmap else bytearray(chunk)
        else:
            buf = bytearray(length)
        data = memoryview(buf)[:length] if use_mmap else buf
        point_map.read_into(pieces, data)
        if all_zero(data):
            release(buf)
            return None
        return buf, data

    def release(buf):
        if len(buf) == chunk:
            pool.append(buf)

    def write(offset, length, reading):
        got = None if reading is None else reading.result()
        if got is None:
            sink.zero(offset, length)
        else:
            sink.write(offset, got[1])
            release(got[0])
        with lock:
            counts[0] += 0 if reading is None else length
            counts[1] += 1

    def finish_one():
        window.popleft().result()
        with lock:
            done = counts[0]
        progress.update(bytes_done=done, zero_done=sink.zero_written)

    window = collections.deque()
    readers = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="snapchain-read")
    writers = concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="snapchain-write")
    failed = True
    try:
        for offset, length, pieces in point_map.jobs(chunk, zero_piece):
            reading = None if pieces is None else readers.submit(read, length, pieces)
            window.append(writers.submit(write, offset, length, reading))
            while len(window) >= 2 * parallel:
                finish_one()
        while window:
            finish_one()
        failed = False
    finally:
        # On a failure, reads and writes not started yet are dropped (a writer waiting for a
        # dropped read ends at once); the ones running end on their own.
        if failed:
            readers.shutdown(wait=False, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=failed)
        readers.shutdown(wait=True)
    return counts[0], counts[1]


def _transfer(reader, sink, parallel, progress, result, zero_needed):
    progress.set_phase("writing", bytes_total=reader.data_bytes, zero_total=reader.zero_bytes if zero_needed else 0)
    bytes_read, operations = reader.copy(sink, parallel, progress)
    result.update(bytes_read=bytes_read, bytes_written=sink.written, zero_bytes_written=sink.zero_written,
                  zero_bytes_skipped=sink.zero_skipped, zero_method=sink.zero_method, extents=operations)


def _finish_stats(result, started):
    seconds = time.monotonic() - started
    result["seconds"] = round(seconds, 3)
    result["mb_per_s"] = round((result.get("bytes_read") or 0) / 1e6 / seconds, 1) if seconds > 0 else None


def _fill_image(img, layer, size, parallel, progress, result, existing):
    """Copy the point into the open image ``img`` and flush it.  ``existing`` (in place): zero
    ranges are written as zeroes too, since the image holds old data there."""
    progress.set_phase("mapping")
    with _open_reader(layer, size, parallel, result) as reader:
        _transfer(reader, RbdSink(img, existing, nocache_flag()), parallel, progress, result, existing)
    progress.set_phase("flushing")
    img.flush()


def _restore_rbd(target, layer, point, parallel, progress, result):
    started = time.monotonic()
    size = point["size"]
    # Big sequential writes gain nothing from the librbd cache (rbd import disables it too); without
    # it, librbd may send RbdSink's buffers as they are (zero copy) instead of copying each first.
    for name, value in (("rbd_cache", "false"), ZERO_COPY_CONF):
        try:
            target.sess.cluster.conf_set(name, value)
        except Exception:  # pylint: disable=broad-except
            pass
    if target.in_place:
        progress.set_phase("preparing")
        img = target.open_in_place(size)
        result["safety_snapshot"] = target.safety_snapshot
        result["resized_from"] = target.old_size if target.old_size != size else None
        try:
            try:
                _fill_image(img, layer, size, parallel, progress, result, existing=True)
            finally:
                img.close()  # releases the exclusive lock
        except SnapchainError as exc:
            exc.msg += (" -- the image is partly rolled back; its state before the restore is in the safety "
                        "snapshot %s (rbd snap rollback %s@%s)" % (target.safety_snapshot, target.spec,
                                                                   target.safety_snapshot))
            exc.details["safety_snapshot"] = target.safety_snapshot
            raise
        _finish_stats(result, started)
        return
    progress.set_phase("preparing")
    target.create_temp(size)
    try:
        img = target.open_temp()
        try:
            _fill_image(img, layer, size, parallel, progress, result, existing=False)
            target.finish_temp(img)
        finally:
            img.close()
        progress.set_phase("renaming")
        target.publish_temp()
    except BaseException:
        target.abort_temp()
        raise
    _finish_stats(result, started)


def _direct_result(sink, result):
    """Say in the result whether the data went to the disk with O_DIRECT, and if not, why."""
    result.update(direct_io=sink.direct, direct_io_refused=sink.direct_refused)


def _restore_raw(target, layer, point, parallel, progress, result):
    started = time.monotonic()
    size = point["size"]
    fd = target.open_temp()
    try:
        os.ftruncate(fd, size)
        progress.set_phase("mapping")
        with _open_reader(layer, size, parallel, result) as reader, FileSink(fd, target.temp) as sink:
            target.check_space(reader.data_bytes)
            _transfer(reader, sink, parallel, progress, result, False)
            _direct_result(sink, result)
        progress.set_phase("syncing")
        target.commit()
    except BaseException:
        target.abort()
        raise
    _finish_stats(result, started)


_CONVERT_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _restore_qcow2(target, layer, point, parallel, progress, result):
    """``qemu-img convert -O qcow2`` of the point (zeroes stay unallocated), with its progress.

    ``-W -t none`` (out-of-order writes, O_DIRECT) where the filesystem takes O_DIRECT: as for
    a raw file, the page cache costs more than the copy on a virtualised host.
    """
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import command_error
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import _child_setup, usable_cache_mode
    started = time.monotonic()
    measured = _qemu_img.measure(src=layer, src_fmt="qcow2", out_fmt="qcow2", force_share=False)
    needed = int(measured.get("required") or 0)
    target.check_space(needed)
    target.open_temp()
    try:
        progress.set_phase("writing", bytes_total=needed, zero_total=0)
        cache = usable_cache_mode("none", os.path.dirname(target.temp) or ".")
        argv = _qemu_img.convert_argv(layer, target.temp, src_fmt="qcow2", dst_fmt="qcow2", out_of_order=True,
                                      coroutines=min(parallel, 16), cache=cache, progress=True)
        proc = _qemu_img.QEMU_IMG.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        preexec_fn=_child_setup(os.getpid()))
        err_chunks = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        buf = b""
        while True:
            piece = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
            if not piece:
                break
            buf = (buf + piece)[-256:]
            found = _CONVERT_PROGRESS.findall(buf)
            if found:
                progress.update(bytes_done=int(needed * float(found[-1]) / 100.0))
        rc = proc.wait()
        reader.join()
        if rc != 0:
            stderr = b"".join(err_chunks).decode("utf-8", "replace")
            raise command_error("qemu-img convert of point %s failed (rc=%d): %s"
                                % (point["name"], rc, _qemu_img.tail(stderr)), argv, rc=rc, stderr=stderr)
        _qemu_img.check(target.temp)
        progress.set_phase("syncing")
        target.commit()
    except BaseException:
        target.abort()
        raise
    written = os.stat(target.path).st_blocks * 512
    result.update(bytes_read=None, bytes_written=written, zero_bytes_written=0, zero_bytes_skipped=None,
                  zero_method=None, extents=None)
    _finish_stats(result, started)
    result["mb_per_s"] = round(written / 1e6 / result["seconds"], 1) if result["seconds"] > 0 else None


def _restore_device(target, layer, point, parallel, progress, result):
    started = time.monotonic()
    size = point["size"]
    fd, block = target.open()
    try:
        progress.set_phase("mapping")
        with _open_reader(layer, size, parallel, result) as reader, DeviceSink(fd, target.path, block) as sink:
            _transfer(reader, sink, parallel, progress, result, True)
            _direct_result(sink, result)
        progress.set_phase("syncing")
        target.finish()
    finally:
        target.close()
    _finish_stats(result, started)
