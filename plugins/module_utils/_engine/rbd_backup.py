# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_export_diff module's logic: an RBD snapshot into a qcow2 chain or an rbd diff v1 file.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``chain`` mode is the one backup flow (``_engine/backup.py``) with an RBD source
(``_sources/rbd.py``).  ``dest`` mode streams the diff of two snapshots into a file,
written under a temporary name, fsynced and renamed; a killed run's temporary file is
removed by the next run into the same ``dest`` (it is ours while its writer holds an
flock on it; a dead writer's lock is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import tempfile

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import check_progress_file
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.run_summary import check_run_options
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import repository as _chain
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, NotFoundError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir, parse_mode
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.slots import TransferSlot
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.backup import backup
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.rbd import GRANULARITIES, RbdSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import (
    DEFAULT_CHUNK, DiffStreamSink, copy_extents)


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
    if (params.get("bwlimit") or 0) < 0:
        raise InputError("bwlimit is in MiB/s and must be >= 0 (0: no limit)")
    if (params.get("transfer_slots") or 0) < 0:
        raise InputError("transfer_slots must be >= 0 (0: no cap)")
    group = params.get("transfer_slot_group") or "backup"
    if not _SLOT_GROUP_RE.match(group):
        raise InputError("transfer_slot_group %r: 1-64 letters, digits, '.', '_' or '-'" % group)


_SLOT_GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@contextlib.contextmanager
def transfer_limits(params, sess, source, what, check_mode=False):
    """The run's share of the cluster: ``bwlimit`` MiB/s on the source's reads, and one of the
    ``transfer_slots`` of the pool (``_ceph/slots.py``) held while the body runs.  Yields a dict that
    says, once the body is done, which slot was held and when (empty without slots or in check mode)."""
    info = {}
    if params.get("bwlimit"):
        source.limit_rate(params["bwlimit"] * (1 << 20))
    if not params.get("transfer_slots") or check_mode:
        yield info
        return
    with sess.cluster.open_ioctx(sess.pool) as ioctx:
        slot = TransferSlot(ioctx, params.get("transfer_slot_group") or "backup", params["transfer_slots"],
                            wait=params["transfer_slot_wait"] if params.get("transfer_slot_wait") is not None
                            else 3600, what=what)
        slot.acquire()
        try:
            yield info
        finally:
            slot.release()
            info.update(slot.as_dict())


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
        with sess.image(image, read_only=True) as head:
            source = RbdSource(sess, image, head, snapshot=params["snapshot"], granularity=params.get("granularity")
                               or "exact")
            if params.get("from_snapshot"):
                base = source.find_snapshot(params["from_snapshot"])
                if base is None:
                    raise NotFoundError("from_snapshot %s does not exist"
                                        % _rbd.spec(pool, image, ns, params["from_snapshot"]))
                if base["id"] > source.find_snapshot(params["snapshot"])["id"]:
                    raise InputError("from_snapshot %s was taken after snapshot %s: a diff goes from the older "
                                     "snapshot to the newer one (swap them?)"
                                     % (params["from_snapshot"], params["snapshot"]))
            result = dict(changed=True, dest=dest, snapshot=params["snapshot"],
                          from_snapshot=params.get("from_snapshot"), full=not params.get("from_snapshot"),
                          cleaned_partial=[])
            if check_mode:
                return result
            result["cleaned_partial"] = clean_dest_partials(dest)
            source.prepare(None)
            parent = dict(snapshot=params["from_snapshot"]) if params.get("from_snapshot") else None
            extents = source.changed_extents(parent)
            try:
                with transfer_limits(params, sess, source, _rbd.spec(pool, image, ns)) as slot:
                    stats = _write_diff_file(params, source, extents, dest, dest_dir)
            finally:
                source.close()
    result.update(stats.as_dict())
    if slot:
        result["transfer_slot"] = slot
    result["size"] = source.size
    result["stream_bytes"] = os.path.getsize(dest)
    return result


def _write_diff_file(params, source, extents, dest, dest_dir):
    """The ``rbd diff v1`` stream of ``extents`` into ``dest``: a flocked ``.partial`` file fsynced and renamed."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".partial", dir=dest_dir)
    fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we live: see clean_dest_partials
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
    return stats


def clean_dest_partials(dest):
    """Remove the temporary files of killed runs into ``dest`` (``.<name>.<random>.partial``).

    A live writer holds an flock on its file: a file we can lock is a dead run's.
    """
    removed = []
    pattern = os.path.join(glob.escape(os.path.dirname(os.path.abspath(dest))),
                           "." + glob.escape(os.path.basename(dest)) + ".*.partial")
    for path in sorted(glob.glob(pattern)):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run writes it
        finally:
            os.close(fd)
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:
            pass
    return removed


def backup_to_chain(params, check_mode=False):
    """``chain`` mode: append one point (a qcow2 layer) to the disk's repository."""
    check_common(params)
    if params.get("snapshot") and params.get("from_snapshot") == params["snapshot"]:
        raise InputError("from_snapshot and snapshot are both %r: a diff of a snapshot with itself is empty. "
                         "Leave from_snapshot out (the chain knows its base)" % params["snapshot"])
    prefix = params.get("prefix") or _naming.DEFAULT_PREFIX
    repo = _chain.Repository(params["chain"], dir_mode=parse_mode(params.get("dir_mode") or "0700", "dir_mode"),
                             file_mode=parse_mode(params.get("file_mode") or "0600", "file_mode"))
    pool, ns, image = params["pool"], params.get("namespace"), params["image"]
    granularity = params.get("granularity") or "auto"
    run_info, run_keep = check_run_options(params)
    check_progress_file(params.get("progress_file"))
    with _rbd.session(params, pool, ns) as sess:
        with sess.image(image, read_only=check_mode) as head:
            source = RbdSource(sess, image, head, snapshot=params.get("snapshot"),
                               from_snapshot=params.get("from_snapshot"), prefix=prefix, granularity=granularity,
                               prune_snapshots=params.get("prune_snapshots", True))
            try:
                with transfer_limits(params, sess, source, _rbd.spec(pool, image, ns), check_mode) as slot:
                    result = backup(repo, source, force_full=params.get("force_full"), writer=params.get("writer") or
                                    "direct", parallel=params.get("parallel") or 8,
                                    cache=params.get("nbd_cache") or "none", check_mode=check_mode,
                                    extra=dict(granularity=granularity), run_info=run_info, run_keep=run_keep,
                                    progress_file=params.get("progress_file"))
            finally:
                source.close()
    if slot:
        result["transfer_slot"] = slot
    result.setdefault("removed_snapshots", [])
    result.setdefault("kept_snapshots", [])
    point, parent = result["point"], result.get("parent")
    result.update(snapshot=point["snapshot"] if point else params.get("snapshot"), created_snapshot=source.created)
    result["from_snapshot"] = repo.get(parent)["snapshot"] if parent else None
    return result
