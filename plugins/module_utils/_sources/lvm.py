# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A classic LVM snapshot as a backup source: its device read whole, changed blocks by digest scan.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The snapshot (``vg/name``, taken by ``lvm_snapshot``) is the point in time; this source takes none
and removes none.  Its device is read like ``_sources/raw.py`` reads any block device, every block's
digest compared with the parent point's.  What a plain device path cannot know: a classic snapshot
whose copy-on-write area fills up (``lv_attr`` 5th character ``I``) reads as an I/O error or, worse,
as whatever was there; so it is checked with ``lvs`` before the copy (refused) and after it (the
copy fails, no point is written).  The identity kept in the point names the origin LV, which
stays the same from run to run, not the snapshot.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import snapshots as _snapshots
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource


def parse_lv(text):
    """``vg/name`` -> (vg, name), both valid LVM names; InputError otherwise."""
    parts = (text or "").split("/")
    if len(parts) != 2:
        raise InputError("lvm_snapshot %r must be VG/NAME (the classic snapshot to back up)" % (text,))
    return _snapshots.check_name(parts[0], "vg"), _snapshots.check_name(parts[1], "lvm_snapshot name")


def snapshot_row(vg, name):
    """The lvs row of classic snapshot ``vg/name``, checked: a classic snapshot, active, not overflowed."""
    row = _snapshots.vg_rows(vg).get(name)
    if row is None:
        raise NotFoundError("LVM snapshot %s/%s not found" % (vg, name), vg=vg, name=name)
    kind = _snapshots.snapshot_type(row)
    if kind != "classic":
        what = "a thin snapshot" if kind else "no snapshot"
        raise InputError("%s/%s is %s, not a classic LVM snapshot" % (vg, name, what), vg=vg, name=name)
    if _snapshots.is_overflowed(row):
        raise ConflictError("classic snapshot %s/%s overflowed (lv_attr %s): its content is lost, it is not backed up"
                            % (vg, name, row["lv_attr"]), vg=vg, name=name, overflowed=True, lv_attr=row["lv_attr"])
    if not _snapshots.is_active(row) or not row.get("lv_path"):
        raise InputError("LVM snapshot %s/%s is not active (lv_attr %s)" % (vg, name, row["lv_attr"]), vg=vg, name=name)
    return row


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
