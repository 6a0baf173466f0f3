# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The changed ranges of a zvol named by a ``zfs send -i`` stream: its record headers, read as they come.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A send stream (OpenZFS ``include/sys/zfs_ioctl.h``, ``dmu_replay_record_t``) is a sequence of
312-byte records, each followed by its payload; the integers are in the sender's byte order (the
BEGIN record's magic ``0x2F5bacbac`` says which)::

    u32 drr_type, u32 drr_payloadlen, then the union of the record types (304 bytes; the last 32
    bytes of every record but BEGIN hold the running fletcher-4 checksum of the stream)

A zvol's data is object 1 (``ZVOL_OBJ``; object 2 is its ZAP, holding ``size``).  What names its
changed offsets:

- DRR_WRITE (object, offset, logical size): a block written since the from-snapshot.  Its payload
  is the block (``drr_compressed_size`` bytes with ``-c`` when compressed on disk, else the logical
  size).  DRR_WRITE_EMBEDDED (``-e``: a block small enough to live in its block pointer; payload
  ``psize`` rounded up to 8) and DRR_WRITE_BYREF (``-D``, no payload) name a written range too.
- DRR_FREE (object, offset, length): a range that reads as zeroes now (discarded, or zeroes
  written with compression on, which stores them as holes).  A length of ``2^64 - 1`` frees
  everything from ``offset`` to the end of the object: ZFS emits it after each DRR_OBJECT, at the
  end of the object's highest block (``dn_maxblkid``); it is kept apart as ``tail``.
- DRR_FREEOBJECTS over object 1 would mean the volume's data object was freed: refused.
- DRR_OBJECT (the dnode; payload its bonus buffer), DRR_SPILL, records of other objects:
  read through, nothing to take from them.  DRR_OBJECT_RANGE comes only with raw (``-w``) sends,
  DRR_REDACT only with redacted ones, a compound stream (``-R``) has nested BEGINs: none of these is
  ever asked for here, all are refused.

Only the headers matter: the payloads are read through and dropped (nothing of the stream is
stored, memory stays bounded); the data is read from the snapshot's device afterwards.  The
checksums are not verified (the stream comes through a pipe from the local ``zfs`` process, whose
exit status is checked, and every field used is range-checked); the BEGIN and END records must name
the expected snapshots (``drr_toguid``/``drr_fromguid``) and the stream must end with END.
Every malformed stream raises ``StreamError`` with the byte offset in the stream.
"""

from __future__ import annotations

import struct

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent

RECORD_SIZE = 312
MAGIC = 0x2F5BACBAC
ZVOL_OBJ = 1
OBJECT_END = (1 << 64) - 1  # DMU_OBJECT_END: "to the end of the object"
SUBSTREAM, COMPOUNDSTREAM = 1, 2
FEATURE_REDACTED = 1 << 21
FEATURE_RAW = 1 << 24
MAX_PAYLOAD = 64 << 20  # a block is at most 16 MiB (large_blocks); a BEGIN nvlist far less

(DRR_BEGIN, DRR_OBJECT, DRR_FREEOBJECTS, DRR_WRITE, DRR_FREE, DRR_END, DRR_WRITE_BYREF, DRR_SPILL,
 DRR_WRITE_EMBEDDED, DRR_OBJECT_RANGE, DRR_REDACT) = range(11)
NAMES = ("BEGIN", "OBJECT", "FREEOBJECTS", "WRITE", "FREE", "END", "WRITE_BYREF", "SPILL", "WRITE_EMBEDDED",
         "OBJECT_RANGE", "REDACT")


class StreamError(CommandError):
    """A ``zfs send`` stream this parser cannot take its changed ranges from (malformed or unexpected)."""


def _layouts(order):
    """The header fields used, per record type, as (struct, offset into the record) in byte order ``order``."""
    return dict(
        head=struct.Struct(order + "II"),  # drr_type, drr_payloadlen
        begin=struct.Struct(order + "QQQIIQQ"),  # magic, versioninfo, creation, type, flags, toguid, fromguid @8
        object=struct.Struct(order + "QIIIIBBBBI"),  # object, type, bonustype, blksz, bonuslen, ..., raw_bonuslen @8
        freeobjects=struct.Struct(order + "QQ"),  # firstobj, numobjs @8
        write=struct.Struct(order + "QIIQQ"),  # object, type, pad, offset, logical_size @8
        write_comp=struct.Struct(order + "B"),  # drr_compressiontype @50
        write_csize=struct.Struct(order + "Q"),  # drr_compressed_size @96
        range3=struct.Struct(order + "QQQ"),  # object, offset, length @8 (FREE, WRITE_BYREF, WRITE_EMBEDDED)
        embedded_psize=struct.Struct(order + "I"),  # drr_psize @52
        spill=struct.Struct(order + "QQ"),  # object, length @8
        spill_csize=struct.Struct(order + "Q"),  # drr_compressed_size @40
        end_guid=struct.Struct(order + "Q"),  # drr_toguid @40
    )


_LE, _BE = _layouts("<"), _layouts(">")


def _round8(n):
    return (n + 7) & ~7


class Changes:
    """What a stream says changed in object 1: ``extents`` (DATA written, ZERO freed; coalesced, in stream
    order), ``tail`` (the offset from which the object was freed to its end, or None) and counters."""

    def __init__(self):
        self.extents = []
        self.tail = None
        self.records = dict((name, 0) for name in NAMES)
        self.stream_bytes = 0
        self.toguid = self.fromguid = None

    def add(self, offset, length, kind):
        if length <= 0:
            return
        last = self.extents[-1] if self.extents else None
        if last is not None and last.kind == kind and last.end == offset:
            self.extents[-1] = Extent(last.offset, last.length + length, kind)
        else:
            self.extents.append(Extent(offset, length, kind))

    def summary(self):
        return dict(stream_bytes=self.stream_bytes, tail=self.tail,
                    records=dict((k.lower(), v) for k, v in self.records.items() if v))


def _read_exact(fh, view, where):
    """Fill ``view`` from ``fh``; the number of bytes got (short only at the end of the stream)."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _skip(fh, length, scratch, where):
    left = length
    while left:
        n = fh.readinto(scratch[:min(left, len(scratch))])
        if not n:
            raise StreamError("zfs send stream ends inside a record's payload at byte %d (%d bytes missing)"
                              % (where + length - left, left), offset=where + length - left)
        left -= n


def parse(fh, size, toguid=None, fromguid=None, scratch_size=1 << 20):
    """Read a ``zfs send -i`` stream of a zvol from ``fh`` (a binary file object with ``readinto``) to its end.

    ``size``: the volume size (ranges are clipped to it); ``toguid``/``fromguid``: the guids the BEGIN
    record must name (None: not checked).  Returns ``Changes``."""
    out = Changes()
    rec = bytearray(RECORD_SIZE)
    rview = memoryview(rec)
    scratch = memoryview(bytearray(scratch_size))
    pos = 0
    lay = None
    ended = False
    while True:
        got = _read_exact(fh, rview, pos)
        if got == 0 and ended:
            break
        if got == 0:
            raise StreamError("zfs send stream ends at byte %d without an END record" % pos, offset=pos)
        if got < RECORD_SIZE:
            raise StreamError("zfs send stream ends inside a record header at byte %d" % pos, offset=pos)
        if ended:
            raise StreamError("zfs send stream goes on after its END record, at byte %d (a compound stream?)" % pos,
                              offset=pos)
        if lay is None:
            lay = _byte_order(rec, pos)
        rtype, payloadlen = lay["head"].unpack_from(rec, 0)
        if rtype >= len(NAMES):
            raise StreamError("unknown zfs send record type %d at byte %d" % (rtype, pos), offset=pos)
        name = NAMES[rtype]
        out.records[name] += 1
        if pos and rtype == DRR_BEGIN:
            raise StreamError("a second BEGIN record at byte %d: a compound (-R) stream is not expected here" % pos,
                              offset=pos)
        if not pos and rtype != DRR_BEGIN:
            raise StreamError("zfs send stream starts with a %s record, not BEGIN" % name, offset=0)
        payload = _record(rtype, payloadlen, rec, lay, out, size, toguid, fromguid, pos)
        if payload < 0 or payload > MAX_PAYLOAD:
            raise StreamError("zfs send %s record at byte %d announces a payload of %d bytes" % (name, pos, payload),
                              offset=pos)
        pos += RECORD_SIZE
        if payload:
            _skip(fh, payload, scratch, pos)
            pos += payload
        ended = rtype == DRR_END
    out.stream_bytes = pos
    return out


def _byte_order(rec, pos):
    for lay in (_LE, _BE):
        if lay["head"].unpack_from(rec, 0)[0] == DRR_BEGIN and lay["begin"].unpack_from(rec, 8)[0] == MAGIC:
            return lay
    raise StreamError("not a zfs send stream: no BEGIN record with the magic 0x2f5bacbac at byte %d" % pos, offset=pos)


def _check_range(offset, length, name, pos):
    """Offsets past the volume's end are clipped (``Changes.add``); one that wraps around is no stream of ours."""
    if length != OBJECT_END and offset + length >= 1 << 64:
        raise StreamError("zfs send %s record at byte %d names the range %d+%d, past 2^64" % (name, pos, offset, length),
                          offset=pos)


def _record(rtype, payloadlen, rec, lay, out, size, toguid, fromguid, pos):
    """Take what record ``rtype`` says about object 1; the length of its payload."""
    if rtype == DRR_BEGIN:
        _magic, versioninfo, _creation, _ostype, _flags, to_g, from_g = lay["begin"].unpack_from(rec, 8)
        hdrtype, features = versioninfo & 3, (versioninfo >> 2) & ((1 << 30) - 1)
        if hdrtype != SUBSTREAM:
            raise StreamError("zfs send stream header type %d is not a plain substream (compound -R streams are "
                              "not expected here)" % hdrtype, offset=pos)
        if features & (FEATURE_RAW | FEATURE_REDACTED):
            raise StreamError("zfs send stream is raw or redacted (features 0x%x): not expected here" % features,
                              offset=pos)
        for what, want, have in (("to", toguid, to_g), ("from", fromguid, from_g)):
            if want is not None and int(want) != have:
                raise StreamError("zfs send stream's %s-snapshot guid is %d, %d was expected" % (what, have, int(want)),
                                  offset=pos)
        out.toguid, out.fromguid = to_g, from_g
        return payloadlen
    if rtype == DRR_END:
        if out.toguid is not None and lay["end_guid"].unpack_from(rec, 40)[0] not in (0, out.toguid):
            raise StreamError("zfs send END record at byte %d names another snapshot than BEGIN" % pos, offset=pos)
        return 0
    if rtype == DRR_OBJECT:
        _obj, _t, _bt, _blksz, bonuslen, _c, _z, _s, _f, raw_bonuslen = lay["object"].unpack_from(rec, 8)
        return raw_bonuslen if raw_bonuslen else _round8(bonuslen)
    if rtype == DRR_FREEOBJECTS:
        first, count = lay["freeobjects"].unpack_from(rec, 8)
        if first <= ZVOL_OBJ < first + count:
            raise StreamError("zfs send stream frees objects %d-%d, the volume's data object among them: not an "
                              "incremental of the same zvol?" % (first, first + count - 1), offset=pos)
        return 0
    if rtype == DRR_WRITE:
        obj, _t, _pad, offset, logical = lay["write"].unpack_from(rec, 8)
        compressed = lay["write_comp"].unpack_from(rec, 50)[0]
        payload = lay["write_csize"].unpack_from(rec, 96)[0] if compressed else logical
        if obj == ZVOL_OBJ:
            _check_range(offset, logical, "WRITE", pos)
            out.add(offset, min(offset + logical, size) - offset, DATA)
        return payload
    if rtype in (DRR_FREE, DRR_WRITE_BYREF, DRR_WRITE_EMBEDDED):
        obj, offset, length = lay["range3"].unpack_from(rec, 8)
        payload = _round8(lay["embedded_psize"].unpack_from(rec, 52)[0]) if rtype == DRR_WRITE_EMBEDDED else 0
        if obj != ZVOL_OBJ:
            return payload
        _check_range(offset, length, NAMES[rtype], pos)
        if rtype == DRR_FREE and length == OBJECT_END:
            out.tail = offset if out.tail is None else min(out.tail, offset)
        else:
            out.add(offset, min(offset + length, size) - offset, ZERO if rtype == DRR_FREE else DATA)
        return payload
    if rtype == DRR_SPILL:
        _obj, length = lay["spill"].unpack_from(rec, 8)
        return lay["spill_csize"].unpack_from(rec, 40)[0] or length
    raise StreamError("zfs send %s record at byte %d: only raw (-w) or redacted streams have those, not expected here"
                      % (NAMES[rtype], pos), offset=pos)
