# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_append module's logic: append a point to a disk's chain from a non-RBD source.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Two sources, each ending in one new qcow2 layer written through qemu-nbd:

``source`` (a raw file or block device: an LVM/ZFS snapshot, a ploop image's data...)
    There is no diff to go by: the whole source is read in parallel (bounded
    buffers) and every 64 KiB block is digested AS IT IS READ and compared with
    the effective digests of the latest point (``Repository.effective_digests``).
    Only blocks whose digest differs are written; a block that became all-zero
    is sent as NBD WRITE_ZEROES (a zero cluster over the backing data).  An
    unchanged source still gives a point (an empty layer, 0 bytes written).
    A full backup (first point, size change, bad or digest-less latest point,
    ``force_full``) starts a new segment and writes only the non-zero blocks:
    the rest reads as zeroes in a layer without backing file.
    The layer's digests file holds the digests of the blocks it WROTE; the
    blocks it did not write have, by construction, the digest the parent's
    chain already gives them, so ``effective_digests`` of the new point is exact.

``diff`` (an ``rbd diff v1`` file, as ``rbd export-diff`` writes it)
    Its ``w``/``z`` records are replayed into a layer on top of the latest
    point, like ``rbd import-diff``: the diff's from-snap must be the latest
    point's ``snapshot``; a diff without from-snap is a full one and starts a
    new segment.  The size record is the layer's size.  Digests: a block wholly
    covered by one record is digested from the record's data (or is ZERO); a
    block only partly covered, and the blocks at an old or new end of the disk
    when the size changed, are read back through the NBD export once every
    record is written.  Blocks past the parent's end on a grow get ZERO digests
    explicitly (so the digests stay exact even if an older layer of the chain
    was once larger).  Records that go backwards (rbd import-diff accepts any
    order) are applied after every earlier write has completed.

Order of a run: validate → lock the disk directory → remove stale partial files
→ choose the base → write the layer (qemu-nbd) → flush, stop qemu-nbd → publish
(check, fsync, rename, manifest).  Any failure removes the pending layer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import stat
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    DIGEST_SIZE, WRITERS, ZERO_DIGEST, BlockDigests, Repository, block_digest, check_point_name)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, DiffFormatError, InputError, NotFoundError, RepositoryError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import ZERO
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_img import CACHE_MODES
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffReader, scan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import DEFAULT_CHUNK, Stats, chunk_for, layer_sink

MAX_PARALLEL = 64
_ZERO_CHUNK = bytes(DEFAULT_CHUNK)


# --------------------------------------------------------------------------------------------
# Small generic helpers (candidates for _transfer/_chain)


def is_zero(data):
    """True when the bytes-like ``data`` holds only zero bytes (memcmp, no per-item loop)."""
    raw = bytes(data)  # no copy for bytes; memoryview comparisons go item by item, far slower
    if len(raw) == len(_ZERO_CHUNK):
        return raw == _ZERO_CHUNK
    return raw == bytes(len(raw))


def block_runs(blocks, max_blocks):
    """Sorted block indexes -> ``(first, count)`` runs of consecutive blocks, at most ``max_blocks`` long."""
    first = count = None
    for b in sorted(blocks):
        if first is not None and b == first + count and count < max_blocks:
            count += 1
            continue
        if first is not None:
            yield first, count
        first, count = b, 1
    if first is not None:
        yield first, count


class RawSource:
    """A local raw file or block device, read with os.pread from many threads.

    The size comes from ``lseek(SEEK_END)``, which works for block devices
    (``st_size`` of a device node is 0).
    """

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


class _Window:
    """A thread pool with at most ``2 * parallel`` jobs in flight; results are handled in order
    by ``on_result`` in the calling thread (so no lock is needed for the bookkeeping)."""

    def __init__(self, parallel, on_result):
        self.parallel = parallel
        self.on_result = on_result
        self.pending = collections.deque()
        self.executor = None

    def __enter__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel,
                                                              thread_name_prefix="snapchain-append")
        return self

    def submit(self, fn, *args):
        self.pending.append(self.executor.submit(fn, *args))
        while len(self.pending) >= 2 * self.parallel:
            self._finish_one()

    def _finish_one(self):
        self.on_result(self.pending.popleft().result())

    def drain(self):
        while self.pending:
            self._finish_one()

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.drain()
        finally:
            for fut in self.pending:
                fut.cancel()
            self.pending.clear()
            self.executor.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# Source mode: read everything, write what differs


def scan_source(source, target, base=None, parallel=4, chunk=DEFAULT_CHUNK, block_size=65536, digest=block_digest,
                digests=None):
    """Read all of ``source``, write to ``target`` the blocks whose digest differs from ``base``.

    ``base`` is the effective BlockDigests of the parent point (every block
    present) or None for a full layer without backing (then all-zero blocks are
    skipped, the others written).  Runs of changed blocks are written as one
    request per chunk; changed blocks that are all zero become ``target.zero``.
    Returns ``(Stats, BlockDigests of the blocks written)``: ``digests`` (e.g.
    ``Pending.new_digests()``) filled run by run, or a new in-memory one.
    """
    if chunk % block_size:
        raise ValueError("chunk must be a multiple of block_size")
    chunk = chunk_for(parallel, chunk, block_size)
    size = source.size
    stats = Stats()
    digests = BlockDigests(block_size) if digests is None else digests

    def job(offset, length):
        data = source.read(offset, length)
        view = memoryview(data)
        changed = []
        counters = [0, 0, 0]  # bytes written, zero bytes, requests
        run = [None, None]  # start (in chunk), kind

        def close_run(end):
            start, kind = run
            if start is None:
                return
            if kind == ZERO:
                target.zero(offset + start, end - start)
                counters[1] += end - start
            else:
                target.write(offset + start, view[start:end])
                counters[0] += end - start
            counters[2] += 1
            run[0] = run[1] = None

        first = offset // block_size
        olds = base.run(first, first + -(-length // block_size)) if base is not None else None
        for i, pos in enumerate(range(0, length, block_size)):
            n = min(block_size, length - pos)
            got = digest(data[pos:pos + n])
            index = first + i
            old = ZERO_DIGEST if olds is None else olds[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
            if got == old:
                close_run(pos)
                continue
            if changed and changed[-1][0] + len(changed[-1][1]) // DIGEST_SIZE == index:
                changed[-1][1] += got
            else:
                changed.append([index, bytearray(got)])  # runs of consecutive changed blocks
            kind = ZERO if got == ZERO_DIGEST else "data"
            if run[1] != kind:
                close_run(pos)
                run[0], run[1] = pos, kind
        close_run(length)
        return length, changed, counters

    def on_result(result):
        length, changed, counters = result
        for index, values in changed:
            digests.set_run(index, values)
        stats.bytes_read += length
        stats.bytes_written += counters[0]
        stats.zero_bytes += counters[1]
        stats.extents += counters[2]

    with _Window(parallel, on_result) as window:
        for offset in range(0, size, chunk):
            window.submit(job, offset, min(chunk, size - offset))
    stats.seconds = time.monotonic() - stats.started
    return stats, digests


# --------------------------------------------------------------------------------------------
# Diff mode: replay w/z records


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
        if data is not None and is_zero(data):
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
    with _Window(parallel, on_result) as window:
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


# --------------------------------------------------------------------------------------------
# Choosing the base


def choose_source_base(repo, size, force_full=False):
    """``(parent point, its effective digests, None)`` or ``(None, None, reason for a full)``."""
    latest = repo.latest()
    if force_full:
        return None, None, "force_full was set"
    if latest is None:
        return None, None, "first backup of this disk"
    if latest.get("bad"):
        return None, None, "the last point %s is marked bad" % latest["name"]
    if latest["size"] != size:
        return None, None, "the source size changed from %d to %d bytes" % (latest["size"], size)
    if not repo.digests_keyed(latest["name"]):
        # "Unchanged" is decided by comparing digests of guest-written data: with an unkeyed
        # digest a guest could craft a block that collides with the old one and keep it stale.
        return None, None, ("digests not keyed: the block digests of the last point %s are %s, which a guest "
                            "could make collide; this backup starts a new segment with keyed digests"
                            % (latest["name"], repo.point_digest_algorithm(latest["name"])))
    try:
        base = repo.effective_digests(latest["name"])
    except RepositoryError as exc:
        return None, None, "the block digests of the last point %s are unusable: %s" % (latest["name"], exc.msg)
    return latest, base, None


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
    if latest.get("bad"):
        raise ConflictError("the last point %s is marked bad: an incremental diff cannot be applied onto it; "
                            "replay a full diff" % latest["name"], point=latest["name"])
    if latest.get("snapshot") != from_snap:
        raise ConflictError("the diff starts from snapshot %r but the latest point %s was taken from snapshot %r"
                            % (from_snap, latest["name"], latest.get("snapshot")),
                            from_snapshot=from_snap, point=latest["name"], point_snapshot=latest.get("snapshot"))
    return latest, None


# --------------------------------------------------------------------------------------------
# The module's entry point


def check_params(params):
    """Validate everything that needs no I/O; returns the normalised values."""
    if not params.get("chain"):
        raise InputError("chain (the disk's repository directory) is required")
    if bool(params.get("source")) == bool(params.get("diff")):
        raise InputError("exactly one of source and diff is required")
    parallel = params.get("parallel")
    parallel = 8 if parallel is None else parallel
    if not 1 <= parallel <= MAX_PARALLEL:
        raise InputError("parallel must be between 1 and %d, not %r" % (MAX_PARALLEL, parallel))
    cache = params.get("nbd_cache") or "none"
    if cache not in CACHE_MODES:
        raise InputError("nbd_cache must be one of %s" % ", ".join(CACHE_MODES))
    writer = params.get("writer") or "direct"
    if writer not in WRITERS:
        raise InputError("writer must be one of %s" % ", ".join(WRITERS))
    if params.get("point_name") is not None:
        check_point_name(params["point_name"])
    snapshot = params.get("snapshot_name")
    if snapshot is not None and (not snapshot or "\0" in snapshot or len(snapshot.encode("utf-8")) > 4096):
        raise InputError("snapshot_name must be a non-empty string of at most 4096 bytes without NUL")
    return dict(parallel=parallel, cache=cache, writer=writer,
                dir_mode=parse_mode(params.get("dir_mode") or "0700", "dir_mode"),
                file_mode=parse_mode(params.get("file_mode") or "0600", "file_mode"))


def _check_size(size, what):
    if size <= 0:
        raise InputError("%s is empty: nothing to back up" % what, size=size)
    if size % 512:
        raise InputError("%s is %d bytes, not a multiple of 512 (qcow2 images are)" % (what, size), size=size)


def _point_name(repo, params):
    names = repo.names()
    name = params.get("point_name")
    if name is None:
        return _naming.unique_managed_name(names, prefix="")
    if name in names:
        raise ConflictError("point %s already exists in %s" % (name, repo.disk_dir), point=name)
    if names and name <= names[-1]:
        raise ConflictError("point_name %s would not be the newest point of %s (latest is %s)"
                            % (name, repo.disk_dir, names[-1]), point=name)
    return name


def _open_diff(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFoundError("diff file %s does not exist" % path, path=path)
    except OSError as exc:
        raise InputError("cannot open diff file %s: %s" % (path, exc.strerror), path=path)


def _diff_header(fh, path):
    reader = DiffReader(fh)
    if reader.size is None:
        raise DiffFormatError("malformed rbd diff stream %s: no size record 's' after the header" % path,
                              offset=reader.position, path=path)
    _check_size(reader.size, "the image of diff %s" % path)
    return reader


def _diff_snapshot(reader, params):
    wanted = params.get("snapshot_name")
    if wanted is not None and reader.to_snap is not None and wanted != reader.to_snap:
        raise InputError("snapshot_name %r differs from the diff's to-snap %r" % (wanted, reader.to_snap))
    return wanted if wanted is not None else reader.to_snap


def append_point(params, check_mode=False):
    """Append one point to the repository ``params['chain']`` from ``source`` or ``diff``."""
    opts = check_params(params)
    chain = params["chain"]
    repo = Repository(chain, dir_mode=opts["dir_mode"], file_mode=opts["file_mode"])
    result = dict(changed=True, chain=chain, point=None, cleaned_partial=[])
    if params.get("source"):
        with RawSource(params["source"]) as src:
            _check_size(src.size, "source %s" % params["source"])
            result.update(mode="source", size=src.size, snapshot=params.get("snapshot_name"))
            if check_mode:
                return _check_mode(repo, params, result,
                                   lambda: choose_source_base(repo, src.size, params.get("force_full"))[::2])
            with repo.lock():
                repo.load()
                result["cleaned_partial"] = repo.cleanup_partial()
                name = _point_name(repo, params)
                parent, base, reason = choose_source_base(repo, src.size, params.get("force_full"))
                point = _write_source_point(repo, src, name, parent, base, reason, params, opts)
    else:
        with _open_diff(params["diff"]) as fh:
            reader = _diff_header(fh, params["diff"])
            snapshot = _diff_snapshot(reader, params)
            result.update(mode="diff", size=reader.size, snapshot=snapshot, from_snapshot=reader.from_snap)
            if params.get("force_full") and reader.from_snap is not None:
                raise InputError("force_full needs a full diff, but %s starts from snapshot %r"
                                 % (params["diff"], reader.from_snap))
            if check_mode:
                if fh.seekable():  # the whole stream: a malformed diff fails in check mode too
                    fh.seek(0)
                    scan(fh)
                return _check_mode(repo, params, result,
                                   lambda: choose_diff_base(repo, reader.from_snap, params.get("force_full")))
            with repo.lock():
                repo.load()
                result["cleaned_partial"] = repo.cleanup_partial()
                name = _point_name(repo, params)
                parent, reason = choose_diff_base(repo, reader.from_snap, params.get("force_full"))
                point = _write_diff_point(repo, reader, name, parent, reason, snapshot, params, opts)
    result.update(point=point, parent=point["parent"], full=point["parent"] is None,
                  full_reason=point["extra"].get("full_reason"), mb_per_s=point["extra"].get("mb_per_s"))
    for key in ("bytes_read", "bytes_written", "zero_bytes", "extents", "seconds"):
        result[key] = point[key]
    return result


def _check_mode(repo, params, result, choose):
    """What a real run would do, read-only (no directory, lock or file is created)."""
    repo.load()  # no manifest (or no directory): an empty repository
    _point_name(repo, params)
    parent, reason = choose()
    result.update(full=parent is None, full_reason=reason, parent=parent and parent["name"])
    return result


def _publish(repo, pending, stats, digests, snapshot, source, reason, extra):
    run = stats.as_dict()
    extra = dict(extra, mb_per_s=run["mb_per_s"], full_reason=reason)
    return repo.publish(pending, dict(
        snapshot=snapshot, source=source, bytes_read=run["bytes_read"], bytes_written=run["bytes_written"],
        zero_bytes=run["zero_bytes"], extents=run["extents"], seconds=run["seconds"], extra=extra),
        digests=digests)


def _write_source_point(repo, src, name, parent, base, reason, params, opts):
    with repo.begin_point(name, src.size, parent=parent and parent["name"], create=False) as pending:
        with layer_sink(pending, opts["writer"], opts["parallel"], opts["cache"]) as sink:
            stats, digests = scan_source(src, sink, base=base, parallel=opts["parallel"], digests=pending.new_digests(),
                                         digest=pending.block_digest, block_size=repo.block_size)
        if src.current_size() != src.size:
            raise TransferError("source %s changed size during the backup (%d, now %d bytes): not a snapshot?"
                                % (src.path, src.size, src.current_size()), path=src.path)
        source = dict(type=src.kind, path=os.path.abspath(src.path))
        return _publish(repo, pending, stats, digests, params.get("snapshot_name"), source, reason,
                        dict(mode="source"))


def _write_diff_point(repo, reader, name, parent, reason, snapshot, params, opts):
    # Always through qemu-nbd: diff records need not cover whole clusters, and partly written
    # blocks are read back through the backing chain for their digests.
    with repo.begin_point(name, reader.size, parent=parent and parent["name"], create=False) as pending:
        with layer_sink(pending, "nbd", opts["parallel"], opts["cache"]) as sink:
            stats, digests, readback = replay_diff(reader, sink, digest=pending.block_digest,
                                                   digests=pending.new_digests(),
                                                   parent_size=parent and parent["size"],
                                                   parallel=opts["parallel"], block_size=repo.block_size)
        source = dict(type="rbd_diff", path=os.path.abspath(params["diff"]), from_snap=reader.from_snap,
                      to_snap=reader.to_snap)
        extra = dict(mode="diff", from_snapshot=reader.from_snap, readback_bytes=readback,
                     diff_records=reader.record_count)
        return _publish(repo, pending, stats, digests, snapshot, source, reason, extra)
