# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_append module's logic: append a point to a disk's chain from a non-RBD source.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The one backup flow (``_engine/backup.py``) with one of these sources:

``lvm_snapshot`` (``VG/NAME``, a classic or thin LVM snapshot)
    ``_sources/lvm.py``: a classic one by digest scan; a thin one with the changed blocks from
    the pool's metadata (``thin_delta``) since the last point's thin snapshot, which is removed
    after publish (the new one stays as the next base).

``source`` (a raw file or block device: an LVM/ZFS snapshot, a ploop image's data...)
    ``_sources/raw.py``: no diff to go by, so the whole source is read in parallel and every
    64 KiB block is digested as it is read and compared with the effective digests of the latest
    point; only blocks whose digest differs are written (all-zero ones as zero clusters).  An
    unchanged source still gives a point (an empty layer, 0 bytes written).  A full backup
    (first point, size change, bad or digest-less latest point, ``force_full``) starts a new
    segment and writes only the non-zero blocks.

``ploop_descriptor`` (an OpenVZ ploop disk's ``DiskDescriptor.xml``)
    ``_sources/ploop.py``: our snapshot, the changed clusters from the delta written since the
    last point, the older snapshot folded away after publish.  ``cleanup_only`` makes no backup:
    it cleans what a killed run left and folds snapshots the newest point does not need.

``source`` with ``source_format`` qcow2 (or another QEMU image format)
    ``_sources/image.py``: the guest disk the image file holds (backing chain, compressed clusters),
    read through ``qemu-nbd --read-only``, digest-scanned like a raw source; what QEMU reads as
    zeroes (unallocated, zero clusters) is not read.

``diff`` (an ``rbd diff v1`` file, as ``rbd export-diff`` writes it)
    ``_sources/diff_file.py``: its records are replayed into a layer on top of the latest point,
    like ``rbd import-diff``; the diff's from-snap must be the latest point's ``snapshot``.

``zfs_snapshot`` (``pool/vol@snap``, a ZFS volume's snapshot)
    ``_sources/zfs.py``: its device (snapdev made visible for the run), the changed blocks from
    ``zfs send -i`` of the last point's snapshot when it still exists, else a digest scan.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import check_progress_file
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import check_run_options
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    WRITERS, Repository, check_point_name)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_img import CACHE_MODES
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import scan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.backup import backup, tidy
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.diff_file import DiffFileSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.image import SOURCE_FORMATS, ImageFileSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.ploop import PloopSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.lvm import THIN, open_snapshot, parse_lv
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.zfs import ZvolSnapshotSource, parse_snapshot

MAX_PARALLEL = 64
SOURCES = ("source", "diff", "ploop_descriptor", "lvm_snapshot", "zfs_snapshot")


def check_params(params):
    """Validate everything that needs no I/O; returns the normalised values."""
    if not params.get("chain"):
        raise InputError("chain (the disk's repository directory) is required")
    if sum(bool(params.get(key)) for key in SOURCES) != 1:
        raise InputError("exactly one of %s is required" % ", ".join(SOURCES))
    source_format = params.get("source_format") or "raw"
    if source_format not in SOURCE_FORMATS:
        raise InputError("source_format must be one of %s, not %r" % (", ".join(SOURCE_FORMATS), source_format))
    if source_format != "raw" and not params.get("source"):
        raise InputError("source_format %s applies to source (an image file)" % source_format)
    if params.get("cleanup_only") and not params.get("ploop_descriptor"):
        raise InputError("cleanup_only applies to ploop_descriptor (the ploop disk's snapshots)")
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
    run_info, run_keep = check_run_options(params)
    check_progress_file(params.get("progress_file"), params.get("source"), params.get("diff"))
    return dict(parallel=parallel, cache=cache, writer=writer, run_info=run_info, run_keep=run_keep,
                source_format=source_format,
                dir_mode=parse_mode(params.get("dir_mode") or "0700", "dir_mode"),
                file_mode=parse_mode(params.get("file_mode") or "0600", "file_mode"))


def _check_size(size, what):
    if size <= 0:
        raise InputError("%s is empty: nothing to back up" % what, size=size)
    if size % 512:
        raise InputError("%s is %d bytes, not a multiple of 512 (qcow2 images are)" % (what, size), size=size)


def append_point(params, check_mode=False):
    """Append one point to the repository ``params['chain']`` from ``source`` or ``diff``."""
    opts = check_params(params)
    repo = Repository(params["chain"], dir_mode=opts["dir_mode"], file_mode=opts["file_mode"])
    run = dict(force_full=params.get("force_full"), point_name=params.get("point_name"), writer=opts["writer"],
               parallel=opts["parallel"], cache=opts["cache"], check_mode=check_mode, run_info=opts["run_info"],
               run_keep=opts["run_keep"], progress_file=params.get("progress_file"))
    if params.get("ploop_descriptor"):
        with PloopSource(params["ploop_descriptor"], params.get("ploop_root") or "/vz/private",
                         config=params.get("ploop_config"), parallel=opts["parallel"], check_mode=check_mode) as src:
            if params.get("cleanup_only"):
                result = tidy(repo, src, check_mode=check_mode)
                result.update(mode="ploop", descriptor=src.descriptor)
                return result
            _check_size(src.size, "ploop disk %s" % src.descriptor)
            result = backup(repo, src, extra=dict(mode="ploop"), **run)
            result.update(mode="ploop", size=src.size, snapshot=src.snapshot, descriptor=src.descriptor)
    elif params.get("lvm_snapshot"):
        vg, name = parse_lv(params["lvm_snapshot"])
        with open_snapshot(vg, name, check_mode=check_mode) as src:
            _check_size(src.size, "LVM snapshot %s" % params["lvm_snapshot"])
            result = backup(repo, src, extra=dict(mode="lvm", lvm=dict(vg=vg, lv=src.origin)), **run)
            result.update(mode="lvm", size=src.size, snapshot=name, lv=src.origin)
            if src.kind == THIN:
                result.update(pool=src.pool, thin_id=src.thin_id, changed_blocks=src.changed_blocks,
                              changed_blocks_reason=src.changed_blocks_reason)
                if src.delta_info.get("stale_metadata_snap") is not None:
                    result["warnings"].append(
                        "thin pool %s/%s held a metadata snapshot (root %s) left by a killed run: released before "
                        "this run reserved its own" % (vg, src.pool, src.delta_info["stale_metadata_snap"]))
    elif params.get("zfs_snapshot"):
        zvol, name = parse_snapshot(params["zfs_snapshot"])
        with ZvolSnapshotSource(zvol, name) as src:
            _check_size(src.size, "ZFS snapshot %s" % params["zfs_snapshot"])
            result = backup(repo, src, extra=dict(mode="zfs"), **run)
            result.update(mode="zfs", size=src.size, snapshot=name, zvol=zvol, changed_blocks=src.changed_blocks)
    elif params.get("source") and opts["source_format"] != "raw":
        with ImageFileSource(params["source"], opts["source_format"], parallel=opts["parallel"],
                             check_mode=check_mode) as src:
            _check_size(src.size, "source %s" % params["source"])
            src.snapshot = params.get("snapshot_name")
            result = backup(repo, src, extra=dict(mode="source", source_format=src.fmt), **run)
            result.update(mode="source", size=src.size, snapshot=src.snapshot, source_format=src.fmt,
                          backing_files=src.backing)
            result["warnings"].extend(src.warnings)
    elif params.get("source"):
        with RawSource(params["source"]) as src:
            _check_size(src.size, "source %s" % params["source"])
            src.snapshot = params.get("snapshot_name")
            result = backup(repo, src, extra=dict(mode="source"), **run)
            result.update(mode="source", size=src.size, snapshot=src.snapshot, source_format="raw")
    else:
        with DiffFileSource.open(params["diff"], params.get("snapshot_name")) as src:
            _check_size(src.size, "the image of diff %s" % params["diff"])
            if params.get("force_full") and src.from_snap is not None:
                raise InputError("force_full needs a full diff, but %s starts from snapshot %r"
                                 % (params["diff"], src.from_snap))
            if check_mode and src.fh.seekable():  # the whole stream: a malformed diff fails in check mode too
                src.fh.seek(0)
                scan(src.fh)
            result = backup(repo, src, **run)
            result.update(mode="diff", size=src.size, snapshot=src.snapshot, from_snapshot=src.from_snap)
    return result
