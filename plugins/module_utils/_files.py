# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small file-system helpers shared by the modules that write files durably.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._errors import InputError, TransferError


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
