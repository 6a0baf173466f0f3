# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_prune module's logic: apply a keep-* policy to one disk's repository.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

policy (``_repository/retention.py``) ─▶ what may go without changing a kept point ─▶ journal ─▶
manifest ─▶ files

The policy decides keep or remove for every point.  A point the policy removes is physically
removed only when no point that stays reads through it: every point that reads through it (its
descendants in the chain) goes too.  That is a whole older segment none of whose points is kept,
or the trailing points of a segment none of which is kept.  Nothing is rewritten, so no kept
point's bytes can change.  A removed point that a kept point reads through stays this run and is
reported ``needs_merge``: merging a point out of a chain is not implemented yet.  The newest point
is never removed (the next backup's base).

Removal, under the exclusive repository lock with readers excluded (``Repository.lock(
exclude_readers=True)``: no chain_verify reads meanwhile; a backup waits for the lock):

1. the journal ``.intent-prune.json`` records the points and files about to go (durably);
2. the manifest is replaced without those points (atomically): from then on nothing refers to them;
3. their layer and digests files are unlinked, the directory fsynced;
4. the journal is cleared.

A run killed anywhere leaves either the old manifest (nothing lost, the next prune decides again)
or the new one and some of the files; the next prune finds the journal and removes the files of
the points it names that no manifest point refers to.  Other unreferenced files are reported,
never removed (they are not ours to judge: see ``_engine/backup.py``).

A restore takes no repository lock: one of a kept point reads nothing that goes; one of a removed
point that started before the manifest changed either has its files open (Linux keeps unlinked
files readable) or fails on a missing layer.
"""

from __future__ import annotations

import os
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, NotFoundError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.naming import parse_managed
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import retention
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    DIGESTS_SUFFIX, LAYER_SUFFIX, MANIFEST, Repository, check_point_name)

JOURNAL_KIND = "prune"
MAX_LOCK_WAIT = 86400
KEEP, REMOVE, NEEDS_MERGE = "keep", "remove", "needs_merge"


def check_params(params):
    """Validate everything that needs no I/O; returns the normalised values."""
    if not params.get("chain"):
        raise InputError("chain (the disk's repository directory) is required")
    policy = retention.check_policy(dict((rule, params.get(rule)) for rule in retention.RULE_NAMES))
    timezone = params.get("timezone") or retention.DEFAULT_TIMEZONE
    retention.get_timezone(timezone)
    protected = params.get("protected") or []
    if not isinstance(protected, (list, tuple)):
        raise InputError("protected must be a list of point names")
    for name in protected:
        check_point_name(name)
    lock_wait = params.get("lock_wait") or 0
    if isinstance(lock_wait, bool) or not isinstance(lock_wait, int) or not 0 <= lock_wait <= MAX_LOCK_WAIT:
        raise InputError("lock_wait must be a number of seconds between 0 and %d, not %r" % (MAX_LOCK_WAIT, lock_wait))
    return dict(policy=policy, timezone=timezone, protected=set(protected), lock_wait=lock_wait)


def is_protected(point, protected=()):
    """Protected by name (the module's option) or by the manifest (``extra.protected: true``)."""
    return point["name"] in protected or (point.get("extra") or {}).get("protected") is True


def _allocated(path):
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def point_files(point):
    """The files of a point in its disk directory: its layer, and its digests file if any."""
    return [point["layer"]] + ([point["digests"]] if point.get("digests") else [])


def plan(repo, policy, timezone=retention.DEFAULT_TIMEZONE, protected=()):
    """One row per point, oldest first: what the policy decides and what this run can do about it.

    Row: ``name``, ``segment``, ``action`` (keep / remove / needs_merge), ``rule`` and ``period``
    (what keeps it, see ``retention.select``), ``reason``, ``files``, ``bytes`` (what its files
    occupy on disk: what removing it frees).
    """
    points = repo.points()
    if not points:
        return []
    decisions = dict((d["name"], d) for d in retention.select(
        [dict(name=p["name"], time=parse_managed(p["name"], prefix=""), protected=is_protected(p, protected),
              unsound=repo.unsound_reason(p["name"])) for p in points], policy, timezone))
    newest = points[-1]["name"]
    if decisions[newest]["action"] == retention.REMOVE:
        decisions[newest] = dict(decisions[newest], action=retention.KEEP, rule="newest", period=None,
                                 reason="the newest point is never removed (the next backup's base); the policy "
                                        "alone would remove it: %s" % decisions[newest]["reason"])
    # Who reads through each point: the kept points among its descendants.
    kept_readers = dict((p["name"], []) for p in points)
    for point in reversed(points):  # children before their parents
        name = point["name"]
        if point["parent"] is not None:
            readers = kept_readers[point["parent"]]
            if decisions[name]["action"] == retention.KEEP:
                readers.append(name)
            readers.extend(kept_readers[name])
    rows = []
    for point in points:
        name = point["name"]
        decision = decisions[name]
        row = dict(name=name, segment=point["segment"], parent=point["parent"], rule=decision["rule"],
                   period=decision["period"], reason=decision["reason"], files=point_files(point),
                   bytes=sum(_allocated(repo.path(f)) for f in point_files(point)))
        if decision["action"] == retention.KEEP:
            row["action"] = KEEP
        elif kept_readers[name]:
            readers = sorted(kept_readers[name])
            row.update(action=NEEDS_MERGE, reason=(
                "%s; kept this run: kept point%s %s read%s through it, and merging a point out of a chain is not "
                "implemented yet" % (decision["reason"], "s" if len(readers) > 1 else "",
                                     ", ".join(readers[:3]) + (" and %d more" % (len(readers) - 3)
                                                               if len(readers) > 3 else ""),
                                     "" if len(readers) > 1 else "s")))
        else:
            row["action"] = REMOVE
        rows.append(row)
    return rows


def _names(rows, action):
    return [r["name"] for r in rows if r["action"] == action]


def _diff(repo, rows):
    # The same line before and after for what stays, so the diff shows every point with its decision.
    def line(row):
        why = row["rule"] or row["reason"]
        if row["period"] and row["rule"] not in (None, "keep_last"):
            why = "%s %s" % (row["rule"], row["period"])
        if row["action"] == NEEDS_MERGE:
            why = "needs a merge, kept this run"
        return "%s  segment %d  %d bytes  %s (%s)\n" % (row["name"], row["segment"], row["bytes"], row["action"], why)

    return dict(before_header="%s (before)" % os.path.join(repo.disk_dir, MANIFEST),
                after_header="%s (after)" % os.path.join(repo.disk_dir, MANIFEST),
                before="".join(line(r) for r in rows),
                after="".join(line(r) for r in rows if r["action"] != REMOVE))


def finish_killed_prune(repo):
    """Remove the files a killed prune journalled for points no manifest point refers to; clear the journal."""
    record = repo.intent(JOURNAL_KIND)
    if record is None:
        return []
    referenced = set()
    for point in repo.points():
        referenced.update(point_files(point))
    removed = []
    for name in record.get("points") or []:
        check_point_name(name)
        for entry in (name + LAYER_SUFFIX, name + DIGESTS_SUFFIX):
            if entry not in referenced and os.path.lexists(repo.path(entry)):
                repo.remove_file(entry)
                removed.append(entry)
    repo.clear_intent(JOURNAL_KIND)
    return removed


def prune(params, check_mode=False, diff=False):
    """Apply the policy of ``params`` to the repository ``params['chain']``; the module's result."""
    opts = check_params(params)
    run_info, run_keep = _runs.check_run_options(params)
    repo = Repository(params["chain"])
    if not os.path.isdir(repo.disk_dir):
        raise NotFoundError("no repository directory %s" % repo.disk_dir, path=repo.disk_dir)
    summary = _runs.RunSummary(repo.disk_dir, "prune", run_info, keep=0 if check_mode else run_keep)
    try:
        result = _prune(repo, opts, check_mode, diff)
    except BaseException as exc:
        summary.finish(error=_runs.error_text(exc))
        raise
    summary.update(**_runs.prune_fields(result))
    result["run_summary"] = summary.finish(warnings=result["warnings"])
    return result


def _prune(repo, opts, check_mode, diff):
    started = time.monotonic()
    result = dict(changed=False, chain=repo.disk_dir, policy=opts["policy"], timezone=opts["timezone"],
                  keep_all=not retention.keeps_something(opts["policy"]), cleaned=[], warnings=[])
    if check_mode:
        repo.load(verify=False)
        rows = plan(repo, opts["policy"], opts["timezone"], opts["protected"])
        journal = repo.intent(JOURNAL_KIND)
        result["changed"] = bool(_names(rows, REMOVE)) or journal is not None
    else:
        with repo.lock(wait=opts["lock_wait"], exclude_readers=True):
            repo.load(verify=True)
            result["cleaned"] = repo.cleanup_partial() + finish_killed_prune(repo)
            rows = plan(repo, opts["policy"], opts["timezone"], opts["protected"])
            gone = _names(rows, REMOVE)
            if gone:
                remove_points(repo, [r for r in rows if r["action"] == REMOVE])
            result["changed"] = bool(gone or result["cleaned"])
    unknown = sorted(opts["protected"] - set(r["name"] for r in rows))
    if unknown:
        result["warnings"].append("protected names no point of %s: %s" % (repo.disk_dir, ", ".join(unknown)))
    result.update(
        points=rows, kept=_names(rows, KEEP), removed=_names(rows, REMOVE), needs_merge=_names(rows, NEEDS_MERGE),
        bytes_freed=sum(r["bytes"] for r in rows if r["action"] == REMOVE),
        orphans=repo.orphans(), seconds=round(time.monotonic() - started, 3))
    if diff:
        result["diff"] = _diff(repo, rows)
    return result


def remove_points(repo, rows):
    """Journal, manifest, files, journal cleared (see the module docstring); under the lock."""
    names = set(r["name"] for r in rows)
    repo.record_intent(JOURNAL_KIND, dict(points=sorted(names), pid=os.getpid()))
    repo.save([p for p in repo.points() if p["name"] not in names])
    for row in rows:
        for entry in row["files"]:
            repo.remove_file(entry)
    repo.clear_intent(JOURNAL_KIND)
