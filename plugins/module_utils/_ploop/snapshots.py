# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ploop_snapshot module's logic: our record of the snapshots we made, plan, refuse, then apply.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

ploop names snapshots by GUID only.  Which GUIDs are ours is kept in a record beside the descriptor::

    <private>/<CTID>/root.hdd/.snapchain-ploop.json
        {"format": "snapchain.vmbackup/ploop-snapshots", "version": 1,
         "snapshots": [{"name": "nightly", "uuid": "{...}", "temporary": false,
                        "state": "made", "created": "2026-12-07T02:30:00+00:00"}]}
    <private>/<CTID>/root.hdd/.snapchain-ploop.lock   flock()ed by a run that changes something

Beside the descriptor, not in a backup repository: it describes this disk's stack and moves with
the container's private area.  We pick the GUID (``ploop snapshot -u``) and write it down as
``creating`` BEFORE ploop runs, so a run killed at any point leaves a record the next run settles:
a ``creating`` GUID that is in the descriptor was made (it becomes ``made``), one that is not never
was (dropped); a ``made`` GUID that is no longer in the descriptor was merged or deleted (dropped).
Nothing that is not in the record is ever merged or deleted.

A ``temporary`` snapshot is one the caller merges again in the same run (the seed's "snapshot,
copy, merge back").  One still in the stack is what a killed run left: ``present`` refuses to stack
another on it and says how it is cleaned (the backup role's next run, or ``state=merged``).
"""

from __future__ import annotations

import json
import os
import uuid as _uuid

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop as _ploop
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError, RepositoryError, SnapchainError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import lock_or_fail, write_json_atomic

RECORD_FILE = ".snapchain-ploop.json"
LOCK_FILE = ".snapchain-ploop.lock"
RECORD_FORMAT = "snapchain.vmbackup/ploop-snapshots"
RECORD_VERSION = 1
STATES = ("present", "absent", "merged")  # of the ploop_snapshot module; ploop_snapshot_info is state "list"


def disk_argument_spec(**extra):
    """argument_spec of the options of doc fragment ``ploop_disk`` plus ``extra``."""
    spec = dict(descriptor=dict(type="path", required=True), root=dict(type="path", default="/vz/private"))
    spec.update(extra)
    return spec


def inside_root(descriptor, root):
    """The real path of ``descriptor``; InputError unless it lies under the real path of ``root``."""
    real = os.path.realpath(descriptor)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root or real == real_root:
        raise InputError("ploop descriptor %s (%s) is outside the private root %s: refused" % (descriptor, real, root),
                         descriptor=descriptor, root=root)
    return real


class Record:
    """Our snapshots of one disk (``.snapchain-ploop.json`` beside its descriptor)."""

    def __init__(self, descriptor):
        self.directory = os.path.dirname(descriptor)
        self.path = os.path.join(self.directory, RECORD_FILE)
        self.snapshots = []
        self._lock_fd = None

    def load(self):
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            self.snapshots = []
            return self
        except (OSError, ValueError) as exc:
            raise RepositoryError("cannot read our ploop snapshot record %s: %s" % (self.path, exc), path=self.path)
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or not isinstance(doc.get("snapshots"), list):
            raise RepositoryError("%s is not a snapchain ploop snapshot record" % self.path, path=self.path)
        if doc.get("version") != RECORD_VERSION:
            raise RepositoryError("%s has record version %r; this collection reads version %d"
                                  % (self.path, doc.get("version"), RECORD_VERSION), path=self.path)
        self.snapshots = [dict(s) for s in doc["snapshots"]]
        return self

    def save(self):
        write_json_atomic(self.path, dict(format=RECORD_FORMAT, version=RECORD_VERSION, snapshots=self.snapshots))

    def lock(self):
        path = os.path.join(self.directory, LOCK_FILE)
        self._lock_fd = lock_or_fail(path, "another run is changing the ploop snapshots of %s (%s is locked)"
                                     % (self.directory, path))

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def by_name(self, name):
        return next((s for s in self.snapshots if s["name"] == name), None)

    def by_uuid(self, guid):
        return next((s for s in self.snapshots if s["uuid"] == guid), None)

    def settle(self, chain):
        """Settle what a killed run left against the descriptor's ``chain``: returns the records dropped
        and whether any was changed at all (a ``creating`` one found made)."""
        kept, dropped, promoted = [], [], False
        for snap in self.snapshots:
            if snap["uuid"] in chain:
                promoted = promoted or snap.get("state") != "made"
                snap["state"] = "made"
                kept.append(snap)
            else:
                dropped.append(snap)
        self.snapshots = kept
        return dropped, promoted or bool(dropped)


def validate(params):
    state = params["state"]
    if state == "present" and not params.get("name"):
        raise InputError("state=present needs name (the tag of our snapshot)")
    if state in ("absent", "merged") and not (params.get("name") or params.get("uuid")):
        raise InputError("state=%s needs name or uuid of one of our snapshots" % state)
    if params.get("uuid") is not None:
        _ploop.check_guid(params["uuid"], "uuid")
        if state in ("present", "list"):
            raise InputError("uuid only applies to state=absent or state=merged (present picks a new one)")
    if params.get("temporary") and state != "present":
        raise InputError("temporary only applies to state=present")
    name = params.get("name")
    if name is not None and (not name.strip() or len(name) > 200 or any(ord(c) < 32 for c in name)):
        raise InputError("name %r must be 1-200 printable characters" % (name,))


def describe(desc, record):
    """The descriptor's chain, base first, each image with its file and, when ours, our name."""
    out = []
    for guid in desc.chain:
        ours = record.by_uuid(guid)
        out.append(dict(uuid=guid, parent_uuid=desc.parents[guid], file=desc.file(guid), top=guid == desc.top,
                        ours=ours is not None, name=ours["name"] if ours else None,
                        temporary=bool(ours and ours.get("temporary"))))
    return out


def ours(record, desc):
    return [dict(name=s["name"], uuid=s["uuid"], temporary=bool(s.get("temporary")), created=s.get("created"),
                 file=desc.file(s["uuid"]) if s["uuid"] in desc.images else None,
                 stack=desc.stack(s["uuid"]) if s["uuid"] in desc.chain else [])
            for s in record.snapshots]


def _diff_text(chain):
    return "".join("%s %s\n" % (item["uuid"], item["name"] or ("(top delta)" if item["top"] else "(not ours)"))
                   for item in chain)


def _target(record, desc, params):
    """Our snapshot named by ``name`` or ``uuid`` (None when it is already gone); refuses one not ours."""
    name, guid = params.get("name"), params.get("uuid")
    snap = record.by_name(name) if name else record.by_uuid(guid)
    if snap is not None and name and guid and snap["uuid"] != guid:
        raise InputError("our snapshot %r is %s, not %s" % (name, snap["uuid"], guid))
    if snap is None and guid and guid in desc.chain:
        raise ConflictError("snapshot %s of %s was not made by snapchain (it is not in %s): it is never touched"
                            % (guid, desc.path, record.path), uuid=guid)
    return snap


def info(params):
    """The ploop_snapshot_info module: the chain and our snapshots; nothing is written (not even our record)."""
    result = ensure(dict(params, state="list", name=None, uuid=None, temporary=False))
    for key in ("changed", "uuid", "name", "created", "merged", "removed", "diff"):
        result.pop(key, None)
    return result


def ensure(params, check_mode=False):
    """Run the module: returns the result dict (``changed``, ``snapshots``, ``chain``, ``diff`` ...)."""
    validate(params)
    state = params["state"]
    descriptor = inside_root(params["descriptor"], params["root"])
    desc = _ploop.read_descriptor(descriptor)  # refuses missing image files
    record = Record(descriptor)
    writes = state != "list" and not check_mode
    if writes:
        _ploop.PLOOP.require()
        record.lock()
    try:
        record.load()
        dropped, settled = record.settle(desc.chain)
        before = describe(desc, record)
        result = dict(changed=False, descriptor=descriptor, record=record.path, uuid=None, name=params.get("name"),
                      created=False, merged=False, removed=False, forgotten=[s["uuid"] for s in dropped])
        if dropped and state != "list":
            result["changed"] = True
        if settled and writes:
            record.save()  # only our record: GUIDs ploop made after all, or no longer has
        if state == "present":
            _present(params, desc, record, result, check_mode)
        elif state in ("absent", "merged"):
            _remove(params, desc, record, result, check_mode)
        if result["changed"] and not check_mode:
            desc = _ploop.read_descriptor(descriptor)
        after = describe(desc, record) if not check_mode else result.pop("_predicted", before)
        result.pop("_predicted", None)
        result["chain"] = after
        result["snapshots"] = ours(record, desc)
        result["diff"] = dict(before=_diff_text(before), after=_diff_text(after),
                              before_header=descriptor, after_header=descriptor)
        return result
    finally:
        record.unlock()


def _present(params, desc, record, result, check_mode):
    name = params["name"]
    snap = record.by_name(name)
    if snap is not None:
        result["uuid"] = snap["uuid"]
        return
    left = [s for s in record.snapshots if s.get("temporary")]
    if left:
        raise ConflictError(
            "%s has an unmerged temporary snapshot of ours, %r (%s), from a run that was killed before it merged "
            "it: the next run of the ploop backup role merges it; or merge it now with state=merged uuid=%s"
            % (desc.path, left[0]["name"], left[0]["uuid"], left[0]["uuid"]), uuid=left[0]["uuid"],
            name=left[0]["name"])
    guid = "{%s}" % _uuid.uuid4()
    result.update(changed=True, created=True, uuid=guid)
    if check_mode:
        predicted = describe(desc, record)
        top = predicted[-1]
        predicted.insert(len(predicted) - 1, dict(uuid="(new)", parent_uuid=top["parent_uuid"], file=top["file"],
                                                  top=False, ours=True, name=name,
                                                  temporary=bool(params.get("temporary"))))
        result["_predicted"] = predicted
        return
    take(desc.path, record, name, guid, temporary=bool(params.get("temporary")))


def take(descriptor, record, name, guid, temporary=False):
    """``ploop snapshot`` of ``descriptor`` as ``guid``, written down in ``record`` (locked, loaded) as ours
    BEFORE ploop runs, so a run killed at any point leaves a GUID the next run can look for.  Returns
    the descriptor as it is afterwards."""
    record.snapshots.append(dict(name=name, uuid=_ploop.check_guid(guid), temporary=bool(temporary),
                                 state="creating", created=_naming.utcnow().isoformat()))
    record.save()
    try:
        _ploop.snapshot(descriptor, guid)
    except SnapchainError:
        try:  # ploop refused or failed: keep the record true (made after all, or dropped again)
            record.settle(_ploop.read_descriptor(descriptor, require_files=False).chain)
            record.save()
        except SnapchainError:
            pass  # the next run settles it; ploop's own error is the one to report
        raise
    desc = _ploop.read_descriptor(descriptor)
    record.settle(desc.chain)
    record.save()
    return desc


def drop(descriptor, record, guid):
    """Remove our snapshot ``guid`` (below the top) from the stack, data kept: ``ploop snapshot-delete``
    folds the image above it into its file.  Refuses a GUID that is not ours.  Returns the descriptor
    as it is afterwards."""
    if record.by_uuid(guid) is None:
        raise ConflictError("snapshot %s of %s was not made by snapchain: it is never touched" % (guid, descriptor),
                            uuid=guid)
    _ploop.delete(descriptor, guid)
    desc = _ploop.read_descriptor(descriptor)
    record.settle(desc.chain)
    record.save()
    return desc


def _remove(params, desc, record, result, check_mode):
    snap = _target(record, desc, params)
    if snap is None or snap["uuid"] not in desc.chain:
        return
    guid = snap["uuid"]
    if guid == desc.top:
        raise ConflictError("our snapshot %s is the top of %s (the stack was switched by hand?): refusing to merge or "
                            "delete the image every write goes to" % (guid, desc.path), uuid=guid)
    child = desc.child(guid)
    if child is None:
        raise NotFoundError("%s: no image above our snapshot %s to merge into it" % (desc.path, guid), uuid=guid)
    result.update(changed=True, uuid=guid, name=snap["name"])
    result["merged" if params["state"] == "merged" else "removed"] = True
    if check_mode:
        predicted = []
        for item in describe(desc, record):
            if item["uuid"] == child:  # the child's data lands in our snapshot's file, under the child's GUID
                item.update(file=desc.file(guid), parent_uuid=desc.parents[guid])
            if item["uuid"] != guid:
                predicted.append(item)
        result["_predicted"] = predicted
        return
    if params["state"] == "merged":
        _ploop.merge(desc.path, child)  # the delta written since our snapshot, down into it
    else:
        _ploop.delete(desc.path, guid)  # ploop folds the same child into it
    record.snapshots = [s for s in record.snapshots if s["uuid"] != guid]
    record.save()
