# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seed-004 repository kind (module zfs_mirror): a raw mirror file per disk on a ZFS dataset,
updated in place with only the blocks that changed, then a ZFS snapshot of the dataset as the point.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

What the seed does with ``rsync --inplace --no-whole-file``, done safely:

- The source is a point in time the caller took (an LVM snapshot, or any raw file or device): it is
  read whole and each 64 KiB block's keyed digest (``_repository/digests.py``, the key in
  ``<mountpoint>/.snapchain-digest.key``) is compared with the digest of what the mirror holds; only
  the blocks that differ are written, in place (zeroed blocks as holes: ``fallocate`` punch hole), so
  every ZFS snapshot shares the unchanged blocks with the previous one.  rsync reads both files to
  compare them; the digests kept beside the mirror (``.<file>.digests``) spare that second read.
- Before the first byte is written, the state beside the mirror (``.<file>.snapchain.json``) says
  ``dirty``; it says clean again only after the file and the digests are fsynced.  A run killed in
  between leaves a mirror that matches neither the old digests nor the source: the next run sees
  ``dirty`` and rewrites every block (correct, at the cost of the blocks the snapshots no longer
  share).  The ZFS snapshots already taken never change: ZFS writes every block elsewhere.
- Only then is ``<dataset>@<prefix><UTC time>`` taken (``_zfs/snapshots.ensure``): the point, named
  like every managed snapshot of ours, and pruned by keep-N or a keep-* policy of ours only.
- One run per mirror: ``.<file>.lock`` (flock) is held from the first read to the snapshot.

A point is the raw file ``<mountpoint>/.zfs/snapshot/<snapshot>/<file>``.  qcow2_chain_restore (and the
restore role) restore it with ``mirror: {dataset, file}`` through ``held_point``: the point chosen among OUR
snapshots of the dataset (managed names; anyone else's are ignored) as a chain's points are
(``_engine.restore.select_point``: latest, by name, ``before`` a time), checked to be a mirror that was clean
when the snapshot was taken (its state file in the snapshot), and held (``zfs hold snapchain-restore.<pid>.<start>``)
for the whole restore so that a prune cannot destroy it mid-way; the hold is released on every path, and
one a killed restore left (its process gone) is released by the next restore of the dataset.  Plain
tools work as well: ``qemu-img convert``, ``rbd import``, or a qcow2 overlay on it for an instant boot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs as _zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import (
    fsync_dir, lock_or_fail, replace_file, write_json_atomic)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.process import start_time
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import digests as _digests
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.lvm import LvmSnapshotSource, parse_lv
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._targets.device import DeviceSink
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import digest_scan
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs import snapshots as _snapshots

STATE_VERSION = 1
BLOCK_SIZE = _digests.DEFAULT_BLOCK_SIZE
KEY_NAME = ".snapchain-digest.key"
MAX_PARALLEL = 64
SOURCES = ("source", "lvm_snapshot")


class _Unknown:
    """The digests of a mirror whose content is not known (new, or left dirty by a killed run): no block
    matches, so every block of the source is written (a data block) or zeroed (a zero block)."""

    _NEVER = b"\xff" * _digests.DIGEST_SIZE

    def run(self, first, end):
        return self._NEVER * (end - first)


def check_file_name(name):
    if not name or "/" in name or name.startswith(".") or "\0" in name or len(name.encode("utf-8")) > 255:
        raise InputError("file %r must be a plain file name inside the dataset (no '/', not starting with '.')"
                         % (name,))
    return name


def check_params(params):
    dataset = _zfs.check_dataset(params.get("dataset"))
    name = check_file_name(params.get("file"))
    if sum(bool(params.get(key)) for key in SOURCES) != 1:
        raise InputError("exactly one of %s is required" % ", ".join(SOURCES))
    parallel = params.get("parallel") or 8
    if not 1 <= parallel <= MAX_PARALLEL:
        raise InputError("parallel must be between 1 and %d, not %r" % (MAX_PARALLEL, parallel))
    bwlimit = params.get("bwlimit")
    if bwlimit is not None and bwlimit <= 0:
        raise InputError("bwlimit must be > 0 (bytes per second), not %r" % (bwlimit,))
    _snapshots.validate(dict(params, dataset=dataset, name=None, state="present", hold=None))
    return dataset, name, parallel


def mountpoint(dataset):
    """The mounted filesystem's directory; InputError/ConflictError for a volume or an unmounted one."""
    props = _zfs.get([dataset], ["type", "mounted", "mountpoint"]).get(dataset) or {}
    if props.get("type") != "filesystem":
        raise InputError("dataset %s is a %s, not a filesystem: the mirror is a file in it" % (dataset, props.get("type")),
                         dataset=dataset)
    where = props.get("mountpoint") or ""
    if props.get("mounted") != "yes" or not where.startswith("/"):
        raise ConflictError("dataset %s is not mounted (mountpoint %s): mount it first (zfs mount %s)"
                            % (dataset, where or "none", dataset), dataset=dataset)
    return where


class Mirror:
    """The mirror file of one disk and what is kept beside it."""

    def __init__(self, directory, name):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.state_path = os.path.join(directory, ".%s.snapchain.json" % name)
        self.digests_path = os.path.join(directory, ".%s.digests" % name)
        self.lock_path = os.path.join(directory, ".%s.lock" % name)
        self.key_path = os.path.join(directory, KEY_NAME)
        self._lock_fd = None

    def lock(self):
        self._lock_fd = lock_or_fail(self.lock_path, "another run updates the mirror %s now (it holds %s)"
                                     % (self.path, self.lock_path), mirror=self.path)

    def unlock(self):
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # the flock goes with it

    def state(self):
        try:
            with open(self.state_path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RepositoryError("cannot read the mirror state %s: %s (remove it to rewrite the mirror whole)"
                                  % (self.state_path, exc), path=self.state_path)
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise RepositoryError("the mirror state %s is not of version %d" % (self.state_path, STATE_VERSION),
                                  path=self.state_path)
        return doc

    def key(self):
        """The digest secret beside the mirrors (created on first use, 0600), checked as a repository's is."""
        key = _digests.read_key(self.key_path)
        if key is None:
            replace_file(self.key_path, os.urandom(_digests.KEY_SIZE), 0o600,
                         temp=self.key_path + ".%d.tmp" % os.getpid())  # under the lock: nobody races us
            key = _digests.read_key(self.key_path)
        return key

    def known_digests(self, state, size, identity):
        """(digests of the mirror's content, or None, why not)."""
        if state is None or not os.path.exists(self.path):
            return None, "first update of this mirror"
        if state.get("dirty"):
            return None, "the last update of this mirror was interrupted: every block is written again"
        if state.get("size") != size:
            return None, "the source size changed from %s to %d bytes" % (state.get("size"), size)
        if state.get("source") != identity:
            return None, "the source changed (%s, now %s)" % (state.get("source"), identity)
        try:
            return _digests.BlockDigests.load(self.digests_path), None
        except RepositoryError as exc:
            return None, "the digests beside the mirror are unusable (%s)" % exc.msg


def open_source(params):
    if params.get("lvm_snapshot"):
        vg, name = parse_lv(params["lvm_snapshot"])
        return LvmSnapshotSource(vg, name)
    return RawSource(params["source"])


def update(params, check_mode=False):
    dataset, name, parallel = check_params(params)
    directory = mountpoint(dataset)
    mirror = Mirror(directory, name)
    if os.path.islink(mirror.path) or (os.path.lexists(mirror.path) and not os.path.isfile(mirror.path)):
        raise InputError("%s exists and is not a regular file (a symbolic link, a directory...): the mirror is "
                         "never written through one" % mirror.path, path=mirror.path)
    with open_source(params) as src:
        if src.size <= 0:
            raise InputError("the source is empty: nothing to mirror")
        # the disk, not the moment: a new LVM snapshot of the same LV each run is the same source
        identity = dict((k, v) for k, v in src.identity().items() if k != "snapshot")
        if not check_mode:  # check mode creates nothing, not even the lock file
            mirror.lock()
        try:
            state = mirror.state()
            base, reason = mirror.known_digests(state, src.size, identity)
            result = dict(changed=True, dataset=dataset, file=mirror.path, size=src.size, source=identity,
                          full=base is None, full_reason=reason)
            if check_mode:
                if base is not None:
                    base.close()
                result["snapshot"] = None
                return result
            if params.get("bwlimit"):
                src.limit_rate(params["bwlimit"])
            stats = _write(mirror, src, base, identity, parallel)
            # still under the lock: no other run may write the file while its snapshot is taken
            snap = _snapshots.ensure(dict(params, dataset=dataset, name=None, state="present", hold=None,
                                          recursive=False))
        finally:
            mirror.unlock()
    result.update(bytes_read=stats.bytes_read, bytes_written=stats.bytes_written, zero_bytes=stats.zero_bytes,
                  seconds=round(stats.seconds, 3), snapshot=snap["snapshot"],
                  snapshot_path=os.path.join(directory, ".zfs", "snapshot", snap["snapshot"], name),
                  destroyed=snap["destroyed"], snapshots=[s["name"] for s in snap["snapshots"] if s["managed"]],
                  decisions=snap["decisions"], bytes_freed=snap["bytes_freed"])
    return result


def _write(mirror, src, base, identity, parallel):
    """Mark dirty, write what differs, fsync, save the digests, mark clean; the copy's Stats."""
    digester = _digests.Digester(_digests.KEYED_DIGEST, mirror.key())
    write_json_atomic(mirror.state_path, dict(version=STATE_VERSION, dirty=True, size=src.size, source=identity,
                                              block_size=BLOCK_SIZE, digest=_digests.KEYED_DIGEST))
    # never through a symbolic link planted at the mirror's name
    fd = os.open(mirror.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if os.fstat(fd).st_size != src.size:
            os.ftruncate(fd, src.size)
        with DeviceSink(fd, mirror.path) as sink:
            stats, written = digest_scan(src, sink, base=base if base is not None else _Unknown(), parallel=parallel,
                                         digest=digester, block_size=BLOCK_SIZE)
        src.after_copy()  # the source is still the moment it was (an LVM snapshot that did not overflow...)
        os.fsync(fd)
    finally:
        os.close(fd)
    current = base.update(written) if base is not None else written
    temp = mirror.digests_path + ".%d.tmp" % os.getpid()
    try:
        current.save(temp)
        os.replace(temp, mirror.digests_path)
    finally:
        current.close()
        if os.path.exists(temp):
            os.unlink(temp)
    fsync_dir(mirror.directory)
    write_json_atomic(mirror.state_path, dict(version=STATE_VERSION, dirty=False, size=src.size, source=identity,
                                              block_size=BLOCK_SIZE, digest=_digests.KEYED_DIGEST))
    return stats


# --- reading a point back (qcow2_chain_restore mirror=) ------------------------------------------

RESTORE_TAG = "snapchain-restore"  # + ".<pid>.<start time>": the hold a restore keeps while it reads a point
_RESTORE_TAG_RE = re.compile(r"^%s\.(\d+)\.(\d+)$" % re.escape(RESTORE_TAG))


def check_source(spec):
    """``mirror: {dataset, file, prefix}`` of qcow2_chain_restore: (dataset, file name, prefix), or InputError."""
    if not isinstance(spec, dict):
        raise InputError("mirror must be a dict like {dataset: pool/fs, file: disk.raw}, not %r" % (spec,))
    dataset = _zfs.check_dataset(spec.get("dataset"), what="mirror.dataset")
    name = check_file_name(spec.get("file"))
    return dataset, name, _snapshots.check_prefix(spec.get("prefix"))


def restore_tag(pid=None):
    """Our hold tag for a restore by process ``pid`` (default this one): its pid and start time, so that a
    later run can tell that the process is gone (a pid alone may be reused)."""
    pid = os.getpid() if pid is None else pid
    return "%s.%d.%d" % (RESTORE_TAG, pid, start_time(pid) or 0)


def stale_restore_holds(snaps):
    """[(tag, full snapshot name)] of the restore holds of ours whose process is gone (a killed restore)."""
    out = []
    for snap in snaps:
        for tag in snap["holds"]:
            m = _RESTORE_TAG_RE.match(tag)
            if m and start_time(int(m.group(1))) != int(m.group(2)):
                out.append((tag, snap["full_name"]))
    return out


class MirrorPoint:
    """A point of a mirror as _engine.restore._restore takes it (see restore.ChainPoint): the raw file
    in the chosen snapshot, read by restore.RawReader."""

    fmt = "raw"

    def __init__(self, dataset, directory, name, snap, size, skipped, before):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import iso
        self.snapshot = snap["full_name"]
        self.path = os.path.join(directory, ".zfs", "snapshot", snap["name"], name)
        self.point = dict(name=snap["name"], size=size)
        when = _naming.parse_managed(snap["name"], snap["prefix"])
        self.result = dict(chain=None, chain_depth=None, mirror=dict(dataset=dataset, file=name, snapshot=self.snapshot,
                                                                     path=self.path),
                           point=snap["name"], point_time=iso(when), size=size, skipped_points=skipped,
                           point_info=dict((k, snap.get(k)) for k in ("name", "full_name", "createtxg", "creation",
                                                                      "guid", "used", "referenced")),
                           before=iso(before) if before else None)
        self.warnings = []

    def reader(self, parallel, result):
        from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import RawReader
        result.update(reader=RawReader.name, reader_fallback=None)
        return _measured(RawReader(self.path, self.point["size"]))


@contextlib.contextmanager
def _measured(reader):
    with reader:
        reader.measure()
        yield reader


def _point_size(directory, name, snap):
    """The size of the mirror file in ``snap``, after checking that the snapshot holds a mirror that was
    clean (not half updated) when it was taken: its state file says so, for the file's size."""
    root = os.path.join(directory, ".zfs", "snapshot", snap["name"])
    inside = Mirror(root, name)
    where = "%s (%s)" % (snap["full_name"], inside.path)
    try:
        state = inside.state()
    except RepositoryError as exc:
        raise RepositoryError("%s is not a usable mirror point: %s" % (where, exc.msg), snapshot=snap["full_name"])
    if state is None or not os.path.lexists(inside.path):
        raise NotFoundError("%s holds no mirror %s made by zfs_mirror (%s): is the dataset a mirror, and is file the "
                            "mirror's name?" % (snap["full_name"], name, "no file" if not os.path.lexists(inside.path)
                                                else "no state file %s" % os.path.basename(inside.state_path)),
                            snapshot=snap["full_name"])
    if os.path.islink(inside.path) or not os.path.isfile(inside.path):
        raise InputError("%s is not a regular file: a mirror point is never read through one" % where,
                         snapshot=snap["full_name"])
    size = os.path.getsize(inside.path)
    if state.get("dirty") or state.get("size") != size:
        raise RepositoryError("%s was taken while the mirror was being updated (its state says %s, %s bytes; the file "
                              "is %d bytes): not a point zfs_mirror made; choose another"
                              % (where, "dirty" if state.get("dirty") else "clean", state.get("size"), size),
                              snapshot=snap["full_name"])
    return size


@contextlib.contextmanager
def held_point(spec, point, before, check_mode, warnings, destination=None):
    """The chosen point of the mirror ``spec`` as a MirrorPoint, held by our restore tag until the block ends.

    Point choice: OUR snapshots of the dataset only (managed names with ``prefix``, oldest first by
    createtxg), as _engine.restore.select_point chooses a chain's (``point`` may be the snapshot's name or
    its bare stamp).  ``destination``: a file restore's path, refused inside the dataset's mount point.
    Restore holds of ours whose process is gone are released first (not in check mode: then listed)."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.restore import _inside, select_point
    dataset, name, prefix = check_source(spec)
    directory = mountpoint(dataset)
    if destination and _inside(destination, directory):
        raise InputError("file %s is inside the mirror's dataset %s (mounted at %s): restore it somewhere else (it "
                         "would be in the next point)" % (destination, dataset, directory))
    _datasets, snaps = _snapshots.read(dataset, False, prefix, RESTORE_TAG)
    for tag, full in stale_restore_holds(snaps):
        if check_mode:
            warnings.append("%s has the hold %s of a restore that is gone; a real run releases it" % (full, tag))
            continue
        _zfs.release(tag, [full])
        warnings.append("released the hold %s on %s, left by a restore that was killed" % (tag, full))
    ours = [dict(s, prefix=prefix) for s in snaps if s["managed"] and s["dataset"] == dataset]
    if not ours:
        raise NotFoundError("dataset %s has no snapshot named %s<UTC time>, so no point of a zfs_mirror mirror%s"
                            % (dataset, prefix, " (its snapshots, not ours, are ignored: %s)"
                               % ", ".join(s["name"] for s in snaps[-10:]) if snaps else ""),
                            dataset=dataset, available_points=[])
    names = set(s["name"] for s in ours)
    if point not in (None, "", "latest") and point not in names and prefix + point in names:
        point = prefix + point  # the bare stamp of a snapshot name
    chosen, skipped = select_point(ours, point, before, time_of=lambda s: _naming.parse_managed(s["name"], prefix))
    tag = None
    if not check_mode:
        tag = restore_tag()
        try:
            _zfs.hold(tag, [chosen["full_name"]])
        except CommandError as exc:
            raise ConflictError("cannot hold %s for the restore (destroyed meanwhile?): %s"
                                % (chosen["full_name"], exc.msg), snapshot=chosen["full_name"])
    try:
        size = _point_size(directory, name, chosen)
        yield MirrorPoint(dataset, directory, name, chosen, size, skipped, before)
    except BaseException:
        if tag is not None:
            try:
                _zfs.release(tag, [chosen["full_name"]])
            except CommandError as exc:
                warnings.append("could not release the hold %s on %s: %s (the next restore of %s releases it)"
                                % (tag, chosen["full_name"], exc.msg, dataset))
        raise
    if tag is not None:
        _zfs.release(tag, [chosen["full_name"]])
