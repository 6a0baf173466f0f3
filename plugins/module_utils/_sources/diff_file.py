# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An ``rbd diff v1`` file (as ``rbd export-diff`` writes it) as a backup source.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Its ``w``/``z`` records are replayed into a layer on top of the latest point, like
``rbd import-diff``: the diff's from-snap must be the latest point's ``snapshot``; a diff
without from-snap is a full one and starts a new segment.  The size record is the layer's
size.  Digests: a block wholly covered by one record is digested from the record's data (or
is ZERO); a block only partly covered, and the blocks at an old or new end of the disk when
the size changed, are read back through the NBD export once every record is written.  Blocks
past the parent's end on a grow get ZERO digests explicitly (so the digests stay exact even if
an older layer of the chain was once larger).  Records that go backwards (rbd import-diff
accepts any order) are applied after every earlier write has completed.

The layer is always written through qemu-nbd (``writer = "nbd"``): records need not cover
whole clusters, and partly written blocks are read back through the backing chain.
"""

from __future__ import annotations

import os
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, DiffFormatError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import all_zero
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffReader
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.digests import BlockDigests, block_digest
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import (
    DEFAULT_CHUNK, Stats, Window, block_runs)


def replay_diff(reader, target, parent_size=None, parallel=4, block_size=65536, readback_chunk=DEFAULT_CHUNK,
                digest=block_digest, digests=None):
    """Apply the records of ``reader`` (a DiffReader) to ``target``; return ``(Stats, BlockDigests, readback)``.

    ``parent_size`` is the size of the point the layer is backed by (None for a
    layer without backing).  The digests cover every block the layer changed,
    so that merged with the parent chain they give what the new point reads as.
    ``readback`` is the number of bytes read back from the target to digest
    partly covered blocks.
    """
    size = reader.size
    nblocks = -(-size // block_size)
    stats = Stats()
    digests = BlockDigests(block_size) if digests is None else digests
    readback = set()

    if parent_size is not None and parent_size != size:
        if size > parent_size:
            # past the parent's end the layer reads zeroes whatever an older, larger layer held
            digests.set_zero_run(-(-parent_size // block_size), nblocks)
        for edge in (parent_size, size):
            if edge % block_size and edge // block_size < nblocks:
                readback.add(edge // block_size)

    def block_len(index):
        return min(block_size, size - index * block_size)

    def covered(offset, end):
        """Indexes of blocks wholly inside [offset, end)."""
        lo = -(-offset // block_size)
        hi = end // block_size
        if end == size and size % block_size:
            hi = nblocks
        return lo, hi

    def job(offset, data, length, lo, hi):
        if data is not None and all_zero(data):
            data = None
        if data is None:
            target.zero(offset, length)
            return (lo, hi), 0, length  # a range, not a list: a z record may span millions of blocks
        target.write(offset, data)
        out = []
        for index in range(lo, hi):
            start = index * block_size - offset
            out.append((index, digest(data[start:start + block_len(index)])))
        return out, length, 0

    def on_result(result):
        out, written, zeroed = result
        if isinstance(out, tuple):
            digests.set_zero_run(*out)
        else:
            for index, value in out:
                digests[index] = value
        stats.bytes_written += written
        stats.zero_bytes += zeroed
        stats.extents += 1

    high = 0
    with Window(parallel, on_result) as window:
        for ext, data in reader.records():
            if ext.offset < high:
                window.drain()  # goes backwards: may overlap an earlier record, which must land first
            high = max(high, ext.end)
            lo, hi = covered(ext.offset, ext.end)
            for index in (ext.offset // block_size, (ext.end - 1) // block_size):
                if not lo <= index < hi:
                    readback.add(index)
            if readback and hi > lo:
                if len(readback) < hi - lo:
                    readback = set(index for index in readback if not lo <= index < hi)
                else:
                    readback.difference_update(range(lo, hi))
            if data is not None:
                stats.bytes_read += ext.length
            window.submit(job, ext.offset, data, ext.length, lo, hi)
        window.drain()

        readback_bytes = [0]

        def read_job(first, count):
            offset = first * block_size
            length = min(count * block_size, size - offset)
            data = bytes(target.read(offset, length))
            out = [(first + k, digest(data[k * block_size:(k + 1) * block_size])) for k in range(count)]
            return out, length

        def on_read(result):
            out, length = result
            for index, value in out:
                digests[index] = value
            readback_bytes[0] += length

        window.on_result = on_read
        for first, count in block_runs(readback, max(1, readback_chunk // block_size)):
            window.submit(read_job, first, count)
    stats.seconds = time.monotonic() - stats.started
    return stats, digests, readback_bytes[0]


def choose_diff_base(repo, from_snap, force_full=False):
    """``(parent point, None)`` or ``(None, reason for a full)``; ConflictError if the diff does not fit."""
    latest = repo.latest()
    if from_snap is None:
        if latest is None:
            return None, "first backup of this disk"
        return None, "the diff is a full one (it has no from-snap)"
    if force_full:
        raise InputError("force_full needs a full diff, but this one starts from snapshot %r" % from_snap)
    if latest is None:
        raise ConflictError("the diff starts from snapshot %r but %s has no points yet: replay a full diff first"
                            % (from_snap, repo.disk_dir), from_snapshot=from_snap)
    unsound = repo.unsound_reason(latest["name"])
    if unsound:
        raise ConflictError("the last point %s %s: an incremental diff cannot be applied onto it; replay a full "
                            "diff" % (latest["name"], unsound), point=latest["name"])
    if latest.get("snapshot") != from_snap:
        raise ConflictError("the diff starts from snapshot %r but the latest point %s was taken from snapshot %r"
                            % (from_snap, latest["name"], latest.get("snapshot")),
                            from_snapshot=from_snap, point=latest["name"], point_snapshot=latest.get("snapshot"))
    return latest, None


class DiffFileSource(Source):
    """The diff in the open binary file ``fh`` (``path`` for messages and the manifest)."""

    kind = "rbd_diff"
    writer = "nbd"

    def __init__(self, fh, path, snapshot_name=None):
        self.fh = fh
        self.path = path
        self.reader = DiffReader(fh)
        if self.reader.size is None:
            raise DiffFormatError("malformed rbd diff stream %s: no size record 's' after the header" % path,
                                  offset=self.reader.position, path=path)
        self.size = self.reader.size
        self.from_snap = self.reader.from_snap
        self.to_snap = self.reader.to_snap
        if snapshot_name is not None and self.to_snap is not None and snapshot_name != self.to_snap:
            raise InputError("snapshot_name %r differs from the diff's to-snap %r" % (snapshot_name, self.to_snap))
        self.snapshot = snapshot_name if snapshot_name is not None else self.to_snap

    @classmethod
    def open(cls, path, snapshot_name=None):
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError("diff file %s does not exist" % path, path=path)
        except OSError as exc:
            raise InputError("cannot open diff file %s: %s" % (path, exc.strerror), path=path)
        try:
            return cls(fh, path, snapshot_name)
        except BaseException:
            fh.close()
            raise

    def close(self):
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def choose_base(self, repo, force_full=False):
        parent, reason = choose_diff_base(repo, self.from_snap, force_full)
        return parent, None, reason

    def identity(self):
        return dict(type=self.kind, path=os.path.abspath(self.path), from_snap=self.from_snap, to_snap=self.to_snap)

    def copy(self, sink, parent, base, pending, parallel):
        stats, digests, readback = replay_diff(self.reader, sink, digest=pending.block_digest,
                                               digests=pending.new_digests(), parent_size=parent and parent["size"],
                                               parallel=parallel, block_size=pending.repo.block_size)
        return stats, digests, dict(mode="diff", from_snapshot=self.from_snap, readback_bytes=readback,
                                    diff_records=self.reader.record_count)
