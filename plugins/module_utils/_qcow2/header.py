# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2 header: the one parser of the collection (QEMU's docs/interop/qcow2.txt).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``read_header(path)`` (or ``fd=``) returns a ``Qcow2Header`` with every field of the version 2
and 3 headers, the header extensions, the backing file name and its format.  It checks only what
makes the fields meaningful (magic, version 2 or 3, cluster_bits 9 to 21 as QEMU accepts, header
length, extensions and backing name inside the first cluster) and raises ``HeaderError`` with a
``reason``: ``magic`` (not a qcow2 image), ``truncated`` (the file ends inside its header) or
``malformed``.  What a caller can work with (encryption, dirty bits, external data files...) is
each caller's decision.  ``has_magic(data)`` is the four-byte probe.
"""

from __future__ import annotations

import os
import struct

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import RepositoryError

MAGIC = b"QFI\xfb"
V2_LENGTH = 72
V3_MIN_LENGTH = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # QEMU's MIN_CLUSTER_BITS / MAX_CLUSTER_BITS
MAX_BACKING_NAME = 1023  # QEMU refuses to open a layer with a longer backing file name
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # at 72: incompatible, compatible, autoclear features, refcount order, length
_EXT = struct.Struct(">II")
_FIRST_READ = 64 << 10  # bytes read first: the whole first cluster only when its contents go further

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type", 4: "extended L2 entries"}
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2


class HeaderError(RepositoryError):
    """Not a qcow2 image, or its header is cut short or malformed (``details['reason']`` says which)."""


class Qcow2Header:
    """The fields of one qcow2 header, named as in the specification."""

    __slots__ = ("version", "backing_file_offset", "backing_file_size", "cluster_bits", "size", "crypt_method",
                 "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
                 "nb_snapshots", "snapshots_offset", "incompatible_features", "compatible_features",
                 "autoclear_features", "refcount_order", "header_length", "compression_type",
                 "extensions", "backing_file", "backing_format")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    def incompatible_names(self, mask=~0):
        """Names of the incompatible feature bits set in ``incompatible_features & mask``."""
        bits = self.incompatible_features & mask
        return [INCOMPAT_NAMES.get(bit, "unknown bit %d" % bit) for bit in range(64) if bits & (1 << bit)]

    def as_dict(self):
        return dict((name, getattr(self, name)) for name in self.__slots__)

    def __repr__(self):
        return "Qcow2Header(%s)" % ", ".join("%s=%r" % item for item in self.as_dict().items())


def has_magic(data):
    """True when ``data`` (the first bytes of a file) starts with the qcow2 magic."""
    return bytes(data[:4]) == MAGIC


def _error(path, reason, msg):
    return HeaderError("%s: %s" % (path, msg), path=path, reason=reason)


def read_header(path, fd=None):
    """The header of the qcow2 image ``path`` (read through ``fd`` when given), or HeaderError."""
    if fd is not None:
        return _read(fd, path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RepositoryError("cannot open %s: %s" % (path, exc.strerror), path=path, errno=exc.errno)
    try:
        return _read(fd, path)
    finally:
        os.close(fd)


def _pread(fd, length, offset, path):
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        raise RepositoryError("cannot read the qcow2 header of %s: %s" % (path, exc.strerror), path=path,
                              errno=exc.errno)


def _read(fd, path):
    head = _pread(fd, _FIRST_READ, 0, path)
    header = parse_header(head, path, complete=False)
    if header is None:  # the first cluster holds more than the first read
        cluster_size = 1 << struct.unpack_from(">I", head, 20)[0]
        header = parse_header(_pread(fd, cluster_size, 0, path), path)
    return header


def parse_header(data, path="qcow2 image", complete=True):
    """Parse the header at the start of ``data`` (bytes from offset 0 of the image).

    ``complete``: ``data`` holds the whole file or at least its first cluster, so anything running
    past its end is cut short.  Otherwise None when the first cluster must be read in full.
    """
    data = bytes(data)
    if len(data) < 4 or not has_magic(data):
        raise _error(path, "magic", "not a qcow2 image (bad magic %r)" % data[:4]
                     if len(data) >= 4 else "not a qcow2 image (%d bytes)" % len(data))
    if len(data) < V2_LENGTH:
        raise _error(path, "truncated", "the qcow2 header is cut short at %d bytes (needs %d)"
                     % (len(data), V2_LENGTH))
    (_magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
     rt_offset, rt_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(data)
    if version not in (2, 3):
        raise _error(path, "malformed", "qcow2 version %d (only 2 and 3 exist)" % version)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _error(path, "malformed", "cluster_bits %d is outside %d to %d"
                     % (cluster_bits, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS))
    cs = 1 << cluster_bits
    fields = dict(version=version, backing_file_offset=backing_offset, backing_file_size=backing_size,
                  cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
                  l1_table_offset=l1_offset, refcount_table_offset=rt_offset,
                  refcount_table_clusters=rt_clusters, nb_snapshots=nb_snapshots,
                  snapshots_offset=snapshots_offset, incompatible_features=0, compatible_features=0,
                  autoclear_features=0, refcount_order=4, header_length=V2_LENGTH, compression_type=0,
                  extensions=[], backing_file=None, backing_format=None)
    if version == 3:
        if len(data) < V2_LENGTH + _V3.size:
            raise _error(path, "truncated", "the qcow2 v3 header is cut short at %d bytes (needs %d)"
                         % (len(data), V2_LENGTH + _V3.size))
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(data, V2_LENGTH)
        if header_length < V3_MIN_LENGTH or header_length > cs or header_length % 8:
            raise _error(path, "malformed", "header length %d (a multiple of 8, %d to the cluster size %d)"
                         % (header_length, V3_MIN_LENGTH, cs))
        fields.update(incompatible_features=incompat, compatible_features=compat, autoclear_features=autoclear,
                      refcount_order=refcount_order, header_length=header_length)
        if header_length > V3_MIN_LENGTH:
            if len(data) < V3_MIN_LENGTH + 1:
                raise _error(path, "truncated", "the qcow2 header is cut short at %d bytes" % len(data))
            fields["compression_type"] = data[V3_MIN_LENGTH]
    header_length = fields["header_length"]
    # Header extensions follow the header, up to the backing file name (else the end of the cluster).
    if backing_offset:
        if backing_size == 0 or backing_size > MAX_BACKING_NAME or backing_offset < header_length \
                or backing_offset + backing_size > cs:
            raise _error(path, "malformed", "invalid backing file name (offset %d, length %d, cluster size %d)"
                         % (backing_offset, backing_size, cs))
    ext_end = backing_offset or cs
    pos = header_length
    while True:
        if pos + _EXT.size > ext_end:
            if backing_offset:
                raise _error(path, "malformed", "header extensions run into the backing file name")
            break  # no end marker before the end of the cluster: QEMU stops there too
        if pos + _EXT.size > len(data):
            return _short(data, path, complete, "the header extensions")
        ext_type, ext_len = _EXT.unpack_from(data, pos)
        if ext_type == EXT_END:
            break
        body_end = pos + _EXT.size + ext_len
        if body_end > ext_end:
            raise _error(path, "malformed", "header extension 0x%08x runs past its end" % ext_type)
        if body_end > len(data):
            return _short(data, path, complete, "header extension 0x%08x" % ext_type)
        body = data[pos + _EXT.size:body_end]
        fields["extensions"].append((ext_type, body))
        if ext_type == EXT_BACKING_FORMAT:
            fields["backing_format"] = body.decode("ascii", "replace")
        pos += _EXT.size + ((ext_len + 7) & ~7)
    if backing_offset:
        if backing_offset + backing_size > len(data):
            return _short(data, path, complete, "the backing file name")
        raw = data[backing_offset:backing_offset + backing_size]
        fields["backing_file"] = raw.decode("utf-8", "surrogateescape")
    return Qcow2Header(**fields)


def _short(data, path, complete, what):
    if complete or len(data) < _FIRST_READ:  # a short read: the file itself ends there
        raise _error(path, "truncated", "%s is cut short by the end of the file (%d bytes)" % (what, len(data)))
    return None
