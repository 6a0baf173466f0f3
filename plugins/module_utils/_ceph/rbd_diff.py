# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reader and writer of Ceph's ``rbd diff v1`` stream format.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

This is the format ``rbd export-diff`` writes and ``rbd import-diff`` reads
(Ceph ``doc/dev/rbd-diff.rst``; ``src/tools/rbd/action/Export.cc`` and
``Import.cc``).  All integers are little-endian::

    b"rbd diff v1\\n"                      banner
    b"f" le32 len, name                    from-snap   (only with --from-snap)
    b"t" le32 len, name                    to-snap     (only for image@snap)
    b"s" le64 size                         image size at the end point
    b"w" le64 offset, le64 length, data    written range
    b"z" le64 offset, le64 length          zeroed / discarded range
    b"e"                                   end, always last

``rbd export-diff`` always writes the metadata in the order f, t, s (f and t
only when there is such a snapshot, s always), then the w/z records in
ascending offset order, then e.  It turns a range whose data reads as all
zeroes into a ``z`` record (see ``DiffWriter(detect_zeroes=True)``).
``rbd import-diff`` caps snapshot names at 4096 bytes; so do we.

``DiffWriter`` is stricter than the format: its w/z records must be
non-overlapping and in ascending offset order, which is what ``rbd
export-diff`` produces.  ``DiffReader`` accepts any order, as ``rbd
import-diff`` does, unless asked for ``require_ascending=True``.

Every malformed stream raises ``DiffFormatError`` with the byte offset in the
stream (``details["offset"]``); nothing here fails a module.
"""

from __future__ import annotations

import struct

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import DiffFormatError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero

BANNER = b"rbd diff v1\n"
BANNER_V2 = b"rbd diff v2\n"

TAG_FROM_SNAP = b"f"
TAG_TO_SNAP = b"t"
TAG_SIZE = b"s"
TAG_WRITE = b"w"
TAG_ZERO = b"z"
TAG_END = b"e"

MAX_SNAP_NAME = 4096
DEFAULT_MAX_CHUNK = 4 * 1024 * 1024
MAX_U64 = (1 << 64) - 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U64X2 = struct.Struct("<QQ")

_META_TAGS = {TAG_FROM_SNAP: "from-snap", TAG_TO_SNAP: "to-snap", TAG_SIZE: "size"}

# Writer states
_NEW, _OPEN, _ENDED, _BROKEN = "new", "open", "ended", "broken"


def _encode_name(name, what):
    if isinstance(name, str):
        raw = name.encode("utf-8", "surrogateescape")
    elif isinstance(name, (bytes, bytearray)):
        raw = bytes(name)
    else:
        raise DiffFormatError("%s snapshot name must be a string, not %s" % (what, type(name).__name__))
    if not raw:
        raise DiffFormatError("%s snapshot name must not be empty (pass None for no %s record)" % (what, what))
    if len(raw) > MAX_SNAP_NAME:
        raise DiffFormatError(
            "%s snapshot name is %d bytes long, rbd import-diff accepts at most %d" % (what, len(raw), MAX_SNAP_NAME))
    return raw


def _decode_name(raw):
    return raw.decode("utf-8", "surrogateescape")


def _byte_view(data):
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


class DiffWriter:
    """Write an ``rbd diff v1`` stream to a binary file object.

    Call ``header()`` once, then ``write()``/``write_data()``/``zero()`` for
    each changed range in ascending, non-overlapping offset order, then
    ``end()``.  The writer never closes ``fileobj``.  Zero-length ranges are
    skipped (rbd never writes them).  With ``detect_zeroes=True`` a
    ``write()`` whose data is all zeroes becomes a ``z`` record, as in
    ``rbd export-diff``.

    Misuse (bad order, range past the image size, records after ``end()``)
    raises ``DiffFormatError`` before anything is written for that call; a
    ``write_data()`` whose chunks do not add up to ``length`` leaves a corrupt
    stream, and the writer refuses any further call.
    """

    def __init__(self, fileobj, detect_zeroes=False):
        self._f = fileobj
        self._detect_zeroes = detect_zeroes
        self._state = _NEW
        self._size = None
        self._next_offset = 0
        self.position = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self.record_count = 0

    @property
    def size(self):
        return self._size

    @property
    def ended(self):
        return self._state == _ENDED

    def _emit(self, data):
        self._f.write(data)
        self.position += len(data)

    def _fail(self, msg, **details):
        details.setdefault("offset", self.position)
        raise DiffFormatError(msg, **details)

    def _check_open(self, what):
        if self._state == _NEW:
            self._fail("rbd diff writer: %s before header()" % what)
        if self._state == _ENDED:
            self._fail("rbd diff writer: %s after end()" % what)
        if self._state == _BROKEN:
            self._fail("rbd diff writer: %s after an earlier failure left the stream corrupt" % what)

    def header(self, *, size, from_snap=None, to_snap=None):
        """Write the banner and the metadata records f, t, s (in rbd's order)."""
        if self._state != _NEW:
            self._fail("rbd diff writer: header() called twice")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_U64:
            self._fail("rbd diff writer: image size must be an integer in 0..2^64-1, not %r" % (size,))
        parts = [BANNER]
        if from_snap is not None:
            raw = _encode_name(from_snap, "from")
            parts += [TAG_FROM_SNAP, _U32.pack(len(raw)), raw]
        if to_snap is not None:
            raw = _encode_name(to_snap, "to")
            parts += [TAG_TO_SNAP, _U32.pack(len(raw)), raw]
        parts += [TAG_SIZE, _U64.pack(size)]
        self._emit(b"".join(parts))
        self._size = size
        self._state = _OPEN

    def _check_range(self, offset, length, what):
        self._check_open(what)
        for name, value in (("offset", offset), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self._fail("rbd diff writer: %s %s must be a non-negative integer, not %r" % (what, name, value))
        if offset + length > self._size:
            self._fail("rbd diff writer: %s %d~%d ends past the image size %d" % (what, offset, length, self._size),
                       extent_offset=offset, extent_length=length, size=self._size)
        if offset < self._next_offset:
            self._fail("rbd diff writer: %s at %d overlaps or precedes the previous record, which ends at %d "
                       "(records must be ascending and non-overlapping)" % (what, offset, self._next_offset),
                       extent_offset=offset, extent_length=length)

    def write(self, offset, data):
        """Write one ``w`` record holding ``data`` (bytes-like) at image ``offset``."""
        view = _byte_view(data)
        length = len(view)
        self._check_range(offset, length, "write")
        if length == 0:
            return
        if self._detect_zeroes and all_zero(view):
            self._zero_record(offset, length)
            return
        self._emit(TAG_WRITE + _U64X2.pack(offset, length))
        self._emit_view(view)
        self._next_offset = offset + length
        self.data_bytes += length
        self.record_count += 1

    def _emit_view(self, view):
        self._f.write(view)
        self.position += len(view)

    def write_data(self, offset, length, chunks):
        """Write one ``w`` record of ``length`` bytes taken from the iterable ``chunks``.

        Streams big ranges without joining them.  The chunks must add up to
        exactly ``length`` bytes; otherwise DiffFormatError, and the stream is
        left corrupt (the writer refuses further calls).
        """
        self._check_range(offset, length, "write")
        if length == 0:
            for chunk in chunks:
                if len(_byte_view(chunk)):
                    self._fail("rbd diff writer: write_data got data for a zero-length record")
            return
        self._emit(TAG_WRITE + _U64X2.pack(offset, length))
        done = 0
        try:
            for chunk in chunks:
                view = _byte_view(chunk)
                if done + len(view) > length:
                    self._state = _BROKEN
                    self._fail("rbd diff writer: write_data at %d got more than the announced %d bytes"
                               % (offset, length), extent_offset=offset, extent_length=length)
                self._emit_view(view)
                done += len(view)
        except BaseException:
            self._state = _BROKEN
            raise
        if done != length:
            self._state = _BROKEN
            self._fail("rbd diff writer: write_data at %d got %d bytes, announced %d; the stream is corrupt"
                       % (offset, done, length), extent_offset=offset, extent_length=length)
        self._next_offset = offset + length
        self.data_bytes += length
        self.record_count += 1

    def zero(self, offset, length):
        """Write one ``z`` record: ``length`` bytes at ``offset`` read as zeroes."""
        self._check_range(offset, length, "zero")
        if length == 0:
            return
        self._zero_record(offset, length)

    def _zero_record(self, offset, length):
        self._emit(TAG_ZERO + _U64X2.pack(offset, length))
        self._next_offset = offset + length
        self.zero_bytes += length
        self.record_count += 1

    def end(self):
        """Write the final ``e`` record.  The file object stays open."""
        self._check_open("end()")
        self._emit(TAG_END)
        self._state = _ENDED


class DiffReader:
    """Parse an ``rbd diff v1`` stream from a binary file object.

    The banner and the metadata records are read by the constructor, so
    ``from_snap``, ``to_snap`` (str or None) and ``size`` are available at
    once.  ``records()`` then yields ``(Extent, data)`` pairs: ``data`` is
    bytes for a DATA extent and None for a ZERO extent.  A ``w`` record is
    never held whole in memory: it comes as consecutive DATA extents of at most
    ``max_chunk`` bytes.  A ``z`` record comes as one ZERO extent.
    Zero-length records yield nothing.

    Checks: banner, truncation anywhere, unknown tags, duplicate metadata,
    metadata after data, a missing size record, ranges past the image size,
    a missing ``e`` and (unless ``allow_trailing``) bytes after it; with
    ``require_ascending`` also records that overlap or go backwards.
    """

    def __init__(self, fileobj, max_chunk=DEFAULT_MAX_CHUNK, allow_trailing=False, require_ascending=False):
        if not isinstance(max_chunk, int) or max_chunk <= 0:
            raise ValueError("max_chunk must be a positive integer")
        self._f = fileobj
        self._max_chunk = max_chunk
        self._allow_trailing = allow_trailing
        self._require_ascending = require_ascending
        self.position = 0
        self.from_snap = None
        self.to_snap = None
        self.size = None
        self.ended = False
        self.data_bytes = 0
        self.zero_bytes = 0
        self.record_count = 0
        self._started = False
        self._pending_tag = None
        self._read_header()

    # -- low level -------------------------------------------------------

    def _fail(self, msg, offset=None, **details):
        if offset is None:
            offset = self.position
        raise DiffFormatError("malformed rbd diff stream at byte %d: %s" % (offset, msg), offset=offset, **details)

    def _read_upto(self, n):
        """Read up to ``n`` bytes, looping over short reads; fewer only at EOF."""
        parts = []
        got = 0
        while got < n:
            piece = self._f.read(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.position += len(data)
        return bytes(data)

    def _read_exact(self, n, what, start):
        data = self._read_upto(n)
        if len(data) != n:
            self._fail("truncated %s: expected %d bytes, the stream ends after %d" % (what, n, len(data)),
                       offset=start)
        return data

    def _read_tag(self):
        """Return ``(tag, its offset in the stream)``; tag is b"" at EOF."""
        if self._pending_tag is not None:
            pending, self._pending_tag = self._pending_tag, None
            return pending
        start = self.position
        return self._read_upto(1), start

    # -- header and metadata ----------------------------------------------

    def _read_header(self):
        head = self._read_upto(len(BANNER))
        if head == BANNER:
            pass
        elif head == BANNER_V2:
            self._fail("this is an 'rbd diff v2' stream (rbd export --export-format 2); only v1 is supported",
                       offset=0)
        elif len(head) < len(BANNER) and BANNER.startswith(head):
            self._fail("missing or truncated header: expected %r, got %r" % (BANNER, head), offset=0)
        else:
            self._fail("bad header: expected %r, got %r; not an rbd diff v1 stream" % (BANNER, head), offset=0)
        seen = set()
        while True:
            start = self.position
            tag = self._read_upto(1)
            if tag not in _META_TAGS:
                self._pending_tag = (tag, start)
                return
            if tag in seen:
                self._fail("duplicate %s record (%r)" % (_META_TAGS[tag], tag.decode()), offset=start)
            seen.add(tag)
            if tag == TAG_SIZE:
                self.size = _U64.unpack(self._read_exact(8, "size record", start))[0]
            else:
                what = "%s record" % _META_TAGS[tag]
                (n,) = _U32.unpack(self._read_exact(4, what, start))
                if n > MAX_SNAP_NAME:
                    self._fail("%s: snapshot name length %d exceeds %d bytes" % (what, n, MAX_SNAP_NAME),
                               offset=start)
                name = _decode_name(self._read_exact(n, what, start))
                if tag == TAG_FROM_SNAP:
                    self.from_snap = name
                else:
                    self.to_snap = name

    # -- records -------------------------------------------------------

    def records(self):
        """Yield ``(Extent, bytes)`` for data and ``(Extent, None)`` for zeroed ranges."""
        return self._iter(keep_data=True)

    def _iter(self, keep_data):
        if self._started:
            raise DiffFormatError("rbd diff reader: records() can only be iterated once")
        self._started = True
        next_offset = 0
        while True:
            tag, start = self._read_tag()
            if not tag:
                self._fail("missing end record 'e': the stream ends after %d bytes" % start)
            if tag == TAG_END:
                if self.size is None:
                    self._fail("no size record 's' before the end record", offset=start)
                self.ended = True
                if not self._allow_trailing and self._read_upto(1):
                    self._fail("data after the end record 'e'", offset=start + 1)
                return
            if tag in _META_TAGS:
                self._fail("%s record (%r) after the first data record; metadata must come first"
                           % (_META_TAGS[tag], tag.decode()), offset=start)
            if tag not in (TAG_WRITE, TAG_ZERO):
                self._fail("unknown record tag %r" % tag, offset=start)
            kind = "write" if tag == TAG_WRITE else "zero"
            offset, length = _U64X2.unpack(self._read_exact(16, "%s record header" % kind, start))
            if self.size is None:
                self._fail("%s record before the size record 's'" % kind, offset=start)
            if offset + length > self.size:
                self._fail("%s record %d~%d ends past the image size %d" % (kind, offset, length, self.size),
                           offset=start, extent_offset=offset, extent_length=length, size=self.size)
            if self._require_ascending and offset < next_offset:
                self._fail("%s record at %d overlaps or precedes the previous record, which ends at %d"
                           % (kind, offset, next_offset), offset=start)
            if length:
                next_offset = offset + length
            self.record_count += 1
            if tag == TAG_ZERO:
                self.zero_bytes += length
                if length:
                    yield Extent(offset, length, ZERO), None
                continue
            done = 0
            while done < length:
                n = min(self._max_chunk, length - done)
                chunk_start = self.position
                data = self._read_upto(n)
                if len(data) != n:
                    self._fail("truncated data of write record %d~%d (record at byte %d): the stream ends after "
                               "%d of its %d data bytes" % (offset, length, start, done + len(data), length),
                               offset=chunk_start + len(data), extent_offset=offset, extent_length=length)
                self.data_bytes += n
                yield Extent(offset + done, n, DATA), (data if keep_data else None)
                done += n


def scan(fileobj, max_chunk=DEFAULT_MAX_CHUNK, allow_trailing=False, require_ascending=False):
    """Validate a whole stream without keeping its data; return a summary.

    Keys: from_snap, to_snap, size, data_bytes, zero_bytes, records (number of
    w/z records in the stream, zero-length ones included), stream_bytes.
    """
    reader = DiffReader(fileobj, max_chunk=max_chunk, allow_trailing=allow_trailing,
                        require_ascending=require_ascending)
    for _item in reader._iter(keep_data=False):
        pass
    return {
        "from_snap": reader.from_snap,
        "to_snap": reader.to_snap,
        "size": reader.size,
        "data_bytes": reader.data_bytes,
        "zero_bytes": reader.zero_bytes,
        "records": reader.record_count,
        "stream_bytes": reader.position,
    }
