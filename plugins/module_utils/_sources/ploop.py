# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An OpenVZ ploop disk as a backup source: our snapshot, exact incrementals from the delta, merge.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Always through ``DiskDescriptor.xml`` (``_cli/ploop.py`` says why).  One snapshot of ours stays in
the stack between runs: the base of the next incremental.  A run:

1. ``ploop snapshot -u NEW``: the image every write went to since the last run is frozen as ``NEW``;
   writes go on into a fresh top delta.  ``NEW`` is in our record (``_ploop/snapshots.py``) and in
   the repository's journal before ploop runs.
2. The frozen stack (base up to ``NEW``) is read through QEMU's ``parallels`` driver: ``qemu-nbd``
   of a ``json:`` description of the stack (ploop deltas name no parent themselves).
3. Changed extents: a full reads the clusters the stack allocates (``qemu-img map`` of the stack);
   an incremental reads only the clusters allocated by the images above the last point's snapshot
   ``OLD`` up to ``NEW`` (``qemu-img map -f parallels`` of each delta alone): exactly what was
   written since, whatever the size of the disk.
4. After the point is published: ``ploop snapshot-delete -u OLD`` folds ``NEW``'s delta into
   ``OLD``'s image (the cost of the delta, not of the disk); ``NEW`` stays as the next base.
   Only snapshots in our record are ever folded.

A failure before publish folds ``NEW`` away again (``discard``); a run killed before that leaves
``NEW`` journalled, and the next run (or the role's cleanup in ``always:``) folds it away, unless a
published point uses it (then it is the base, and the older one is folded).  The point's ``extra``
keeps the ``DiskDescriptor.xml`` and the container's config (``/etc/vz/conf/<CTID>.conf``) as
they were at the snapshot, as the seed's tar of them does.
"""

from __future__ import annotations

import contextlib
import os
import uuid as _uuid

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop as _ploop
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_img as _qemu_img
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import serve_read_only
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, NotFoundError, TransferError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, Extent, merge
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop import snapshots as _snapshots
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop.disks import CONF_DIR
from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources.base import Source

DEFAULT_PREFIX = "snapchain-backup-"  # the tag of our backup snapshots in the record
MAX_METADATA_BYTES = 1 << 20  # a descriptor or container config larger than this is not kept in the manifest


def container_id(descriptor):
    """``101`` for ``/vz/private/101/root.hdd/DiskDescriptor.xml`` (None when the path does not say)."""
    parts = os.path.normpath(descriptor).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "root.hdd":
        return parts[-3]
    return None


def _read_small(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError("cannot read %s %s: %s" % (what, path, exc.strerror), path=path)
    if len(data) > MAX_METADATA_BYTES:
        raise InputError("%s %s is larger than %d bytes: not a %s" % (what, path, MAX_METADATA_BYTES, what), path=path)
    return data.decode("utf-8", "replace")


class PloopSource(Source):
    """The ploop disk of ``descriptor`` (under the private area ``root``).  ``config``: the container's
    config file to keep with each point (None: ``/etc/vz/conf/<CTID>.conf`` if it exists; ``""``: none)."""

    kind = "ploop"

    def __init__(self, descriptor, root, config=None, prefix=DEFAULT_PREFIX, parallel=8, check_mode=False):
        self.descriptor = _snapshots.inside_root(descriptor, root)
        self.desc = _ploop.read_descriptor(self.descriptor)  # refuses missing image files
        self.size = self.desc.size
        if config is None:
            ctid = container_id(self.descriptor)
            config = os.path.join(CONF_DIR, ctid + ".conf") if ctid else ""
        self.config = config or None
        self.prefix = prefix
        self.record = _snapshots.Record(self.descriptor)
        self.snapshot = None  # the GUID of this run's snapshot
        self.created = None
        self.parallel = parallel
        self._stack = contextlib.ExitStack()
        self._pool = None
        if not check_mode:
            _ploop.PLOOP.require()
            self.record.lock()  # released by close(): another run changes nothing meanwhile
        try:
            self.record.load()
            _dropped, settled = self.record.settle(self.desc.chain)
            if settled and not check_mode:
                self.record.save()
        except BaseException:
            self.record.unlock()
            raise

    # -- choosing the base ---------------------------------------------------------------------
    def base_problem(self, point):
        src = point.get("source") or {}
        if src.get("type") != self.kind or src.get("descriptor") != self.descriptor:
            return "the last point %s was not taken from the ploop disk %s" % (point["name"], self.descriptor)
        guid = point.get("snapshot")
        if guid not in self.desc.chain:
            return ("the snapshot %s of the last point %s is no longer in the stack of %s (merged or deleted outside "
                    "snapchain)" % (guid, point["name"], self.descriptor))
        if self.record.by_uuid(guid) is None:
            return "the snapshot %s of the last point %s is not in our record %s" % (guid, point["name"],
                                                                                     self.record.path)
        if point["size"] != self.size:
            return "the disk size changed from %d to %d bytes" % (point["size"], self.size)
        return None

    # -- the point in time ---------------------------------------------------------------------
    def prepare(self, intent):
        guid = "{%s}" % _uuid.uuid4()
        name = _naming.unique_managed_name([s["name"] for s in self.record.snapshots], self.prefix)
        intent(dict(snapshot=guid, descriptor=self.descriptor))
        self.desc = _snapshots.take(self.descriptor, self.record, name, guid)
        self.snapshot = self.created = guid
        self.size = self.desc.size
        self._open(self.desc.stack(guid))

    def _open(self, files):
        self._pool = serve_stack(self._stack, files, self.parallel)
        if self._pool.size != self.size:
            raise TransferError("QEMU reads the ploop stack of %s as %d bytes, its descriptor says %d"
                                % (self.descriptor, self._pool.size, self.size), descriptor=self.descriptor)

    def discard(self):
        """The run failed before publish: fold this run's snapshot away again (nothing written is lost)."""
        self._stack.close()
        if self.created:
            self.desc = _snapshots.drop(self.descriptor, self.record, self.created)
            self.created = None

    def finish(self, point):
        """Fold every older snapshot of ours away; this run's stays as the next base."""
        self._stack.close()
        return dict(merged_snapshots=self.tidy(keep=point["snapshot"]), kept_snapshot=point["snapshot"])

    def tidy(self, keep):
        """Fold away our backup snapshots (named with ``prefix``) other than ``keep`` (a GUID, or None), and
        any ``temporary`` snapshot of ours (ploop_snapshot's "snapshot, copy, merge back" that a killed run
        left unmerged); returns their GUIDs.  Other snapshots made with the ploop_snapshot module stay."""
        folded = []
        for snap in list(self.record.snapshots):
            guid = snap["uuid"]
            if guid == keep or guid not in self.desc.chain or guid == self.desc.top:
                continue
            if not (_naming.is_managed(snap["name"], self.prefix) or snap.get("temporary")):
                continue
            self.desc = _snapshots.drop(self.descriptor, self.record, guid)
            folded.append(guid)
        return folded

    def remove_orphan(self, record, referenced):
        guid = record.get("snapshot")
        if not guid or referenced or record.get("descriptor") != self.descriptor:
            return None
        if guid not in self.desc.chain or self.record.by_uuid(guid) is None or guid == self.desc.top:
            return None
        self.desc = _snapshots.drop(self.descriptor, self.record, guid)
        return "ploop snapshot %s of %s (made by a run that was killed before its point was published)" % (
            guid, self.descriptor)

    def identity(self):
        return dict(type=self.kind, descriptor=self.descriptor, config=self.config)

    # -- verify's compare_source ---------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def at_point(cls, params, point):
        """The stack frozen by ``point``'s snapshot, read-only through QEMU, under our record's lock (no
        backup folds it meanwhile: LockedError while one runs); NotFoundError once it was folded away."""
        stack = FrozenStack((point.get("source") or {}).get("descriptor"), point.get("snapshot"),
                            parallel=params.get("parallel") or 4)
        try:
            yield stack
        finally:
            stack.close()

    @staticmethod
    def describe_point(point):
        src = point.get("source") or {}
        if not (src.get("descriptor") and point.get("snapshot")):
            return None
        return "%s snapshot %s" % (src["descriptor"], point["snapshot"])

    def close(self):
        self._stack.close()
        self.record.unlock()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    # -- the data ------------------------------------------------------------------------------
    def changed_extents(self, parent):
        chain = self.desc.chain
        top = chain.index(self.snapshot)
        if parent is None:
            files = [_ploop.stack_spec(self.desc.stack(self.snapshot))]
            fmt = None
        else:
            files = [self.desc.file(g) for g in chain[chain.index(parent["snapshot"]) + 1:top + 1]]
            fmt = "parallels"
        found = []
        for path in files:
            found.extend(ext for ext in _qemu_img.map_extents(path, fmt=fmt, top_only=parent is not None)
                         if ext.kind == DATA)
        return [Extent(e.offset, e.length, DATA) for e in merge(found) if e.kind == DATA]

    def read(self, offset, length):
        return self._pool.read(offset, length)

    def copy(self, sink, parent, base, pending, parallel):
        stats, digests, extra = super().copy(sink, parent, base, pending, parallel)
        extra = dict(extra, ploop=dict(
            snapshot=self.snapshot, descriptor=self.descriptor,
            images=[os.path.basename(f) for f in self.desc.stack(self.snapshot)],
            descriptor_xml=_read_small(self.descriptor, "ploop descriptor"),
            config=self.config, config_text=_read_small(self.config, "container config") if self.config else None))
        return stats, digests, extra


def serve_stack(exit_stack, files, parallel):
    """An NbdPool reading the ploop images ``files`` (base first) as one disk, read-only, through QEMU's
    ``parallels`` driver (qemu-nbd of a ``json:`` stack); both are closed with ``exit_stack``."""
    return serve_read_only(exit_stack, _ploop.stack_spec(files), None, parallel)


class FrozenStack:
    """Our snapshot ``guid`` of the ploop disk ``descriptor`` read as the disk it froze: the images from
    the base up to the snapshot's own, which no write reaches any more (the reader verify compares a
    point with)."""

    def __init__(self, descriptor, guid, parallel=4):
        self.record = _snapshots.Record(descriptor)
        self.record.lock()  # a backup holds it for its whole run: it cannot fold the stack under us
        self._stack = contextlib.ExitStack()
        try:
            self.record.load()
            desc = _ploop.read_descriptor(descriptor)
            if guid not in desc.chain or guid == desc.top or self.record.by_uuid(guid) is None:
                raise NotFoundError("ploop snapshot %s is no longer in the stack of %s" % (guid, descriptor),
                                    uuid=guid, descriptor=descriptor)
            self.size = desc.size
            self._pool = serve_stack(self._stack, desc.stack(guid), parallel)
        except BaseException:
            self.close()
            raise

    def compare_problem(self, point):
        return None  # our record names the snapshot by GUID: it cannot have been re-created under us

    def zero_extents(self, offset, length):
        return self._pool.zero_extents(offset, length)

    def read(self, offset, length):
        return self._pool.read(offset, length)

    def close(self):
        self._stack.close()
        self.record.unlock()
