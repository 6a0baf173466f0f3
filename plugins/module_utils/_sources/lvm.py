# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""LVM snapshots as backup sources: classic (digest scan) and thin (changed blocks from the pool's metadata).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The snapshot (``vg/name``, taken by ``lvm_snapshot``) is the point in time; ``open_snapshot`` tells
the kind from ``lvs``.  Its device is read like ``_sources/raw.py`` reads any block device.

Classic: every block's digest is compared with the parent point's.  What a plain device path
cannot know: a classic snapshot whose copy-on-write area fills up (``lv_attr`` 5th character
``I``) reads as an I/O error or, worse, as whatever was there; so it is checked with ``lvs``
before the copy (refused) and after it (the copy fails, no point is written).  This source takes
no snapshot and removes none.

Thin: activated (``lvchange -ay -K``) if it is not, and deactivated again at the end if this run
activated it.  The point records the origin LV, the pool, the snapshot's ``thin_id`` and its
uuid.  When the parent point's thin snapshot still exists (same name, origin, pool, ``thin_id``
and uuid: lvm reuses the thin ids of removed LVs), the changed blocks come from ``thin_delta``
between the two thin ids on a reserved metadata snapshot of the pool (``_lvm/thin.py``): an
incremental reads what was written since, to the pool's chunk, and writes what was discarded as
zeroes.  Otherwise (the base snapshot removed or
re-created, another pool, thin_delta missing or failing) the digest scan of the classic path
runs, and the result says which (``changed_blocks``: ``thin_delta``, ``digest_scan`` or ``full``).
Thin segments always keep keyed digests, so the fallback stays an incremental.

One thin snapshot per LV stays between runs as the next base.  After the point is published
(``finish``), the thin snapshots that earlier points of this repository were taken from are
removed, if they still are the same snapshots (origin, pool, ``thin_id``, uuid) and have a
managed name (``_core/naming.py``): someone else's snapshot is never removed.  A failure before publish removes
nothing: the new snapshot is the caller's to remove (``lvm_snapshot state=absent``), as with a
classic one, and the old base stays the base.

The identity kept in the point names the origin LV, which stays the same from run to run, not
the snapshot.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import lvm as _lvm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import thin_tools as _thin_tools
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import snapshots as _snapshots
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import thin as _thin
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import generic_base_problem
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource

THIN = "lvm_thin"  # the thin source's kind: its journal and the ``type`` of its points' identity


def parse_lv(text):
    """``vg/name`` -> (vg, name), both valid LVM names; InputError otherwise."""
    parts = (text or "").split("/")
    if len(parts) != 2:
        raise InputError("lvm_snapshot %r must be VG/NAME (the snapshot to back up)" % (text,))
    return _snapshots.check_name(parts[0], "vg"), _snapshots.check_name(parts[1], "lvm_snapshot name")


def find_snapshot(vg, name, rows=None):
    """``(kind, row)`` of snapshot ``vg/name``: ``classic`` or ``thin`` (InputError for an LV that is none)."""
    row = (_snapshots.vg_rows(vg) if rows is None else rows).get(name)
    if row is None:
        raise NotFoundError("LVM snapshot %s/%s not found" % (vg, name), vg=vg, name=name)
    kind = _snapshots.snapshot_type(row)
    if kind is None:
        raise InputError("%s/%s is no snapshot, not a classic or thin LVM snapshot (lv_attr %s)" % (vg, name, row["lv_attr"]),
                         vg=vg, name=name)
    return kind, row


def snapshot_row(vg, name):
    """The lvs row of classic snapshot ``vg/name``, checked: a classic snapshot, active, not overflowed."""
    kind, row = find_snapshot(vg, name)
    if kind != "classic":
        raise InputError("%s/%s is a thin snapshot, not a classic LVM snapshot" % (vg, name), vg=vg, name=name)
    if _snapshots.is_overflowed(row):
        raise ConflictError("classic snapshot %s/%s overflowed (lv_attr %s): its content is lost, it is not backed up"
                            % (vg, name, row["lv_attr"]), vg=vg, name=name, overflowed=True, lv_attr=row["lv_attr"])
    if not _snapshots.is_active(row) or not row.get("lv_path"):
        raise InputError("LVM snapshot %s/%s is not active (lv_attr %s)" % (vg, name, row["lv_attr"]), vg=vg, name=name)
    return row


def open_snapshot(vg, name, check_mode=False):
    """The source of LVM snapshot ``vg/name``: LvmSnapshotSource (classic) or LvmThinSnapshotSource (thin)."""
    rows = _snapshots.vg_rows(vg)
    kind, row = find_snapshot(vg, name, rows)
    if kind == "thin":
        return LvmThinSnapshotSource(vg, name, rows, check_mode=check_mode)
    return LvmSnapshotSource(vg, name)


class LvmSnapshotSource(RawSource):
    """Classic snapshot ``vg/name`` of an LV, read as a block device (digest scan)."""

    def __init__(self, vg, name):
        row = snapshot_row(vg, name)
        super().__init__(row["lv_path"])
        self.vg, self.name, self.origin = vg, name, row["origin"]
        self.snapshot = name
        self.kind = "lvm_classic"

    def identity(self):
        return dict(type="lvm", vg=self.vg, lv=self.origin, snapshot=self.name)

    def copy(self, sink, parent, base, pending, parallel):
        try:
            out = super().copy(sink, parent, base, pending, parallel)
        except TransferError:
            self._check_after()  # an overflow during the copy is the reason to give
            raise
        self._check_after()
        return out

    def _check_after(self):
        try:
            snapshot_row(self.vg, self.name)
        except ConflictError as exc:
            raise TransferError("classic snapshot %s/%s overflowed during the backup: no point written (%s)"
                                % (self.vg, self.name, exc.msg), vg=self.vg, name=self.name, overflowed=True)

    def after_copy(self):
        super().after_copy()
        self._check_after()


class LvmThinSnapshotSource(RawSource):
    """Thin snapshot ``vg/name`` (``rows``: the VG's lvs rows, ``_lvm.snapshots.vg_rows``): read as a block
    device; incrementals from thin_delta.  Those rows, read once at the start (each lvs costs), also
    tell whether the base snapshot is there and which snapshots ``finish`` removes: a snapshot
    removed meanwhile makes thin_delta fail (the digest scan runs) or its removal a warning."""

    kind = THIN

    def __init__(self, vg, name, rows, check_mode=False, prefix=_naming.DEFAULT_PREFIX):
        row = rows[name]
        self.rows = rows
        self.vg, self.name, self.origin, self.pool = vg, name, row["origin"], row["pool_lv"]
        self.thin_id, self.uuid = row.get("thin_id"), row.get("lv_uuid")
        self.snapshot = name
        self.prefix = prefix
        self.check_mode = check_mode
        self.activated = False
        self.changed_blocks, self.changed_blocks_reason = None, None  # set by choose_base
        self.delta, self.delta_info = None, {}
        self.earlier = []  # (name, thin_id, uuid) of the thin snapshots earlier points of the repository were taken from
        if self.thin_id is None or not self.pool:
            raise InputError("thin snapshot %s/%s has no thin_id or pool in lvs" % (vg, name), vg=vg, name=name)
        if not _snapshots.is_active(row):
            if check_mode:  # a real run activates it; the plan needs only its size
                self.fd, self.path, self.size = None, row.get("lv_path"), row["lv_size"]
                return
            _lvm.activate("%s/%s" % (vg, name), ignore_activation_skip=True)  # thin snapshots skip activation
            self.activated = True
            if not row.get("lv_path"):
                self.rows = _snapshots.vg_rows(vg)
                row = self.rows.get(name) or row
        try:
            if not row.get("lv_path"):
                raise InputError("thin snapshot %s/%s has no device path (lv_attr %s)" % (vg, name, row["lv_attr"]),
                                 vg=vg, name=name)
            super().__init__(row["lv_path"])
        except BaseException:
            self._deactivate()
            raise
        self.kind = THIN

    def identity(self):
        return dict(type=THIN, vg=self.vg, lv=self.origin, pool=self.pool, thin_id=self.thin_id, snapshot=self.name,
                    uuid=self.uuid)

    @property
    def segment_digest(self):
        return None  # keyed (the default): a later digest-scan fallback decides "unchanged" from these digests

    # -- choosing the base ---------------------------------------------------------------------
    def _same_lv(self, point):
        src = point.get("source") or {}
        return src.get("type") == THIN and (src.get("vg"), src.get("lv"), src.get("pool")) == (
            self.vg, self.origin, self.pool)

    def _matches_record(self, row, thin_id, uuid):
        """Whether lvs ``row`` is still the thin snapshot a point recorded: lvm reuses thin ids (and a name
        can be taken again), so the LV's uuid must match too."""
        return _snapshots.snapshot_type(row) == "thin" and (
            row.get("origin"), row.get("pool_lv"), row.get("thin_id"), row.get("lv_uuid")) == (
            self.origin, self.pool, thin_id, uuid) and uuid is not None

    def refuse(self, repo):
        """The newest point taken from this very snapshot: nothing to do (an unsound one is replaced)."""
        latest = repo.latest()
        if latest is None or not self._same_lv(latest) or latest.get("snapshot") != self.name:
            return None
        src = latest["source"]
        if (src.get("thin_id"), src.get("uuid")) != (self.thin_id, self.uuid):
            return None
        return None if repo.unsound_reason(latest["name"]) else latest

    def choose_base(self, repo, force_full=False):
        """The generic choice; the incremental's changed blocks from thin_delta when the parent's thin
        snapshot is still there, else by digest scan (the parent's digests are then loaded)."""
        self.earlier = [(p["snapshot"], p["source"].get("thin_id"), p["source"].get("uuid")) for p in repo.points()
                        if self._same_lv(p) and p.get("snapshot") and p["snapshot"] != self.name]
        latest = repo.latest()
        self.exact_extents = False
        self.changed_blocks, self.changed_blocks_reason, self.delta = "full", None, None
        if latest is not None and not generic_base_problem(repo, latest, force_full) and not self.base_problem(latest):
            problem = self.delta_problem(latest)
            if problem is None and not self.check_mode:
                problem = self._read_delta(latest)
            self.exact_extents = problem is None
            self.changed_blocks = "digest_scan" if problem else "thin_delta"
            self.changed_blocks_reason = problem
        parent, base, reason = super().choose_base(repo, force_full)
        if parent is None:
            self.changed_blocks, self.changed_blocks_reason, self.delta = "full", None, None
        return parent, base, reason

    def delta_problem(self, point):
        """Why the changed blocks since ``point`` cannot come from thin_delta (None: they can)."""
        if not self._same_lv(point):
            return "the last point %s was not taken from a thin snapshot of %s/%s in pool %s" % (
                point["name"], self.vg, self.origin, self.pool)
        base = point.get("snapshot")
        row = self.rows.get(base)
        if row is None:
            return "the thin snapshot %s/%s of the last point %s no longer exists" % (self.vg, base, point["name"])
        if not self._matches_record(row, point["source"].get("thin_id"), point["source"].get("uuid")):
            return "%s/%s is no longer the thin snapshot the last point %s was taken from (re-created?)" % (
                self.vg, base, point["name"])
        try:
            _thin_tools.THIN_DELTA.require()
        except InputError as exc:
            return exc.msg
        return None

    def _read_delta(self, point):
        try:
            self.delta = _thin.delta_extents(self.vg, self.pool, point["source"]["thin_id"], self.thin_id, self.size,
                                             self.delta_info)
        except CommandError as exc:
            self.delta = None
            return "thin_delta failed (%s)" % exc.msg
        return None

    # -- the data ------------------------------------------------------------------------------
    def changed_extents(self, parent):
        return self.delta if parent is not None else None

    def copy(self, sink, parent, base, pending, parallel):
        stats, digests, extra = super().copy(sink, parent, base, pending, parallel)
        info = dict(vg=self.vg, lv=self.origin, pool=self.pool, thin_id=self.thin_id, changed_blocks=self.changed_blocks,
                    changed_blocks_reason=self.changed_blocks_reason, chunk_size=self.delta_info.get("block_bytes"),
                    base_thin_id=parent["source"].get("thin_id") if parent and self._same_lv(parent) else None)
        return stats, digests, dict(extra, lvm_thin=info)

    # -- after the point -----------------------------------------------------------------------
    def finish(self, point):
        """Remove the thin snapshots of earlier points (ours, still the same ones): this one is the next base."""
        rows = self.rows
        removed = []
        for name, thin_id, uuid in self.earlier:
            row = rows.get(name)
            if row is None or name in removed or not _naming.is_managed(name, self.prefix):
                continue
            if not self._matches_record(row, thin_id, uuid):
                continue
            _lvm.remove("%s/%s" % (self.vg, name))
            removed.append(name)
        return dict(removed_snapshots=removed, kept_snapshot=self.name)

    def _deactivate(self):
        if self.activated:
            self.activated = False
            _lvm.deactivate("%s/%s" % (self.vg, self.name))

    def close(self):
        try:
            super().close()
        finally:
            self._deactivate()
