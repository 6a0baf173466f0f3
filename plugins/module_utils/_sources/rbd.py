# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An RBD image as a backup source: managed snapshots, exact changed extents from librbd.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The point in time is a snapshot: the caller's (``snapshot``, e.g. taken by the vm_backup role
inside a freeze window) or one this source creates with a managed name.  The changed extents
since the parent point come from ``diff_iterate`` between the parent's snapshot and this one,
so an incremental reads what changed, not the disk.  The manifest records the image id and the
snapshot id: a re-created image or snapshot under the same name is never taken as the base.
After publish, older managed snapshots are pruned (never a protected one, never a clone
parent); the newest stays as the next run's base.
"""

from __future__ import annotations

import contextlib
import threading

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source

GRANULARITIES = ("auto", "exact", "object")


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


class RbdSource(Source):
    """``image`` of the session ``sess``; ``head`` is the image opened at its head (read-only in
    check mode).  ``snapshot``: the caller's snapshot (None: create a managed one)."""

    kind = "rbd"

    def __init__(self, sess, image, head, snapshot=None, from_snapshot=None, prefix=_naming.DEFAULT_PREFIX,
                 granularity="auto", prune_snapshots=True):
        self.sess = sess
        self.image = image
        self.head = head
        self.image_id = head.id()
        self.requested = snapshot
        self.from_snapshot = from_snapshot
        self.prefix = prefix
        self.granularity = granularity
        self.prune_snapshots = prune_snapshots
        self.snaps = _rbd.list_snapshots(head, prefix)
        self.snapshot = snapshot
        self.created = None
        self.img = None
        self.snap = None
        self._stack = contextlib.ExitStack()
        self._diff_lock = threading.Lock()
        if snapshot is not None and self.find_snapshot(snapshot) is None:
            raise NotFoundError("snapshot %s does not exist" % self.spec(snapshot))

    def spec(self, snapshot=None):
        return _rbd.spec(self.sess.pool, self.image, self.sess.namespace, snapshot)

    def find_snapshot(self, name):
        for snap in self.snaps:
            if snap["name"] == name:
                return snap
        return None

    # -- choosing the base ---------------------------------------------------------------------
    def base_problem(self, point):
        base = point.get("snapshot")
        src = point.get("source") or {}
        if src.get("image_id") and src["image_id"] != self.image_id:
            return "the image was re-created (id %s, the last point was taken from id %s)" % (
                self.image_id, src["image_id"])
        snap = self.find_snapshot(base)
        if snap is None:
            return "the base snapshot %s of the last point %s no longer exists" % (base, point["name"])
        if src.get("snapshot_id") is not None and snap["id"] != src["snapshot_id"]:
            return "snapshot %s was re-created since the last point %s" % (base, point["name"])
        if self.from_snapshot and self.from_snapshot != base:
            return "from_snapshot %s is not the snapshot of the last point (%s)" % (self.from_snapshot, base)
        if point["size"] % 512:
            return "the last point has an odd size"
        return None

    def refuse(self, repo):
        """A requested snapshot that the newest point already holds is a no-op; an older one is refused."""
        latest = repo.latest()
        if self.requested is None or latest is None:
            return None
        src = latest.get("source") or {}
        if src.get("image_id") != self.image_id or src.get("snapshot_id") is None:
            return None
        wanted = self.find_snapshot(self.requested)
        if wanted["id"] == src["snapshot_id"]:
            return None if repo.unsound_reason(latest["name"]) else latest  # an unsound point is replaced by a full
        if wanted["id"] < src["snapshot_id"]:
            raise InputError(
                "snapshot %s was taken before snapshot %s of the newest point %s: a chain only moves forward. "
                "Back up a newer snapshot (or none, to take one now), or restore point %s if that is what you want"
                % (self.spec(self.requested), latest.get("snapshot"), latest["name"], latest["name"]),
                snapshot=self.requested, point=latest["name"])
        return None

    # -- the point in time ---------------------------------------------------------------------
    def prepare(self, intent):
        if self.requested is None:
            name = _naming.unique_managed_name([s["name"] for s in self.snaps], self.prefix)
            intent(dict(snapshot=name, image_id=self.image_id))
            _rbd.create_snapshot(self.head, name)
            self.snapshot = self.created = name
        self.img = self._stack.enter_context(self.sess.image(self.image, snapshot=self.snapshot))
        self.snap = [s for s in _rbd.list_snapshots(self.img) if s["name"] == self.snapshot][0]
        self.size = self.img.size()
        if self.size % 512:
            raise InputError("image size %d is not a multiple of 512 bytes" % self.size)

    def point_time(self):
        return _naming.parse_managed(self.snapshot, self.prefix)

    def discard(self):
        self._stack.close()
        if self.created:
            _rbd.remove_snapshot(self.head, self.created)
            self.created = None

    def finish(self, point):
        """Prune the older managed snapshots (never a protected one, never a clone parent)."""
        self._stack.close()
        removed, kept = [], []
        if self.prune_snapshots:
            for snap in _rbd.list_snapshots(self.head, self.prefix):
                if not snap["managed"] or snap["name"] == self.snapshot:
                    continue
                if snap["protected"]:
                    kept.append(dict(name=snap["name"], reason="protected"))
                    continue
                children = _rbd.snapshot_children(self.sess, self.image, snap["name"])
                if children:
                    kept.append(dict(name=snap["name"], reason="parent of clone(s) %s" % ", ".join(children)))
                    continue
                _rbd.remove_snapshot(self.head, snap["name"])
                removed.append(snap["name"])
        return dict(removed_snapshots=removed, kept_snapshots=kept)

    def remove_orphan(self, record, referenced):
        name = record.get("snapshot")
        if not name or referenced or record.get("image_id") != self.image_id:
            return None
        snap = self.find_snapshot(name)
        if snap is None or snap["protected"] or not snap["managed"]:
            return None
        if _rbd.snapshot_children(self.sess, self.image, name):
            return None
        _rbd.remove_snapshot(self.head, name)
        self.snaps = [s for s in self.snaps if s["name"] != name]
        return "snapshot %s (made by a run that was killed before its point was published)" % self.spec(name)

    # -- verify's compare hook ---------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def at_point(cls, params, point):
        """The source of ``point`` opened read-only at the point's snapshot (NotFoundError if gone)."""
        src = point.get("source") or {}
        with _rbd.session(params, src["pool"], src.get("namespace")) as sess:
            with sess.image(src["image"], read_only=True) as head:
                source = cls(sess, src["image"], head, snapshot=point["snapshot"])
                try:
                    source.prepare(None)
                    yield source
                finally:
                    source.close()

    @staticmethod
    def describe_point(point):
        src = point.get("source") or {}
        if not (src.get("pool") and src.get("image") and point.get("snapshot")):
            return None
        return _rbd.spec(src["pool"], src["image"], src.get("namespace"), point["snapshot"])

    def compare_problem(self, point):
        """Why this snapshot is not the one ``point`` was taken from (re-created image or snapshot), or None."""
        src = point.get("source") or {}
        if src.get("image_id") and src["image_id"] != self.image_id:
            return "the image was re-created (id %s, the point was taken from id %s)" % (self.image_id, src["image_id"])
        if src.get("snapshot_id") is not None and self.snap["id"] != src["snapshot_id"]:
            return "snapshot %s was re-created (id %s, the point was taken from id %s)" % (
                self.snapshot, self.snap["id"], src["snapshot_id"])
        return None

    def zero_extents(self, offset, length):
        """What diff_iterate from the image's creation (whole objects, parent included) does not
        report as existing, inside ``[offset, offset + length)``: known zeroes, not read."""
        end = min(self.size, offset + length)
        with self._diff_lock:
            found = _rbd.changed_extents(self.img, None, whole_object=True, offset=offset, length=end - offset)
        out = []
        pos = offset
        for ext in sorted(found, key=lambda e: e.offset):
            if ext.kind == ZERO:
                continue
            if ext.offset > pos:
                out.append(Extent(pos, ext.offset - pos, ZERO))
            pos = max(pos, ext.end)
        if pos < end:
            out.append(Extent(pos, end - pos, ZERO))
        return out

    def identity(self):
        return dict(type=self.kind, pool=self.sess.pool, namespace=self.sess.namespace, image=self.image,
                    image_id=self.image_id, snapshot_id=self.snap["id"])

    def close(self):
        self._stack.close()

    # -- the data ------------------------------------------------------------------------------
    def changed_extents(self, parent):
        return diff_extents(self.img, parent["snapshot"] if parent else None, self.granularity)

    def read(self, offset, length):
        try:
            return self.img.read(offset, length)
        except _rbd.rbd.Error as exc:
            raise TransferError("read of %d bytes at offset %d failed: %s" % (length, offset, exc), offset=offset)
