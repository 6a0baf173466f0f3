# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rbd_snapshot module's logic: plan, validate everything, then apply.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph import rbd as _rbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, InputError


def validate(params):
    state = params["state"]
    try:
        _naming.check_prefix(params["prefix"])
    except ValueError as exc:
        raise InputError(str(exc))
    _rbd.check_name("image", params["image"])
    _rbd.check_name("snapshot name", params.get("name"), required=False)
    keep = params.get("keep_managed")
    if keep is not None and keep < 1:
        raise InputError("keep_managed must be >= 1 (the newest managed snapshot is the next diff base)")
    if state == "absent" and not params.get("name") and keep is None:
        raise InputError("state=absent needs name (or keep_managed to prune managed snapshots)")
    if state == "absent" and params.get("protected"):
        raise InputError("protected=true makes no sense with state=absent")
    if params.get("keep_if_in_chain") and state != "absent":
        raise InputError("keep_if_in_chain only applies to state=absent")


def chain_users(chain, image_id, names):
    """{snapshot name: point name} for the points of the repository ``chain`` taken from this image."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository

    repo = Repository(chain)
    repo.load(verify=False)  # read-only: no lock, nothing created
    out = {}
    for point in repo.points():
        src = point.get("source") or {}
        if point.get("snapshot") in names and src.get("type") == "rbd" and src.get("image_id") in (None, image_id):
            out[point["snapshot"]] = point["name"]
    return out


def plan(snapshots, params, new_name=None):
    """Decide what to do from the current ``snapshots``; pure, so it is unit-tested.

    Returns dict(target, create, protect, remove) where ``protect`` is None
    (leave), True or False.
    """
    names = [s["name"] for s in snapshots]
    by_name = dict((s["name"], s) for s in snapshots)
    state, name, prefix = params["state"], params.get("name"), params["prefix"]
    want_protected = params.get("protected")
    out = dict(target=name, create=False, protect=None, remove=[])
    if state == "present":
        if not name:
            out["target"] = new_name or _naming.unique_managed_name(names, prefix)
            out["create"] = True
            out["protect"] = True if want_protected else None
            names = names + [out["target"]]
        elif name not in by_name:
            out["create"] = True
            out["protect"] = True if want_protected else None
            names = names + [name]
        elif want_protected is not None and by_name[name]["protected"] != want_protected:
            out["protect"] = want_protected
    elif state == "absent" and name and name in by_name:
        out["remove"].append(name)
        names = [n for n in names if n != name]
    keep = params.get("keep_managed")
    if keep is not None:
        managed = sorted((n for n in names if _naming.is_managed(n, prefix)), key=lambda n: _naming.parse_managed(n, prefix))
        out["remove"].extend(n for n in managed[:-keep] if n not in out["remove"])
    return out


def snapshot_info(params):
    """The rbd_snapshot_info module: every snapshot of the image, changing nothing."""
    _rbd.check_name("image", params["image"])
    with _rbd.session(params, params["pool"], params.get("namespace")) as sess:
        with sess.image(params["image"]) as img:
            snaps = _rbd.list_snapshots(img, params["prefix"])
            for snap in snaps:
                snap["clones"] = _rbd.snapshot_children(sess, params["image"], snap["name"])
            size = img.size()
            fast_diff = _rbd.has_fast_diff(img)
    return dict(changed=False, snapshots=snaps, size=size, fast_diff=fast_diff,
                managed=[s["name"] for s in snaps if s["managed"]])


def ensure_snapshots(params, check_mode=False):
    validate(params)
    pool, namespace, image = params["pool"], params.get("namespace"), params["image"]
    with _rbd.session(params, pool, namespace) as sess:
        with sess.image(image, read_only=check_mode) as img:
            before = _rbd.list_snapshots(img, params["prefix"])
            todo = plan(before, params)
            kept = []
            if params.get("keep_if_in_chain") and todo["remove"]:
                users = chain_users(params["keep_if_in_chain"], img.id(), todo["remove"])
                kept = [dict(name=n, reason="point %s of %s was taken from it" % (users[n], params["keep_if_in_chain"]))
                        for n in todo["remove"] if n in users]
                todo["remove"] = [n for n in todo["remove"] if n not in users]
            # Validate everything before the first change: no removal may hit a clone parent.
            for snap in todo["remove"]:
                clones = _rbd.snapshot_children(sess, image, snap)
                if clones:
                    raise ConflictError("refusing to remove snapshot %s: it has clones %s"
                                        % (_rbd.spec(pool, image, namespace, snap), ", ".join(clones)),
                                        clones=clones)
            changed = bool(todo["create"] or todo["protect"] is not None or todo["remove"])
            if changed and not check_mode:
                if todo["create"]:
                    _rbd.create_snapshot(img, todo["target"], protect=bool(todo["protect"]))
                elif todo["protect"] is not None:
                    _rbd.set_protected(img, todo["target"], todo["protect"])
                for snap in todo["remove"]:
                    _rbd.remove_snapshot(img, snap)
                after = _rbd.list_snapshots(img, params["prefix"])
            else:
                after = simulate(before, todo, params["prefix"])
    return dict(
        changed=changed,
        snapshot=todo["target"],
        created=todo["create"],
        removed=todo["remove"],
        kept=kept,
        snapshots=after,
        diff=dict(before="\n".join(s["name"] for s in before) + "\n",
                  after="\n".join(s["name"] for s in after) + "\n"),
    )


def simulate(snapshots, todo, prefix):
    """What list_snapshots would return after ``todo`` (check mode)."""
    out = [dict(s) for s in snapshots if s["name"] not in todo["remove"]]
    if todo["create"]:
        out.append(dict(name=todo["target"], id=None, size=None, protected=bool(todo["protect"]),
                        timestamp=None, managed=_naming.is_managed(todo["target"], prefix)))
    elif todo["protect"] is not None:
        for s in out:
            if s["name"] == todo["target"]:
                s["protected"] = todo["protect"]
    return out
