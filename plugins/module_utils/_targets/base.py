# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restore Target interface, and what the sinks of the file and device targets share.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A Target is one destination of a restore.  The restore (_engine.restore.restore) makes one from the
module's options with ``Target.from_params`` (chosen by a table, never an if/elif on kinds) and runs
one flow with it::

    with target:                       # resources the checks need (an RBD session); released at the end
        target.check(point)            # EVERY validation, before anything changes; fills target.warnings
        target.describe()              # -> result["destination"]
        target.would(point)            # check mode: what it would do, nothing is written
        sink = target.open(point, layer)   # creates/opens the destination (temp file or image, safety
                                       #   snapshot, device open): from here on, something has changed
        <copy>                         # reads_point: the flow reads the point and writes it into the
                                       #   sink (write/zero, see below), calling target.check_space(data
                                       #   bytes) once the point is mapped; else target.convert(...) copies
        target.commit()                # flush/fsync, rename into place: the restore is complete
        target.abort(exc)              # on ANY error after open (and on interruption): removes what open
                                       #   made that is ours, closes what it opened, may add to exc's message
        target.report()                # what it adds to the result (safety snapshot, O_DIRECT use...)

A sink (SinkCounters) takes ``write(offset, data)`` from many threads at once (``data`` is the
caller's buffer, theirs again once write returns), ``zero(offset, length)`` (written as zeroes where
the destination held data before, else counted as skipped), counts ``written``, ``zero_written``,
``zero_skipped``, and says ``zero_method``.  ``aligned_buffers`` (optional) asks for page-aligned
buffers (a sink writing with O_DIRECT).

Adding a target: one class here (or in a new module of this package) implementing the methods
above, and one line in _engine.restore.TARGETS.
"""

from __future__ import annotations

import errno
import os
import threading

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import DIRECT_ALIGN, aligned, pwrite_all


class Target:
    """The interface (see the module docstring); defaults for what most targets do not need."""

    kind = None          # result["destination"]["type"]
    reads_point = True   # the flow reads the point into open()'s sink; False: convert() copies it
    zero_needed = False  # zero ranges must be written (the destination holds old data there)
    commit_phase = "syncing"  # the progress phase while commit() runs
    source_format = "qcow2"  # of the file open()/convert() get: a chain's layer, or raw (a mirror's point)

    def __init__(self):
        self.warnings = []

    @classmethod
    def from_params(cls, params):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return None

    @property
    def label(self):
        """The destination as the progress file names it."""
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def check(self, point):
        raise NotImplementedError

    def would(self, point):
        raise NotImplementedError

    def check_space(self, needed):
        """Refuse before the first write when ``needed`` bytes cannot fit; no limit by default."""

    def open(self, point, layer):
        raise NotImplementedError

    def convert(self, layer, point, parallel, progress, result):
        raise NotImplementedError

    def commit(self):
        raise NotImplementedError

    def abort(self, exc):
        raise NotImplementedError

    def report(self):
        return {}


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


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)
