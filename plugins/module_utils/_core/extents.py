# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One extent type shared by every source and target.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

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
