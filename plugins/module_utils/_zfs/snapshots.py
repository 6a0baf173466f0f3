# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The zfs_snapshot and zfs_snapshot_info modules' logic: read the dataset, plan, refuse, then apply.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Everything is read from ``zfs list -H -p`` and ``zfs holds -H`` (``_cli.zfs``).  The rules:

- Only OUR snapshots are ever destroyed by a prune: names that parse back as ``prefix`` + UTC
  time (``_core.naming``, the same names lvm_snapshot and rbd_snapshot make).  The newest N are
  the N with the highest ``createtxg`` (the transaction group ZFS wrote them in: a clock that
  went backwards cannot reorder them).
- A snapshot is never destroyed while it has clones (``zfs destroy -R`` would destroy the clones,
  which are someone else's datasets: it is never run) or while a hold other than our tag is on it
  (someone else relies on it, a replication tool's base for instance).  Both are refused before
  anything changes, with the clones or tags named.
- Our own hold (tag ``snapchain`` unless told otherwise) is released right before we destroy a
  snapshot we hold, and put back if the destroy then fails: leaked holds are what users of other
  snapshot tools complain about most.
- A keep-* policy (``keep_last`` ... ``keep_yearly``, ``timezone``, ``protected``: the rules and the
  code of qcow2_chain_prune, ``_repository/retention.py``) prunes our snapshots of the dataset the
  same way, each dated by the UTC time of its name; what it removes is listed with the rule that
  would have kept it, and ``zfs destroy -nvp`` says how many bytes that frees (snapshots share
  blocks: their ``used`` does not add up).
- ``recursive`` is ``zfs snapshot -r`` (one transaction group for the dataset and every
  descendant) and ``zfs destroy -r`` (the same name in every descendant); holds are put on and
  released from each snapshot of the name by its full name, so that running twice changes nothing.
"""

from __future__ import annotations

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs as _zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention

STATES = ("present", "absent")
DEFAULT_TAG = "snapchain"


def check_prefix(prefix):
    try:
        return _naming.check_prefix(_naming.DEFAULT_PREFIX if prefix is None else prefix)
    except ValueError as exc:
        raise InputError(str(exc))


# --- reading ---------------------------------------------------------------------------------

def describe(row, holds, prefix, tag):
    """What the modules return about one snapshot row of ``zfs list``."""
    dataset, name = _zfs.split_snapshot(row["name"])
    tags = sorted(holds.get(row["name"], {}))
    return dict(name=name, full_name=row["name"], dataset=dataset, createtxg=row.get("createtxg"),
                creation=row.get("creation"), used=row.get("used"), referenced=row.get("referenced"),
                userrefs=row.get("userrefs"), clones=row.get("clones") or [], guid=row.get("guid"), holds=tags,
                held=tag in tags, managed=_naming.is_managed(name, prefix))


def read(dataset, recursive, prefix, tag):
    """``(datasets, snapshots)``: the dataset (and its descendants with ``recursive``) as {name: type}, and
    their snapshots oldest first; NotFoundError when ``dataset`` does not exist."""
    datasets = dict((r["name"], r["type"]) for r in _zfs.list_datasets(
        [dataset], fields=("name", "type"), types=["filesystem", "volume"], recursive=recursive))
    rows = _zfs.snapshots(dataset, recursive=recursive)
    holds = _zfs.holds([r["name"] for r in rows if r.get("userrefs")])
    return datasets, [describe(r, holds, prefix, tag) for r in rows]


def _order(snap):
    """Oldest first; a snapshot only planned (check mode, no createtxg yet) is the newest."""
    txg = snap.get("createtxg")
    return (txg is None, txg or 0, snap["full_name"])


# --- zfs_snapshot ----------------------------------------------------------------------------

def validate(params):
    dataset = _zfs.check_dataset(params.get("dataset"))
    name = params.get("name")
    if name is not None:
        _zfs.check_snapshot_name(name, dataset)
    prefix = check_prefix(params.get("prefix"))
    tag = _zfs.check_tag(params.get("hold_tag") or DEFAULT_TAG)
    keep = params.get("keep_managed")
    state = params.get("state") or "present"
    policy = policy_of(params)
    if keep is not None and keep < 1:
        raise InputError("keep_managed must be >= 1 (the newest managed snapshot is the next incremental's base)")
    if keep is not None and policy:
        raise InputError("give keep_managed (the newest N) or a keep_* policy, not both")
    if policy and not retention.keeps_something(policy):
        raise InputError("no keep_* rule above 0: a prune would keep every snapshot; give a policy")
    if params.get("protected") and not policy:
        raise InputError("protected applies to a keep_* policy")
    if state == "absent" and name is None and keep is None and not policy:
        raise InputError("state=absent needs name (the snapshot to destroy), keep_managed or a keep_* policy (to "
                         "prune ours)")
    if state == "absent" and params.get("hold"):
        raise InputError("hold=true makes no sense with state=absent (our hold is released before a destroy)")
    return dataset, name, prefix, tag, keep, state


def policy_of(params):
    """The keep-* rules given (``{}`` when none)."""
    return retention.check_policy(dict((r, params.get(r)) for r in retention.RULE_NAMES if params.get(r)))


def decide(snaps, policy, params):
    """``retention.select`` over our snapshots ``snaps`` (dicts with ``name``), dated by their names."""
    protected = set(params.get("protected") or [])
    prefix = check_prefix(params.get("prefix"))
    points = [dict(name=s["name"], time=_naming.parse_managed(s["name"], prefix), protected=s["name"] in protected)
              for s in snaps]
    return retention.select(points, policy, params.get("timezone") or retention.DEFAULT_TIMEZONE)


def plan(datasets, snaps, params):
    """What to do, from the current state; pure (unit-tested).

    ``dict(target, create, hold, release, destroy)``: the snapshot name acted on, whether it is
    created, the full names to hold and to release, and the names (of the top dataset) to destroy.
    """
    dataset, name, prefix, tag, keep, state = validate(params)
    want_hold = params.get("hold")
    by_full = dict((s["full_name"], s) for s in snaps)
    out = dict(target=name, create=False, hold=[], release=[], destroy=[], decisions=[])
    if state == "present":
        target = name or _naming.unique_managed_name(set(s["name"] for s in snaps), prefix)
        out["target"] = target
        if "%s@%s" % (dataset, target) not in by_full:
            taken = sorted(s["full_name"] for s in snaps if s["name"] == target)
            if taken:
                raise ConflictError("%s@%s does not exist but %s does: zfs snapshot -r would fail; destroy it or "
                                    "choose another name" % (dataset, target, ", ".join(taken)), existing=taken)
            out["create"] = True
        fulls = sorted("%s@%s" % (d, target) for d in datasets) if out["create"] else \
            [s["full_name"] for s in snaps if s["name"] == target]
        if want_hold:
            out["hold"] = [f for f in fulls if not (by_full.get(f) or {}).get("held")]
        elif want_hold is False:
            out["release"] = [f for f in fulls if (by_full.get(f) or {}).get("held")]
    elif any(s["name"] == name for s in snaps):
        out["destroy"].append(name)
    policy = policy_of(params)
    if keep is not None or policy:
        top = [s for s in snaps if s["dataset"] == dataset and s["managed"] and s["name"] not in out["destroy"]]
        if out["create"] and _naming.is_managed(out["target"], prefix):
            top.append(dict(name=out["target"], full_name="%s@%s" % (dataset, out["target"]), createtxg=None))
        top.sort(key=_order)
        if keep is not None:
            out["destroy"].extend(s["name"] for s in top[:-keep])
        else:
            out["decisions"] = decide(top, policy, params)
            removed = set(d["name"] for d in out["decisions"] if d["action"] == retention.REMOVE)
            out["destroy"].extend(s["name"] for s in top if s["name"] in removed)
    return out


def victims_of(snaps, names):
    """The snapshots destroying ``names`` destroys (with ``recursive``, ``snaps`` holds the descendants' too)."""
    return [s for s in snaps if s["name"] in names]


def refuse_destroy(victims, tag):
    """ConflictError naming every clone and foreign hold of the snapshots to destroy."""
    problems = []
    for snap in victims:
        if snap["clones"]:
            problems.append("%s has clones %s" % (snap["full_name"], ", ".join(snap["clones"])))
        foreign = [t for t in snap["holds"] if t != tag]
        if foreign:
            problems.append("%s is held by %s" % (snap["full_name"], ", ".join(foreign)))
    if problems:
        raise ConflictError("refusing to destroy: %s (nothing was changed; zfs destroy -R is never run, and only "
                            "our hold tag %s is ever released)" % ("; ".join(problems), tag), problems=problems)


def ensure(params, check_mode=False):
    """Make ``dataset@name`` present or absent, hold or release it, prune ours; the module's result."""
    dataset, _name, prefix, tag, _keep, _state = validate(params)
    recursive = bool(params.get("recursive"))
    datasets, before = read(dataset, recursive, prefix, tag)
    todo = plan(datasets, before, params)
    victims = victims_of(before, todo["destroy"])
    refuse_destroy(victims, tag)
    changed = bool(todo["create"] or todo["hold"] or todo["release"] or todo["destroy"])
    # what the destroys free, asked of ZFS before they run (the snapshots that pre-exist: a planned one is new)
    freed = _zfs.destroy_estimate(dataset, [n for n in todo["destroy"] if any(s["name"] == n for s in before)],
                                  recursive=recursive)
    if changed and not check_mode:
        apply(dataset, todo, victims, recursive, tag)
        _datasets, after = read(dataset, recursive, prefix, tag)
    else:
        after = simulate(before, datasets, todo, dataset, prefix, tag)
    target = todo["target"]
    full = "%s@%s" % (dataset, target) if target else None
    mine = [s for s in after if s["full_name"] == full]
    result = dict(changed=changed, dataset=dataset, type=datasets.get(dataset), snapshot=target, full_name=full,
                  created=todo["create"], destroyed=sorted(s["full_name"] for s in victims), held=todo["hold"],
                  released=sorted(set(todo["release"]) | set(s["full_name"] for s in victims if s["held"])),
                  hold_tag=tag, snapshots=after, bytes_freed=freed, decisions=todo["decisions"],
                  diff=dict(before=_diff_side(before), after=_diff_side(after, todo["decisions"], freed)))
    if mine:
        result["info"] = mine[0]
    return result


def apply(dataset, todo, victims, recursive, tag):
    """Run the plan: create, hold, release, then destroy (each held one of ours released just before)."""
    target = "%s@%s" % (dataset, todo["target"]) if todo["target"] else None
    if todo["create"]:
        _zfs.snapshot([target], recursive=recursive)
    if todo["hold"]:
        _zfs.hold(tag, todo["hold"])
    if todo["release"]:
        _zfs.release(tag, todo["release"])
    for name in todo["destroy"]:
        ours = [s["full_name"] for s in victims if s["name"] == name and s["held"]]
        if ours:
            _zfs.release(tag, ours)
        try:
            _zfs.destroy("%s@%s" % (dataset, name), recursive=recursive)
        except CommandError:
            if ours:
                _zfs.hold(tag, ours)  # as it was: the snapshot stays, and so does our hold
            raise


def simulate(snaps, datasets, todo, dataset, prefix, tag):
    """What ``read`` would return after ``todo`` (check mode)."""
    out = []
    for snap in snaps:
        if snap["name"] in todo["destroy"]:
            continue
        snap = dict(snap)
        if snap["full_name"] in todo["hold"]:
            snap.update(holds=sorted(snap["holds"] + [tag]), held=True, userrefs=(snap["userrefs"] or 0) + 1)
        if snap["full_name"] in todo["release"]:
            snap.update(holds=[t for t in snap["holds"] if t != tag], held=False, userrefs=snap["userrefs"] - 1)
        out.append(snap)
    if todo["create"]:
        for ds in sorted(datasets):
            full = "%s@%s" % (ds, todo["target"])
            held = full in todo["hold"]
            out.append(dict(name=todo["target"], full_name=full, dataset=ds, createtxg=None, creation=None,
                            used=None, referenced=None, userrefs=int(held), clones=[], guid=None,
                            holds=[tag] if held else [], held=held, managed=_naming.is_managed(todo["target"], prefix)))
    return sorted(out, key=_order)


def _diff_side(snaps, decisions=None, freed=None):
    out = dict(snapshots=[s["full_name"] for s in snaps], held=[s["full_name"] for s in snaps if s["held"]])
    if decisions:  # every snapshot of ours the policy judged, and why: what diff mode shows of a prune
        out["policy"] = ["%s: %s (%s)" % (d["name"], d["action"], d["reason"]) for d in decisions]
        out["bytes_freed"] = freed
    return out


# --- zfs_snapshot_info -----------------------------------------------------------------------

def info(params):
    """The snapshots of ``dataset`` (and of its descendants with ``recursive``), oldest first; changes nothing."""
    dataset = _zfs.check_dataset(params.get("dataset"))
    prefix = check_prefix(params.get("prefix"))
    tag = _zfs.check_tag(params.get("hold_tag") or DEFAULT_TAG)
    datasets, snaps = read(dataset, bool(params.get("recursive")), prefix, tag)
    return dict(changed=False, dataset=dataset, type=datasets.get(dataset), datasets=sorted(datasets),
                mountpoint=mounted_at(dataset) if datasets.get(dataset) == "filesystem" else None,
                snapshots=snaps, managed=[s["full_name"] for s in snaps if s["managed"]],
                held=[s["full_name"] for s in snaps if s["held"]])


def mounted_at(dataset):
    """The directory the filesystem ``dataset`` is mounted on (``zfs get -H -p mounted,mountpoint``), or None when
    it is not mounted or has no path of its own (V(none), V(legacy))."""
    props = _zfs.get([dataset], ["mounted", "mountpoint"]).get(dataset) or {}
    where = props.get("mountpoint") or ""
    return where if props.get("mounted") == "yes" and where.startswith("/") else None
