# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A ZFS volume snapshot as a backup source: its device, exact incrementals from ``zfs send -i``.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

The snapshot (``pool/vol@snap``, taken by ``zfs_snapshot``) is the point in time; this source
takes none and destroys none.  What it reads and how:

- The content: ``/dev/zvol/pool/vol@snap``, which exists only while the zvol's ``snapdev`` is
  ``visible``.  If it is not, the run sets it (journalled first, with the value and its source),
  waits (bounded) for udev to create the node, and puts the property back as it was (``zfs set``
  of the old local value, or ``zfs inherit`` when it was inherited or the default) as soon as the
  copy ends, and again on any failure; a killed run's journal makes the next run of the chain put
  it back.  Why not a clone of the snapshot: a clone is a new dataset others see (replication,
  ``zfs list``), it blocks destroying the snapshot (``zfs_snapshot`` refuses to destroy a snapshot
  with clones, and keep-N with it), and a leaked one costs a dataset; a property costs nothing and
  the snapshot device is read-only by nature.  The price: while it is visible, udev creates the
  nodes of every snapshot of that zvol.  Two runs exposing the same zvol at once would hide the
  device under each other: a host lock per zvol (``/run/lock``) makes the second one fail early.
- A full (and the fallback): the whole device, changed blocks by digest scan, like a raw device.
  A zvol device has no SEEK_DATA: the allocated ranges would need a full ``zfs send`` (which reads
  all the data anyway), so a full reads it all; unallocated ranges read as zeroes at memory speed.
- An incremental, when the last point's snapshot (``guid`` in its ``source``) still exists on the
  zvol and is older: the changed ranges come from ``zfs send -c -e -i PARENT SNAP`` read as it
  comes (``_zfs/send_stream.py``: WRITE records are DATA, FREE records ZERO), and only those are
  read from the device.  The FREE "from here to the end" record (at the end of the object's
  highest block) is kept in the point as ``tail``: the next incremental zeroes from its own tail up
  to the parent's only (the parent already reads zeroes beyond its own), or to the end of the
  volume when the parent's is unknown (a digest-scanned point).
- ``changed_blocks`` in the point's ``extra.zfs`` and in the result says which path ran:
  ``zfs_send`` or ``digest_scan``.

The identity kept in the point names the zvol and the snapshot's guid and createtxg.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs as _zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.command import command_error, tail
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError, NotFoundError, TransferError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import ZERO, Extent
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import lock_or_fail
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.raw import RawSource
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs import send_stream as _stream

KIND = "zvol"
DEV_DIR = "/dev/zvol"
LOCK_DIR = "/run/lock"
DEVICE_TIMEOUT = 60  # seconds for udev to create the snapshot's device node
ZFS_SEND, DIGEST_SCAN = "zfs_send", "digest_scan"
SNAP_FIELDS = ("name", "type", "createtxg", "creation", "guid", "volsize")


def parse_snapshot(text):
    """``pool/vol@snap`` -> (zvol, snap), both valid ZFS names; InputError otherwise."""
    zvol, sep, name = (text or "").partition("@")
    if not sep:
        raise InputError("zfs_snapshot %r must be POOL/VOLUME@SNAPSHOT (the zvol snapshot to back up)" % (text,))
    return _zfs.check_dataset(zvol, "zvol"), _zfs.check_snapshot_name(name, zvol)


def read_zvol(zvol):
    """The snapshots of the volume ``zvol`` as {full name: row}, from one ``zfs list -d 1`` (the dataset and
    its snapshots); NotFoundError without it, InputError when it is no volume."""
    try:
        rows = _zfs.list_datasets([zvol], fields=SNAP_FIELDS, types=["volume", "filesystem", "snapshot"], depth=1)
    except NotFoundError:
        raise NotFoundError("zvol %s not found" % zvol, zvol=zvol)
    kind = [r["type"] for r in rows if r["name"] == zvol]
    if kind != ["volume"]:
        raise InputError("%s is a %s, not a ZFS volume (zvol)" % (zvol, kind[0] if kind else "?"), zvol=zvol)
    return dict((r["name"], r) for r in rows if r["type"] == "snapshot" and r["name"].startswith(zvol + "@"))


def snapshot_row(snaps, zvol, name):
    """The ``zfs list`` row of ``zvol@name`` among ``read_zvol``'s."""
    row = snaps.get("%s@%s" % (zvol, name))
    if row is None:
        raise NotFoundError("ZFS snapshot %s@%s not found" % (zvol, name), zvol=zvol, snapshot=name)
    return row


def device_path(zvol, name=None):
    return os.path.join(DEV_DIR, "%s@%s" % (zvol, name) if name else zvol)


def wait_for_device(path, timeout=DEVICE_TIMEOUT):
    """Wait until udev made ``path`` (a symlink to the zd device); TransferError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if os.path.exists(path):
            return path
        if time.monotonic() >= deadline:
            raise TransferError("the device %s did not appear within %ds of snapdev=visible (is udev running? "
                                "zfs's udev rules installed?)" % (path, timeout), path=path)
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


class ZvolLock:
    """A host lock per zvol (``/run/lock/snapchain-zvol-<hash>.lock``), held while its snapshots are exposed."""

    def __init__(self, zvol):
        digest = hashlib.sha256(zvol.encode("utf-8")).hexdigest()[:16]
        self.zvol, self.path, self.fd = zvol, os.path.join(LOCK_DIR, "snapchain-zvol-%s.lock" % digest), None

    def acquire(self):
        if self.fd is None:
            os.makedirs(LOCK_DIR, exist_ok=True)
            self.fd = lock_or_fail(self.path, "another run is reading snapshots of zvol %s (%s is locked); retry when "
                                   "it ends" % (self.zvol, self.path), zvol=self.zvol)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def restore_snapdev(zvol, value, source):
    """Put ``snapdev`` of ``zvol`` back to ``value`` as set locally, or inherited when ``source`` was not local."""
    if source == "local":
        _zfs.set_property(zvol, "snapdev", value)
    else:
        _zfs.inherit_property(zvol, "snapdev")


def send_changes(from_snapshot, to_snapshot, size, toguid, fromguid):
    """The changes ``zfs send -i FROM TO`` names (``_zfs.send_stream.Changes``), read from its stdout as it
    comes; nothing of the stream is kept.  CommandError when zfs fails, StreamError on a stream not understood."""
    argv = _zfs.send_incremental_argv(from_snapshot, to_snapshot)
    proc = _zfs.ZFS.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read(1 << 20)), daemon=True)
    reader.start()
    try:
        changes = _stream.parse(proc.stdout, size, toguid=toguid, fromguid=fromguid)
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        rc = proc.wait()
        reader.join(10)
        proc.stderr.close()
    if rc != 0:
        stderr = b"".join(err).decode("utf-8", "replace")
        raise command_error("zfs send -i %s %s failed (rc=%d): %s" % (from_snapshot, to_snapshot, rc, tail(stderr)),
                            argv, rc=rc, stderr=stderr)
    return changes


class ZvolSnapshotSource(RawSource):
    """Snapshot ``zvol@name`` of a ZFS volume: its device, exact incrementals from ``zfs send -i``."""

    kind = KIND

    def __init__(self, zvol, name, device_timeout=DEVICE_TIMEOUT):
        # RawSource.__init__ runs in prepare(), once the device exists (snapdev may have to be set first).
        self.fd = None
        self.zvol, self.name, self.snapshot = zvol, name, name
        self.full_name = "%s@%s" % (zvol, name)
        self.snaps = read_zvol(zvol)
        self.row = snapshot_row(self.snaps, zvol, name)
        self.size = self.row.get("volsize")
        if not isinstance(self.size, int):
            raise InputError("zfs reports no volsize for %s" % self.full_name, zvol=zvol)
        self.device_timeout = device_timeout
        self.lock = ZvolLock(zvol)
        self.restore = None  # (value, source) of snapdev to put back, while we changed it
        self.from_snapshot = None  # the parent point's snapshot when the increment comes from zfs send
        self.parent_tail = None
        self.changed_blocks = None
        self.stream = None

    # -- choosing the base ---------------------------------------------------------------------
    def _same_zvol(self, point):
        src = (point or {}).get("source") or {}
        return src.get("type") == KIND and src.get("zvol") == self.zvol

    def base_problem(self, point):
        if not self._same_zvol(point):
            return "the last point %s was not taken from the zvol %s" % (point["name"], self.zvol)
        return super().base_problem(point)

    def choose_base(self, repo, force_full=False):
        """An exact increment when the last point's snapshot (same guid) is still on the zvol, older than this
        one; else a digest scan against the last point's digests (``exact_extents`` False)."""
        latest = repo.latest()
        self.from_snapshot = self._exact_base(latest)
        self.exact_extents = self.from_snapshot is not None
        return super().choose_base(repo, force_full)

    def _exact_base(self, point):
        if point is None or not self._same_zvol(point) or not point.get("snapshot"):
            return None
        src = point["source"]
        full = "%s@%s" % (self.zvol, point["snapshot"])
        row = self.snaps.get(full)
        if row is None or str(row["guid"]) != str(src.get("guid")) or row["createtxg"] >= self.row["createtxg"]:
            return None
        self.parent_tail = ((point.get("extra") or {}).get("zfs") or {}).get("tail")
        return full

    @property
    def segment_digest(self):
        return None  # keyed, always: the digest-scan fallback compares digests of a segment begun exactly

    def refuse(self, repo):
        """The snapshot the newest point holds is a no-op; an older one is refused."""
        latest = repo.latest()
        if latest is None or not self._same_zvol(latest):
            return None
        src = latest["source"]
        if str(src.get("guid")) == str(self.row["guid"]):
            return None if repo.unsound_reason(latest["name"]) else latest
        if isinstance(src.get("createtxg"), int) and src["createtxg"] > self.row["createtxg"]:
            raise InputError("snapshot %s was taken before snapshot %s of the newest point %s: a chain only moves "
                             "forward" % (self.full_name, latest.get("snapshot"), latest["name"]),
                             snapshot=self.name, point=latest["name"])
        return None

    # -- the point in time ---------------------------------------------------------------------
    def prepare(self, intent):
        self.lock.acquire()
        value, source = _zfs.property_with_source(self.zvol, "snapdev")
        if value != "visible":
            intent(dict(zvol=self.zvol, snapshot=self.name, snapdev=value, snapdev_source=source))
            self.restore = (value, source)
            _zfs.set_property(self.zvol, "snapdev", "visible")
        path = wait_for_device(device_path(self.zvol, self.name), self.device_timeout)
        RawSource.__init__(self, path)
        self.kind = KIND
        if self.size != self.row["volsize"]:
            raise TransferError("the device %s is %d bytes, zfs says %d" % (path, self.size, self.row["volsize"]),
                                path=path)

    def point_time(self):
        creation = self.row.get("creation")
        return datetime.datetime.fromtimestamp(creation, datetime.timezone.utc) if isinstance(creation, int) else None

    def release(self):
        """Close the device and put snapdev back as it was (idempotent)."""
        RawSource.close(self)
        if self.restore is not None:
            restore_snapdev(self.zvol, *self.restore)
            self.restore = None

    def discard(self):
        self.release()

    def finish(self, point):
        self.release()
        return dict(changed_blocks=self.changed_blocks)

    def remove_orphan(self, record, referenced):
        """A killed run left snapdev visible: put it back as the journal says it was."""
        if record.get("zvol") != self.zvol or "snapdev" not in record:
            return None
        self.lock.acquire()
        value, source = _zfs.property_with_source(self.zvol, "snapdev")
        if value != "visible" or source != "local":
            return None  # put back already, or changed by someone since: theirs now
        restore_snapdev(self.zvol, record["snapdev"], record.get("snapdev_source"))
        return "snapdev of %s put back to %s (set visible by a run that was killed)" % (self.zvol, record["snapdev"])

    def identity(self):
        return dict(type=KIND, zvol=self.zvol, snapshot=self.name, guid=str(self.row["guid"]),
                    createtxg=self.row["createtxg"])

    def close(self):
        try:
            self.release()
        finally:
            self.lock.release()

    # -- the data ------------------------------------------------------------------------------
    def changed_extents(self, parent):
        if parent is None or self.from_snapshot is None:
            self.changed_blocks = DIGEST_SCAN
            return None
        parent_guid = parent["source"]["guid"]
        changes = send_changes(self.from_snapshot, self.full_name, self.size, int(self.row["guid"]), int(parent_guid))
        self.changed_blocks, self.stream = ZFS_SEND, changes
        extents = list(changes.extents)
        if changes.tail is not None and changes.tail < self.size:
            end = self.size if self.parent_tail is None else min(self.parent_tail, self.size)
            if changes.tail < end:
                extents.append(Extent(changes.tail, end - changes.tail, ZERO))
        return extents

    def copy(self, sink, parent, base, pending, parallel):
        try:
            stats, digests, extra = super().copy(sink, parent, base, pending, parallel)
        finally:
            self.release()  # snapdev back as soon as the device is read, whatever happened
        tail_now = self.stream.tail if self.stream is not None and self.stream.tail is not None else self.parent_tail
        info = dict(zvol=self.zvol, snapshot=self.name, guid=str(self.row["guid"]), changed_blocks=self.changed_blocks,
                    from_snapshot=self.from_snapshot if self.stream is not None else None,
                    tail=tail_now if self.stream is not None else None)
        if self.stream is not None:
            info["stream"] = self.stream.summary()
        return stats, digests, dict(extra, zfs=info)
