# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A raw file or block device as a backup source (an LVM/ZFS snapshot, a ploop image's data...).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

There is no diff to go by: the changed extents are unknown, so the copy engine reads the whole
source and compares each block's digest with the parent point's (``digest_scan``), except the holes
of a sparse file, which read as zeroes and are not read.  The caller
provides the point in time (the path is a snapshot); this source takes none and leaves nothing.
"""

from __future__ import annotations

import os
import stat

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import hole_extents
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source, size_change


class RawSource(Source):
    """A local raw file or block device, read with os.pread from many threads.

    The size comes from ``lseek(SEEK_END)``, which works for block devices
    (``st_size`` of a device node is 0).
    """

    exact_extents = False

    def __init__(self, path):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise NotFoundError("source %s does not exist" % path, path=path)
        except OSError as exc:
            raise InputError("cannot open source %s: %s" % (path, exc.strerror), path=path)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                self.kind = "file"
            elif stat.S_ISBLK(mode):
                self.kind = "block_device"
            else:
                raise InputError("source %s is neither a regular file nor a block device" % path, path=path)
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = path

    def identity(self):
        return dict(type=self.kind, path=os.path.abspath(self.path))

    def base_problem(self, point):
        return size_change(point, self.size)

    def read(self, offset, length):
        parts = []
        got = 0
        while got < length:
            try:
                piece = os.pread(self.fd, length - got, offset + got)
            except OSError as exc:
                raise TransferError("read of %s at offset %d failed: %s" % (self.path, offset + got, exc.strerror),
                                    path=self.path, offset=offset + got)
            if not piece:
                raise TransferError("short read of %s at offset %d: the source ends there (did it shrink "
                                    "during the backup?)" % (self.path, offset + got), path=self.path,
                                    offset=offset + got)
            parts.append(piece)
            got += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def copy(self, sink, parent, base, pending, parallel):
        out = super().copy(sink, parent, base, pending, parallel)
        self.after_copy()
        return out

    def after_copy(self):
        if self.current_size() != self.size:
            raise TransferError("source %s changed size during the backup (%d, now %d bytes): not a snapshot?"
                                % (self.path, self.size, self.current_size()), path=self.path)

    def zero_extents(self, offset, length):
        """The holes of a sparse file (SEEK_DATA/SEEK_HOLE): the digest scan does not read them.  A block
        device says nothing here (its holes, if any, are the device's business)."""
        if self.kind != "file":
            return []
        return hole_extents(self.fd, offset, min(length, self.size - offset))

    def current_size(self):
        return os.lseek(self.fd, 0, os.SEEK_END)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
