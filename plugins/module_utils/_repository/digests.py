# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block digests: the algorithms (keyed BLAKE2b, and older unkeyed ones), the per-repository key,
and BlockDigests (a presence map plus fixed-width digest slots, in memory or spooled to a file).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import operator
import os
import stat
import struct
import sys
from array import array

try:
    import xxhash
    HAS_XXHASH = True
except ImportError:
    xxhash = None
    HAS_XXHASH = False

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, RepositoryError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero, write_file


DEFAULT_BLOCK_SIZE = 65536
DIGEST_SIZE = 16
ZERO_DIGEST = bytes(DIGEST_SIZE)  # stands for "this block reads as zeroes", whatever its length
_DIGESTS_MAGIC = b"SCBDIG\x00\x01"
_DIGESTS_HEADER = struct.Struct("<8sIIQ")  # magic, block size, digest size, record count
_RECORD = 8 + DIGEST_SIZE  # u64 little-endian block index + digest
_BATCH = 65536  # blocks handled at once when a digests file is written, read or merged (1.5 MiB of records)
KEY_FILE = "digest.key"
KEY_SIZE = 32


def read_key(path):
    """The digest secret in ``path`` (KEY_SIZE bytes), or None when there is no such file.

    A key file that is not a regular file (a symbolic link is not followed), is readable or
    writable by group or others, belongs to another user, or has the wrong size is refused:
    digests keyed by a known key protect nothing.  The key never appears in a message.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RepositoryError("cannot open the digest key %s: %s (it must be a regular file)"
                              % (path, exc.strerror), path=path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RepositoryError("the digest key %s is not a regular file" % path, path=path)
        if st.st_mode & 0o077:
            raise RepositoryError("the digest key %s has mode %04o: it must be readable by its owner only "
                                  "(chmod 600 it)" % (path, stat.S_IMODE(st.st_mode)), path=path)
        if st.st_uid != os.geteuid():
            raise RepositoryError("the digest key %s belongs to uid %d, not to this user (uid %d)"
                                  % (path, st.st_uid, os.geteuid()), path=path)
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise RepositoryError("the digest key %s has %d bytes, not %d" % (path, len(key), KEY_SIZE), path=path)
    return key


def _blake2b_128(data):
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def _xxh3_128(data):
    return xxhash.xxh3_128_digest(data)


def _blake2b_128_keyed(key):
    def digest(data):
        return hashlib.blake2b(data, digest_size=DIGEST_SIZE, key=key).digest()
    return digest


# Block digest algorithms, by the name a manifest (or a point) records in its "digest" field.
#
# blake2b-128-keyed (BLAKE2b keyed by the repository's secret, KEY_FILE) is what new segments
# use: a backup that reads a raw file or device decides "unchanged" by comparing digests of
# guest-controlled data, and without the key a guest cannot make two blocks collide.
# xxh3-128 (python3-xxhash, >10 GB/s) and blake2b-128 (unkeyed) are kept to read and verify
# the points written before; tests/bench/bench_memory.py prints what each costs per GiB.
UNKEYED_DIGESTS = {"blake2b-128": _blake2b_128, "xxh3-128": _xxh3_128}
KEYED_DIGESTS = {"blake2b-128-keyed": _blake2b_128_keyed}
DIGEST_FUNCTIONS = dict(UNKEYED_DIGESTS, **KEYED_DIGESTS)  # the names a manifest may record
LEGACY_DIGEST = "blake2b-128"  # manifests written before the field existed
KEYED_DIGEST = "blake2b-128-keyed"


def default_digest():
    """The algorithm of a new segment: BLAKE2b keyed by the repository's secret."""
    return KEYED_DIGEST


def fast_digest():
    """The algorithm of a new segment whose digests decide nothing about guest data (they only detect
    corruption: the source knows its changed extents): xxh3-128 where python3-xxhash is installed
    (~14 GiB/s per core, ~18 times keyed BLAKE2b), else the keyed default."""
    return "xxh3-128" if HAS_XXHASH else KEYED_DIGEST


def is_keyed(algorithm):
    return algorithm in KEYED_DIGESTS


def digest_function(algorithm, key=None):
    """The raw 16-byte digest function of ``algorithm`` (``key``: the repository's secret, for a keyed one)."""
    if algorithm not in DIGEST_FUNCTIONS:
        raise RepositoryError("unknown block digest algorithm %r (known: %s)"
                              % (algorithm, ", ".join(sorted(DIGEST_FUNCTIONS))))
    if algorithm == "xxh3-128" and not HAS_XXHASH:
        raise RepositoryError("this repository's block digests are xxh3-128: install python3-xxhash on this host")
    if algorithm in KEYED_DIGESTS:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise RepositoryError("block digest algorithm %s needs the repository's %d-byte key"
                                  % (algorithm, KEY_SIZE))
        return KEYED_DIGESTS[algorithm](key)
    return UNKEYED_DIGESTS[algorithm]


class Digester:
    """``digester(data)``: the block digest of one algorithm (and key), ZERO_DIGEST for all-zero data.

    The key is held here and nowhere else; ``repr`` never shows it.
    """

    def __init__(self, algorithm, key=None):
        self.algorithm = algorithm
        self.keyed = is_keyed(algorithm)
        self._fn = digest_function(algorithm, key)

    def __call__(self, data):
        # Exactly all zero, never "hashes like zeroes": a guest could craft a block whose unkeyed
        # digest equals that of a zero block.
        if all_zero(data):
            return ZERO_DIGEST
        return self._fn(data)

    def __repr__(self):
        return "Digester(%s)" % self.algorithm


@functools.lru_cache(maxsize=8)
def _unkeyed_digester(algorithm):
    return Digester(algorithm)


def block_digest(data, algorithm=LEGACY_DIGEST):
    """16-byte digest of a block's bytes with an UNKEYED algorithm, or ZERO_DIGEST when they are all zero.

    A keyed digest needs the repository's key: ``Repository.digest_for`` / ``Pending.block_digest``.
    """
    return _unkeyed_digester(algorithm)(data)


class _MemorySlots:
    """Fixed-width digest slots in a bytearray (index * DIGEST_SIZE)."""

    def __init__(self):
        self._data = bytearray()

    def reserve(self, blocks):
        if blocks * DIGEST_SIZE > len(self._data):
            self._data.extend(bytes(blocks * DIGEST_SIZE - len(self._data)))

    def read(self, start, end):
        data = bytes(self._data[start * DIGEST_SIZE:end * DIGEST_SIZE])
        want = (end - start) * DIGEST_SIZE
        return data + bytes(want - len(data)) if len(data) < want else data

    def write(self, start, data):
        self._data[start * DIGEST_SIZE:start * DIGEST_SIZE + len(data)] = data

    def truncate(self, blocks):
        del self._data[blocks * DIGEST_SIZE:]

    def close(self):
        self._data = bytearray()


class _FileSlots:
    """Fixed-width digest slots in a file of our own (a hole reads as ZERO_DIGEST).

    os.pread/os.pwrite at fixed offsets: safe from many threads, and what the process
    holds in memory stays the same whatever the disk size (the page cache holds the rest).
    """

    def __init__(self, path):
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise RepositoryError("cannot create the digests spool %s: %s" % (path, exc.strerror), path=path)
        self.path = path

    def reserve(self, blocks):
        pass

    def read(self, start, end):
        want = (end - start) * DIGEST_SIZE
        data = os.pread(self._fd, want, start * DIGEST_SIZE)
        return data + bytes(want - len(data)) if len(data) < want else data

    def write(self, start, data):
        view = memoryview(data)
        offset = start * DIGEST_SIZE
        while view:
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                raise RepositoryError("cannot write the digests spool %s: %s" % (self.path, exc.strerror),
                                      path=self.path)
            view, offset = view[done:], offset + done

    def truncate(self, blocks):
        if os.fstat(self._fd).st_size > blocks * DIGEST_SIZE:
            os.ftruncate(self._fd, blocks * DIGEST_SIZE)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __del__(self):
        self.close()


class BlockDigests:
    """Block index -> 16-byte digest, for one layer (the blocks it wrote) or a whole point.

    A presence map (one byte per block up to the highest index) and fixed-width digest
    slots, in memory or, with ``spool`` (a path, created 0600 and removed by ``close()``),
    in a file: then the process holds 1 byte per block (16 MiB for 1 TiB at 64 KiB blocks)
    whatever the mix, and never a Python object per block.  Writers fill it run by run
    (``set_run``, ``set_zero_run``); the file form is written and read in bounded batches.

    File form: header (magic, block size, digest size, count), then ``count``
    records (u64 LE index, 16-byte digest) in increasing index order, then a
    16-byte blake2b of everything before it.
    """

    def __init__(self, block_size=DEFAULT_BLOCK_SIZE, spool=None):
        if not isinstance(block_size, int) or block_size < 512 or block_size & (block_size - 1):
            raise InputError("block size must be a power of two >= 512, not %r" % (block_size,))
        self.block_size = block_size
        self._slots = _FileSlots(spool) if spool else _MemorySlots()
        self._present = bytearray()
        self._count = 0

    @property
    def spooled(self):
        return isinstance(self._slots, _FileSlots)

    def close(self):
        """Forget everything (and remove the spool file, if any)."""
        self._slots.close()
        self._present = bytearray()
        self._count = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def blocks(self, size):
        """How many blocks cover ``size`` bytes."""
        return -(-size // self.block_size)

    def _reserve(self, blocks):
        if blocks > len(self._present):
            grow = max(blocks, 2 * len(self._present), 1024) - len(self._present)
            self._present.extend(bytes(grow))
            self._slots.reserve(len(self._present))

    def reserve(self, blocks):
        """Size the presence map for ``blocks`` blocks at once (no growth by doubling later)."""
        if blocks > len(self._present):
            self._present.extend(bytes(blocks - len(self._present)))
            self._slots.reserve(blocks)

    def __setitem__(self, index, digest):
        if not isinstance(index, int) or index < 0:
            raise ValueError("block index must be an int >= 0, not %r" % (index,))
        if len(digest) != DIGEST_SIZE:
            raise ValueError("a block digest is %d bytes, not %d" % (DIGEST_SIZE, len(digest)))
        self.set_run(index, digest)

    def set_run(self, first, digests):
        """Set blocks ``first``, ``first + 1``... to the concatenated 16-byte ``digests``."""
        n, rest = divmod(len(digests), DIGEST_SIZE)
        if rest or first < 0:
            raise ValueError("set_run needs a block index >= 0 and whole %d-byte digests" % DIGEST_SIZE)
        if not n:
            return
        self._reserve(first + n)
        self._slots.write(first, digests)
        self._count += n - self._present.count(1, first, first + n)
        self._present[first:first + n] = b"\x01" * n

    def set_zero_run(self, first, end):
        """Blocks ``first``..``end - 1`` read as zeroes (ZERO_DIGEST), written in bounded pieces."""
        for start in range(first, end, _BATCH):
            self.set_run(start, bytes(min(_BATCH, end - start) * DIGEST_SIZE))

    def add(self, index, data, algorithm=LEGACY_DIGEST):
        """Record the digest of ``data`` (the block's bytes) for ``index`` (an unkeyed algorithm); returns it."""
        digest = block_digest(data, algorithm)
        self[index] = digest
        return digest

    def __getitem__(self, index):
        if not self.__contains__(index):
            raise KeyError(index)
        return self._slots.read(index, index + 1)

    def get(self, index, default=None):
        return self[index] if index in self else default

    def run(self, first, end):
        """The concatenated digests of blocks ``first``..``end - 1``, ZERO_DIGEST for an absent one
        (one read for a whole run: what a scan compares a chunk against)."""
        return self._slots.read(first, end)

    def __contains__(self, index):
        return isinstance(index, int) and 0 <= index < len(self._present) and self._present[index] == 1

    def __len__(self):
        return self._count

    def last(self):
        """The highest block index present, or -1."""
        return self._present.rfind(1)

    def __iter__(self):
        return itertools.compress(range(len(self._present)), self._present)

    def items(self):
        for start, end in self._runs():
            for batch in range(start, end, _BATCH):
                stop = min(end, batch + _BATCH)
                data = self._slots.read(batch, stop)
                for k in range(stop - batch):
                    yield batch + k, data[k * DIGEST_SIZE:(k + 1) * DIGEST_SIZE]

    def __eq__(self, other):
        if not isinstance(other, BlockDigests):
            return NotImplemented
        return self.block_size == other.block_size and list(self.items()) == list(other.items())

    def _runs(self, limit=None):
        """(start, end) of each run of present blocks, at most ``limit`` blocks long."""
        present = self._present
        start = present.find(1)
        while start != -1:
            end = present.find(0, start)
            if end == -1:
                end = len(present)
            if limit:
                for piece in range(start, end, limit):
                    yield piece, min(end, piece + limit)
            else:
                yield start, end
            start = present.find(1, end)

    def update(self, other):
        """Overlay ``other`` (a newer layer): its blocks win."""
        if other.block_size != self.block_size:
            raise RepositoryError("cannot merge digests of %d-byte blocks into %d-byte blocks"
                                  % (other.block_size, self.block_size))
        for start, end in other._runs(_BATCH):
            self.set_run(start, other._slots.read(start, end))
        return self

    def truncate(self, blocks):
        """Forget every block at or past index ``blocks``."""
        if blocks < len(self._present):
            del self._present[blocks:]
            self._slots.truncate(blocks)
            self._count = self._present.count(1)
        return self

    @classmethod
    def merged(cls, layers, size=None, block_size=None, sizes=None, spool=None):
        """What a point reads as, from its layers' digests OLDEST FIRST (newest wins).

        With ``size`` every block of the disk is present: blocks no layer wrote
        read as zeroes (ZERO_DIGEST), blocks past the end are dropped.  ``sizes``
        (each layer's virtual size) replays shrinks and grows: what a shrink cut
        off reads as zeroes when a later layer grows the disk again, as in qcow2.
        ``spool``: the result's digests go to that file (see the class).
        """
        if block_size is None:
            layers = list(layers)
            if not layers:
                raise InputError("merged() needs a block size or at least one layer")
            block_size = layers[0].block_size
        out = cls(block_size, spool=spool)
        try:
            if size is not None:
                out.set_zero_run(0, out.blocks(size))
            count = 0
            for n, layer in enumerate(layers):
                count += 1
                if sizes is not None and n >= len(sizes):
                    raise InputError("merged() needs one size per layer")
                if sizes is not None and n > 0:
                    if sizes[n] < sizes[n - 1]:
                        out.truncate(out.blocks(sizes[n]))
                    else:
                        # Grown: blocks past the previous end read as zeroes until a layer writes them.
                        # A previous end inside a block changes that block too: every writer puts it in
                        # the new layer (resize_edge, the diff replay's read-back), so its digest wins below.
                        out.set_zero_run(out.blocks(sizes[n - 1]), out.blocks(sizes[n]))
                out.update(layer)
            if sizes is not None and count != len(sizes):
                raise InputError("merged() needs one size per layer")
            if size is not None:
                out.truncate(out.blocks(size))
        except BaseException:
            out.close()
            raise
        return out

    def _batches(self):
        """The file form in pieces: header, record batches, trailing checksum."""
        head = _DIGESTS_HEADER.pack(_DIGESTS_MAGIC, self.block_size, DIGEST_SIZE, self._count)
        check = hashlib.blake2b(head, digest_size=16)
        yield head
        for start, end in self._runs(_BATCH):
            n = end - start
            indexes = array("Q", range(start, end))
            if indexes.itemsize != 8:
                raise RepositoryError("this Python has no 64-bit array type")
            if sys.byteorder != "little":
                indexes.byteswap()
            raw = indexes.tobytes()
            digests = self._slots.read(start, end)
            body = bytearray(n * _RECORD)
            for k in range(8):
                body[k::_RECORD] = raw[k::8]
            for k in range(DIGEST_SIZE):
                body[8 + k::_RECORD] = digests[k::DIGEST_SIZE]
            check.update(body)
            yield body
        yield check.digest()

    def to_bytes(self):
        return b"".join(bytes(piece) for piece in self._batches())

    @classmethod
    def from_bytes(cls, data, source="digests"):
        return cls._read(io.BytesIO(bytes(data)), len(data), source)

    @classmethod
    def _read(cls, f, total, source, spool=None):
        """Parse the file form from ``f`` (``total`` bytes long) in bounded batches."""
        head_size = _DIGESTS_HEADER.size
        if total < head_size + 16:
            raise RepositoryError("%s: too short for a digests file" % source)
        head = f.read(head_size)
        magic, block_size, digest_size, count = _DIGESTS_HEADER.unpack_from(head)
        if magic != _DIGESTS_MAGIC:
            raise RepositoryError("%s is not a snapchain digests file (bad magic)" % source)
        if digest_size != DIGEST_SIZE:
            raise RepositoryError("%s holds %d-byte digests, expected %d" % (source, digest_size, DIGEST_SIZE))
        if total != head_size + count * _RECORD + 16:
            raise RepositoryError("%s: size %d does not match its %d records (truncated?)" % (source, total, count))
        try:
            out = cls(block_size, spool=spool)
        except InputError as exc:
            raise RepositoryError("%s: %s" % (source, exc.msg))
        try:
            check = hashlib.blake2b(head, digest_size=16)
            previous = -1
            error = None  # the first structural problem; a checksum mismatch (corruption) is reported first
            for done in range(0, count, _BATCH):
                n = min(_BATCH, count - done)
                body = f.read(n * _RECORD)
                if len(body) != n * _RECORD:
                    raise RepositoryError("%s: truncated while reading" % source)
                check.update(body)
                if error is not None:
                    continue
                raw = bytearray(n * 8)
                digests = bytearray(n * DIGEST_SIZE)
                for k in range(8):
                    raw[k::8] = body[k::_RECORD]
                for k in range(DIGEST_SIZE):
                    digests[k::DIGEST_SIZE] = body[8 + k::_RECORD]
                indexes = array("Q")
                indexes.frombytes(bytes(raw))
                if sys.byteorder != "little":
                    indexes.byteswap()
                if indexes[0] <= previous or not all(map(operator.lt, indexes, itertools.islice(indexes, 1, None))):
                    error = RepositoryError("%s: block indexes are not strictly increasing" % source)
                    continue
                previous = indexes[-1]
                out.reserve(indexes[-1] + 1)
                j = 0
                while j < n:  # runs of consecutive indexes, one slot write each
                    k = j + 1
                    while k < n and indexes[k] == indexes[k - 1] + 1:
                        k += 1
                    out.set_run(indexes[j], digests[j * DIGEST_SIZE:k * DIGEST_SIZE])
                    j = k
            if check.digest() != f.read(16):
                raise RepositoryError("%s: checksum mismatch (corrupted)" % source)
            if error is not None:
                raise error
        except BaseException:
            out.close()
            raise
        return out

    def save(self, path, mode=0o600):
        """Write the file form to ``path`` (created with ``mode``, fsynced) in bounded batches."""
        write_file(path, self._batches(), mode)

    @classmethod
    def load(cls, path, spool=None):
        try:
            with open(path, "rb") as f:
                return cls._read(f, os.fstat(f.fileno()).st_size, path, spool=spool)
        except OSError as exc:
            raise RepositoryError("cannot read digests %s: %s" % (path, exc.strerror), path=path)
