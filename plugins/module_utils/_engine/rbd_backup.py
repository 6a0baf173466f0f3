# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_export_diff module's logic: an RBD snapshot diff into a qcow2 chain or an rbd diff v1 file.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Order of a chain backup (one disk), each step only after the previous one succeeded:
  validate → lock the disk directory → drop stale partial files → pick the base
  (the manifest's last point, if its snapshot still exists in Ceph with the same id;
  else a full backup into a new segment, with the reason) → take/resolve the snapshot
  → copy the changed extents into a new layer served by qemu-nbd → publish the layer
  atomically (check, fsync, rename, manifest) → only then remove older managed snapshots.
A failure at any step removes the snapshot this run created and the partial layer.
"""

from __future__ import annotations

import os
import tempfile

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir, parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import (
    DEFAULT_CHUNK, DiffStreamSink, align_to_blocks, copy_extents, layer_sink, resize_edge)

GRANULARITIES = ("auto", "exact", "object")


class RbdSource:
    """An image opened at a snapshot, read from many threads (librbd is thread-safe and
    the binding releases the GIL while reading)."""

    def __init__(self, img):
        self.img = img
        self.size = img.size()

    def read(self, offset, length):
        try:
            return self.img.read(offset, length)
        except _rbd.rbd.Error as exc:
            raise TransferError("read of %d bytes at offset %d failed: %s" % (length, offset, exc), offset=offset)


def diff_extents(img, from_snapshot, granularity):
    """Changed extents, found the cheapest exact way.

    A full read (no ``from_snapshot``) uses whole objects: every allocated object
    is read anyway.  An incremental with ``auto`` asks fast-diff for changed objects
    first, then the exact extents inside only those objects, so that scattered small
    writes do not re-read whole 4 MiB objects.
    """
    if granularity == "object" or (from_snapshot is None and granularity == "auto"):
        return _rbd.changed_extents(img, from_snapshot, whole_object=True)
    if granularity == "exact" or not _rbd.has_fast_diff(img):
        return _rbd.changed_extents(img, from_snapshot, whole_object=False)
    out = []
    for obj in _merge_runs(_rbd.changed_extents(img, from_snapshot, whole_object=True)):
        out.extend(_rbd.changed_extents(img, from_snapshot, whole_object=False,
                                        offset=obj.offset, length=obj.length))
    return out


def _merge_runs(extents):
    """Adjacent changed objects as one range (fewer diff_iterate calls), kind ignored."""
    out = []
    for ext in sorted(extents, key=lambda e: e.offset):
        if out and out[-1].end == ext.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + ext.length, DATA)
        else:
            out.append(Extent(ext.offset, ext.length, DATA))
    return out


def check_common(params):
    _rbd.check_name("image", params["image"])
    _rbd.check_name("snapshot", params.get("snapshot"), required=False)
    _rbd.check_name("from_snapshot", params.get("from_snapshot"), required=False)
    if params.get("parallel") is not None and not 1 <= params["parallel"] <= 64:
        raise InputError("parallel must be between 1 and 64")
    if (params.get("writer") or "direct") not in _chain.WRITERS:
        raise InputError("writer must be one of %s" % ", ".join(_chain.WRITERS))
    if params.get("granularity", "auto") not in GRANULARITIES:
        raise InputError("granularity must be one of %s" % ", ".join(GRANULARITIES))
    try:
        _naming.check_prefix(params.get("prefix") or _naming.DEFAULT_PREFIX)
    except ValueError as exc:
        raise InputError(str(exc))


def export_diff_file(params, check_mode=False):
    """``dest`` mode: write the ``rbd diff v1`` stream of ``from_snapshot``..``snapshot`` to a file.

    Written under a temporary name in the same directory, fsynced, then renamed:
    an interrupted run never leaves a truncated file under the final name.
    """
    check_common(params)
    dest = params["dest"]
    if not params.get("snapshot"):
        raise InputError("dest mode needs snapshot: the end point of the diff")
    if params.get("from_snapshot") == params["snapshot"]:
        raise InputError("from_snapshot and snapshot are the same")
    dest_dir = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(dest_dir):
        raise InputError("directory of dest %s does not exist" % dest)
    if os.path.exists(dest) and not params.get("force"):
        raise InputError("dest %s already exists; set force=true to replace it" % dest)
    pool, ns, image = params["pool"], params.get("namespace"), params["image"]
    with _rbd.session(params, pool, ns) as sess:
        with sess.image(image, snapshot=params["snapshot"]) as img:
            if params.get("from_snapshot"):
                snaps = [s["name"] for s in _rbd.list_snapshots(img)]
                if params["from_snapshot"] not in snaps:
                    raise NotFoundError("from_snapshot %s does not exist"
                                        % _rbd.spec(pool, image, ns, params["from_snapshot"]))
            result = dict(changed=True, dest=dest, snapshot=params["snapshot"],
                          from_snapshot=params.get("from_snapshot"), full=not params.get("from_snapshot"))
            if check_mode:
                return result
            extents = diff_extents(img, params.get("from_snapshot"), params.get("granularity") or "exact")
            source = RbdSource(img)
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".partial", dir=dest_dir)
            try:
                with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                    writer = DiffWriter(fh)
                    writer.header(size=source.size, from_snap=params.get("from_snapshot"), to_snap=params["snapshot"])
                    stats, _digests = copy_extents(source, extents, DiffStreamSink(writer),
                                                   parallel=params.get("parallel") or 8, chunk=DEFAULT_CHUNK)
                    writer.end()
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, parse_mode(params.get("file_mode") or "0600", "file_mode"))
                os.rename(tmp, dest)
                fsync_dir(dest_dir)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
    result.update(stats.as_dict())
    result["size"] = source.size
    result["stream_bytes"] = os.path.getsize(dest)
    return result


def _point_source(sess, image, img, snap):
    return dict(type="rbd", pool=sess.pool, namespace=sess.namespace, image=image, image_id=img.id(),
                snapshot_id=snap["id"])


def choose_base(repo, params, snaps, image_id):
    """(parent point or None, reason for a full backup or None).  Pure: unit-tested."""
    latest = repo.latest()
    by_name = dict((s["name"], s) for s in snaps)
    if params.get("force_full"):
        return None, "force_full was set"
    if latest is None:
        return None, "first backup of this disk"
    if latest.get("bad"):
        return None, "the last point %s is marked bad" % latest["name"]
    base = latest.get("snapshot")
    src = latest.get("source") or {}
    if src.get("image_id") and src["image_id"] != image_id:
        return None, "the image was re-created (id %s, the last point was taken from id %s)" % (image_id, src["image_id"])
    if base not in by_name:
        return None, "the base snapshot %s of the last point %s no longer exists" % (base, latest["name"])
    if src.get("snapshot_id") is not None and by_name[base]["id"] != src["snapshot_id"]:
        return None, "snapshot %s was re-created since the last point %s" % (base, latest["name"])
    wanted = params.get("from_snapshot")
    if wanted and wanted != base:
        return None, "from_snapshot %s is not the snapshot of the last point (%s)" % (wanted, base)
    if latest["size"] % 512:
        return None, "the last point has an odd size"
    return latest, None


def backup_to_chain(params, check_mode=False):
    """``chain`` mode: append one point (a qcow2 layer) to the disk's repository."""
    check_common(params)
    prefix = params.get("prefix") or _naming.DEFAULT_PREFIX
    dir_mode = parse_mode(params.get("dir_mode") or "0700", "dir_mode")
    file_mode = parse_mode(params.get("file_mode") or "0600", "file_mode")
    parallel = params.get("parallel") or 8
    pool, ns, image = params["pool"], params.get("namespace"), params["image"]
    repo = _chain.Repository(params["chain"], dir_mode=dir_mode, file_mode=file_mode)
    if check_mode and not os.path.isdir(params["chain"]):
        repo = None
    result = dict(changed=True, chain=params["chain"], removed_snapshots=[], cleaned_partial=[])
    with _rbd.session(params, pool, ns) as sess:
        with sess.image(image, read_only=check_mode) as head:
            snaps = _rbd.list_snapshots(head, prefix)
            names = [s["name"] for s in snaps]
            if params.get("snapshot") and params["snapshot"] not in names:
                raise NotFoundError("snapshot %s does not exist" % _rbd.spec(pool, image, ns, params["snapshot"]))
            if check_mode:
                return _check_mode_result(result, repo, params, snaps, head.id())
            repo.ensure_dir()
            with repo.lock():
                repo.load()
                result["cleaned_partial"] = repo.cleanup_partial()
                parent, reason = choose_base(repo, params, snaps, head.id())
                created = None
                snapshot = params.get("snapshot")
                if not snapshot:
                    snapshot = created = _naming.unique_managed_name(names, prefix)
                    _rbd.create_snapshot(head, snapshot)
                try:
                    point = _append_point(sess, repo, image, snapshot, parent, params, parallel)
                except BaseException:
                    if created:
                        _rbd.remove_snapshot(head, created)
                    raise
                if params.get("prune_snapshots", True):
                    for snap in _rbd.list_snapshots(head, prefix):
                        if snap["managed"] and snap["name"] != snapshot:
                            if _rbd.snapshot_children(sess, image, snap["name"]):
                                continue  # never remove a clone parent; reported by rbd_snapshot_info
                            _rbd.remove_snapshot(head, snap["name"])
                            result["removed_snapshots"].append(snap["name"])
    result.update(point=point, snapshot=snapshot, created_snapshot=created,
                  full=parent is None, full_reason=reason, from_snapshot=parent and parent["snapshot"])
    for key in ("bytes_read", "bytes_written", "zero_bytes", "extents", "seconds"):
        result[key] = point[key]
    result["mb_per_s"] = point["extra"].get("mb_per_s")
    return result


def _check_mode_result(result, repo, params, snaps, image_id):
    if repo is not None and os.path.exists(repo.manifest_path):
        repo.load()
        parent, reason = choose_base(repo, params, snaps, image_id)
    else:
        parent, reason = None, "first backup of this disk"
    result.update(full=parent is None, full_reason=reason, from_snapshot=parent and parent["snapshot"],
                  snapshot=params.get("snapshot"), point=None)
    return result


def _append_point(sess, repo, image, snapshot, parent, params, parallel):
    from_snapshot = parent["snapshot"] if parent else None
    with sess.image(image, snapshot=snapshot) as img:
        snap = [s for s in _rbd.list_snapshots(img) if s["name"] == snapshot][0]
        size = img.size()
        extents = diff_extents(img, from_snapshot, params.get("granularity") or "auto")
        if parent:
            extents += resize_edge(parent["size"], size, repo.block_size)
        extents = align_to_blocks(extents, repo.block_size, size)
        parsed = _naming.parse_managed(snapshot, params.get("prefix") or _naming.DEFAULT_PREFIX)
        name = _naming.unique_managed_name(repo.names(), prefix="", when=parsed)
        if size % 512:
            raise InputError("image size %d is not a multiple of 512 bytes" % size)
        with repo.begin_point(name, size, parent=parent and parent["name"], create=False) as pending:
            with layer_sink(pending, params.get("writer") or "direct", parallel,
                            params.get("nbd_cache") or "none") as sink:
                if hasattr(sink, "reserve"):
                    sink.reserve(sum(ext.length for ext in extents if ext.kind == DATA))
                stats, block_digests = copy_extents(RbdSource(img), extents, sink, parallel=parallel,
                                                    digest=pending.block_digest, digests=pending.new_digests(),
                                                    chunk=DEFAULT_CHUNK, block_size=repo.block_size)
            run = stats.as_dict()
            extra = dict(mb_per_s=run["mb_per_s"], granularity=params.get("granularity") or "auto",
                         from_snapshot=from_snapshot)
            return repo.publish(pending, dict(
                snapshot=snapshot, source=_point_source(sess, image, img, snap),
                bytes_read=run["bytes_read"], bytes_written=run["bytes_written"], zero_bytes=run["zero_bytes"],
                extents=run["extents"], seconds=run["seconds"], extra=extra), digests=block_digests)
