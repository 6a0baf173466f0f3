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

A point reads back with plain tools from ``<mountpoint>/.zfs/snapshot/<snapshot>/<file>`` (a raw
image: ``qemu-img convert``, ``rbd import``, or a qcow2 overlay on it for an instant boot).
"""

from __future__ import annotations

import json
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs as _zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import (
    fsync_dir, lock_or_fail, replace_file, write_json_atomic)
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
