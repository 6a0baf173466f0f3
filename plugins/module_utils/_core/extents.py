# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One extent type shared by every source and target.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import os
from collections import namedtuple

DATA = "data"
ZERO = "zero"


class Extent(namedtuple("Extent", ["offset", "length", "kind"])):
    """A byte range of a disk: ``kind`` is DATA (read it) or ZERO (it reads as zeroes)."""

    __slots__ = ()

    def __new__(cls, offset, length, kind=DATA):
        if kind not in (DATA, ZERO):
            raise ValueError("extent kind must be %r or %r, not %r" % (DATA, ZERO, kind))
        if offset < 0 or length < 0:
            raise ValueError("extent offset and length must be >= 0")
        return super().__new__(cls, offset, length, kind)

    @property
    def end(self):
        return self.offset + self.length


def merge(extents):
    """Sort extents and merge adjacent or overlapping ones of the same kind.

    Overlaps between different kinds are resolved in favour of the later one
    in the input order is NOT attempted: sources never produce them, and this
    raises ValueError if they appear.
    """
    out = []
    for ext in sorted(extents, key=lambda e: (e.offset, e.length)):
        if ext.length == 0:
            continue
        if out and ext.offset <= out[-1].end:
            last = out[-1]
            if ext.kind != last.kind:
                if ext.offset < last.end:
                    raise ValueError("overlapping extents of different kinds at %d" % ext.offset)
                out.append(ext)
                continue
            out[-1] = Extent(last.offset, max(last.end, ext.end) - last.offset, last.kind)
        else:
            out.append(ext)
    return out


def split(extents, max_length):
    """Cut extents into pieces of at most ``max_length`` bytes (data only; zero extents stay whole)."""
    if max_length <= 0:
        raise ValueError("max_length must be > 0")
    for ext in extents:
        if ext.kind == ZERO:
            yield ext
            continue
        off = ext.offset
        while off < ext.end:
            n = min(max_length, ext.end - off)
            yield Extent(off, n, DATA)
            off += n


def clip(extents, size):
    """Drop or shorten extents so none reaches past ``size``."""
    for ext in extents:
        if ext.offset >= size:
            continue
        if ext.end > size:
            ext = Extent(ext.offset, size - ext.offset, ext.kind)
        yield ext


def total(extents, kind=None):
    return sum(e.length for e in extents if kind is None or e.kind == kind)


def block_span(index, block_size, size):
    """(offset, length) of block ``index`` of a ``size``-byte disk (the last block may be short)."""
    offset = index * block_size
    return offset, max(0, min(block_size, size - offset))


def zero_blocks(extents, blocks, block_size, size):
    """Those of ``blocks`` (ascending) wholly inside ZERO extents (sorted, merged, non-overlapping)."""
    zeros = [e for e in extents if e.kind == ZERO]
    out = []
    i = 0
    for index in blocks:
        offset, length = block_span(index, block_size, size)
        end = offset + length
        while i < len(zeros) and zeros[i].end <= offset:
            i += 1
        # zero extents are merged: a block is covered when one extent spans it
        if i < len(zeros) and zeros[i].offset <= offset and zeros[i].end >= end:
            out.append(index)
    return out


def fill(extents, size, kind=DATA):
    """``extents`` (sorted, not overlapping, inside [0, size)) with every gap between them in [0, size)
    as an extent of ``kind``: the whole disk, in order (the holes of a sparse file and its data)."""
    out = []
    pos = 0
    for ext in extents:
        if ext.offset > pos:
            out.append(Extent(pos, ext.offset - pos, kind))
        out.append(ext)
        pos = ext.end
    if pos < size:
        out.append(Extent(pos, size - pos, kind))
    return out


def hole_extents(fd, offset, length):
    """ZERO extents of the holes of a (sparse) file in [offset, offset+length) via SEEK_DATA/SEEK_HOLE."""
    end = offset + length
    out = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end of the file
            data = end
        data = min(data, end)
        if data > pos:
            out.append(Extent(pos, data - pos, ZERO))
        if data >= end:
            break
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
    return out
