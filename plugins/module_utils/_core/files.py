# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small file-system helpers shared by the modules that write files durably.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, LockedError, TransferError


def fsync_dir(path):
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_mode(value, what="mode"):
    """An octal mode string such as ``'0700'`` -> int, or InputError naming the option."""
    try:
        mode = int(str(value), 8)
    except ValueError:
        raise InputError("%s %r is not an octal mode like '0700'" % (what, value))
    if mode & ~0o7777:
        raise InputError("%s %r is out of range" % (what, value))
    return mode


def pwrite_all(fd, data, offset, path):
    """Write all of ``data`` at ``offset`` (short writes continued); TransferError with ``offset`` and ``errno``."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        try:
            n = os.pwrite(fd, view[pos:], offset + pos)
        except OSError as exc:
            raise TransferError("write of %d bytes at offset %d to %s failed: %s"
                                % (len(view) - pos, offset + pos, path, exc.strerror),
                                offset=offset + pos, errno=exc.errno)
        if n <= 0:
            raise TransferError("write to %s at offset %d wrote nothing" % (path, offset + pos), offset=offset + pos)
        pos += n


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of this
ALIGNED_BUFFER = 4 << 20  # the smallest per-thread aligned buffer


def address(data):
    """The address of a writable buffer's first byte, or None (read-only, like bytes, or empty)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return None


def aligned(local, data, padded=None):
    """``data`` as a page-aligned memoryview that O_DIRECT takes, zero-padded to ``padded`` bytes.

    ``data`` itself when it is aligned already and needs no padding (a view of an mmap), else a
    copy in this thread's page-aligned buffer (``local.buf``, an anonymous mmap kept for the next call).
    """
    view = memoryview(data)
    length = len(view)
    padded = length if padded is None else padded
    if padded == length:
        where = address(view)
        if where is not None and where % DIRECT_ALIGN == 0:
            return view
    buf = getattr(local, "buf", None)
    if buf is None or len(buf) < padded:
        if buf is not None:
            buf.close()
        buf = local.buf = mmap.mmap(-1, max(padded, ALIGNED_BUFFER))  # anonymous mmaps are page-aligned
    buf[:length] = view
    if padded != length:
        buf[length:padded] = bytes(padded - length)
    return memoryview(buf)[:padded]


_MEMCMP = None


def _memcmp():
    global _MEMCMP  # pylint: disable=global-statement
    if _MEMCMP is None:
        func = ctypes.CDLL(None).memcmp
        func.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        func.restype = ctypes.c_int
        _MEMCMP = func
    return _MEMCMP


def _byte_address(view):
    """The address of a C-contiguous byte view's first byte without a copy, or None."""
    where = address(view)
    if where is None and isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
        where = ctypes.cast(ctypes.c_char_p(view.obj), ctypes.c_void_p).value
    return where


def all_zero(data):
    """True when the bytes-like ``data`` (bytes, bytearray, mmap, any memoryview) holds only zero bytes.

    The one all-zero check of the collection.  After its first and last byte (most data blocks
    stop there), the buffer is compared with itself shifted by one byte: ``memcmp(p, p + 1, n - 1)``
    is 0 exactly when every byte equals the next, and the first one is zero.  That reads the
    buffer once and no zero buffer at all: ~40-80 GB/s here, twice ``data == bytes(n)``, and a
    hundred times ``==`` on a memoryview, which CPython compares item by item under the GIL.  A
    read-only view of part of an object (no address to take) is copied first.
    """
    view = data if isinstance(data, memoryview) else memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    length = len(view)
    if not length or view[0] or view[length - 1]:
        return not length
    where = _byte_address(view)
    if where is None:
        view = memoryview(view.tobytes())  # this local keeps the copy alive until memcmp returns
        where = _byte_address(view)
    return _memcmp()(where, where + 1, length - 1) == 0


def write_file(path, data, mode):
    """Write and fsync ``path`` (created with exactly ``mode``; replaced if it exists).

    ``data``: bytes-like, or an iterable of bytes-like pieces written in turn.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        for piece in pieces:
            view = memoryview(piece)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path, data, mode, temp=None):
    """Replace ``path`` durably and atomically: ``data`` written and fsynced to ``temp`` (default: a
    name beside it), renamed over ``path``, the directory fsynced.  A reader sees the old file or the
    new one, never a mix."""
    temp = temp or "%s.%d.tmp" % (path, os.getpid())
    write_file(temp, data, mode)
    os.rename(temp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path, doc, mode=0o600):
    """Replace ``path`` with the JSON ``doc`` (``replace_file``); a temporary file left by a failure
    is removed."""
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        replace_file(path, data, mode, temp=tmp)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise TransferError("cannot write %s: %s" % (path, exc), path=path)


def lock_or_fail(path, message, **details):
    """An exclusive ``flock`` on ``path`` (created 0600), without waiting: its fd (closing it releases
    the lock), or LockedError(``message``) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockedError(message, path=path, **details)
        raise
    return fd
