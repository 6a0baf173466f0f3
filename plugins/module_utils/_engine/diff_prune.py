# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_diff_prune module's logic: the keep-* policy over a set of ``rbd diff v1`` files.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

``rbd_export_diff dest=`` writes one file per run: a full diff (no from-snapshot) or an incremental
from the previous snapshot.  Each file is a point, named by its to-snapshot and dated by it (a
managed name ``<prefix><UTC stamp>``) or else by the file's mtime.  The policy (the same rules and
code as qcow2_chain_prune, ``_repository/retention.py``) decides which points are kept; a kept
point needs every file from its full diff up to it, since ``rbd import-diff`` replays them in
order.  Only files that no kept point needs are removed, so every kept point can still be
replayed from the set exactly as before.  A file whose chain is broken (its from-snapshot is no
file of the set) is never removed nor are its ancestors: what it needs is not here to judge.
"""

from __future__ import annotations

import datetime
import fnmatch
import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffReader
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    DiffFormatError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import fsync_dir
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention

NEEDED = "needed"  # removed by the policy, but a kept point replays through it


def read_set(directory, pattern="*", prefix=_naming.DEFAULT_PREFIX):
    """([points], [ignored file names]): every ``rbd diff v1`` file of ``directory`` matching ``pattern``
    as ``name`` (to-snapshot), ``file``, ``from`` (from-snapshot or None), ``size``, ``bytes``, ``time``."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise NotFoundError("diff directory %s does not exist" % directory, path=directory)
    except OSError as exc:
        raise InputError("cannot list %s: %s" % (directory, exc.strerror), path=directory)
    points, ignored, seen = [], [], {}
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not fnmatch.fnmatchcase(name, pattern) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                reader = DiffReader(f)
                header = (reader.from_snap, reader.to_snap, reader.size)
        except (DiffFormatError, OSError):
            ignored.append(name)
            continue
        from_snap, to_snap, size = header
        if not to_snap:
            ignored.append(name)  # a diff to the image head names no point in time
            continue
        if to_snap in seen:
            raise InputError("%s and %s both hold the diff up to snapshot %s: remove one first"
                             % (seen[to_snap], name, to_snap), snapshot=to_snap)
        seen[to_snap] = name
        st = os.stat(path)
        when = _naming.parse_managed(to_snap, prefix) or datetime.datetime.fromtimestamp(
            st.st_mtime, datetime.timezone.utc)
        points.append(dict(name=to_snap, file=name, parent=from_snap, size=size, bytes=st.st_size, time=when))
    return points, ignored


def _chain(point, by_name):
    """(the points ``point`` replays through, itself first; whether that reaches a full diff in the set)."""
    out, seen = [], set()
    while point is not None and point["name"] not in seen:
        seen.add(point["name"])
        out.append(point)
        if point["parent"] is None:
            return out, True
        point = by_name.get(point["parent"])
    return out, False  # its chain leaves the set (or loops): nothing of it is judged removable


def prune(params, check_mode=False):
    directory = params["directory"]
    policy = retention.check_policy(dict((r, params.get(r)) for r in retention.RULE_NAMES))
    if not retention.keeps_something(policy):
        raise InputError("no keep_* rule above 0: a prune would keep every diff; give a policy")
    points, ignored = read_set(directory, params.get("pattern") or "*", params.get("prefix") or
                               _naming.DEFAULT_PREFIX)
    protected = set(params.get("protected") or [])
    unknown = sorted(protected - set(p["name"] for p in points))
    if unknown:
        raise InputError("protected names no diff of the set: %s" % ", ".join(unknown))
    for point in points:
        point["protected"] = point["name"] in protected
    by_name = dict((p["name"], p) for p in points)
    decisions = dict((d["name"], d) for d in retention.select(points, policy, params.get("timezone") or "UTC"))
    needed = set()
    for point in points:
        walk, complete = _chain(point, by_name)
        if decisions[point["name"]]["action"] == retention.KEEP or not complete:
            needed.update(p["name"] for p in walk)
    rows, remove = [], []
    for point in sorted(points, key=lambda p: p["time"], reverse=True):
        decision = decisions[point["name"]]
        action = decision["action"]
        if action != retention.KEEP and point["name"] in needed:
            action = NEEDED
        rows.append(dict(name=point["name"], file=point["file"], parent=point["parent"], bytes=point["bytes"],
                         action=action, rule=decision["rule"], reason=decision["reason"]
                         if action != NEEDED else "a kept diff is replayed through it"))
        if action == retention.REMOVE:
            remove.append(point)
    result = dict(changed=bool(remove), directory=directory, points=rows, ignored=ignored,
                  kept=[r["file"] for r in rows if r["action"] != retention.REMOVE],
                  removed=[p["file"] for p in remove], bytes_freed=sum(p["bytes"] for p in remove))
    if check_mode or not remove:
        return result
    for point in remove:
        os.unlink(os.path.join(directory, point["file"]))
    fsync_dir(directory)
    return result
