# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2_chain_prune module's logic: apply a keep-* policy to one disk's repository.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

policy (``_repository/retention.py``) ─▶ what goes, what merges (``_engine/merge.py``) ─▶ journal ─▶
merged digests ─▶ manifest ─▶ merged data ─▶ files

The policy decides keep or remove for every point (the newest point is never removed: the next
backup's base).  A removed point that no kept point reads through simply goes (a whole older
segment, the trailing points of a segment).  One that kept points read through is merged out
(``_engine/merge.py``): its data moves into the kept point above it, which then reads exactly the
same bytes; only a merge across a resize is refused, the point stays and is reported
``needs_merge``.

Removal, under the exclusive repository lock with readers excluded (``Repository.lock(
exclude_readers=True)``: no chain_verify or restore reads meanwhile; a backup waits for the lock):

1. the journal ``.intent-prune.json`` records the points and files about to go and the merges (durably);
2. each merged child's digests file is replaced by the merged digests;
3. the manifest is replaced without the removed points, merged children above their new parents;
4. each merge's data step (rebase, or commit then rename);
5. the removed points' files are unlinked, the directory fsynced;
6. the journal is cleared.

A run killed before 3 leaves the old manifest (every point reads as before; the next prune drops
the journal and decides again); after it, the next prune finishes the journalled merges and
removes the files of the journalled points no manifest point refers to.  Between 3 and the end of
4 a merged child's layer may still name a removed layer as backing file: ``Repository`` and
chain_verify accept exactly that while the journal names the merge (``merging_backing``).  Other
unreferenced files are reported, never removed (not ours to judge: see ``_engine/backup.py``).
"""

from __future__ import annotations

import os
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, NotFoundError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.naming import parse_managed
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine import merge as _merge
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
    max_depth = params.get("max_depth") or 0
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not (max_depth == 0 or 2 <= max_depth <= 1000):
        raise InputError("max_depth must be 0 (no limit) or a number of layers between 2 and 1000, not %r"
                         % (max_depth,))
    lock_wait = params.get("lock_wait") or 0
    if isinstance(lock_wait, bool) or not isinstance(lock_wait, int) or not 0 <= lock_wait <= MAX_LOCK_WAIT:
        raise InputError("lock_wait must be a number of seconds between 0 and %d, not %r" % (MAX_LOCK_WAIT, lock_wait))
    return dict(policy=policy, timezone=timezone, protected=set(protected), lock_wait=lock_wait, max_depth=max_depth)


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
    occupy on disk: what removing it frees), ``merged_into``.  Returns ``(rows, merges)``.
    """
    points = repo.points()
    if not points:
        return [], []
    decisions = dict((d["name"], d) for d in retention.select(
        [dict(name=p["name"], time=parse_managed(p["name"], prefix=""), protected=is_protected(p, protected),
              unsound=repo.unsound_reason(p["name"])) for p in points], policy, timezone))
    newest = points[-1]["name"]
    if decisions[newest]["action"] == retention.REMOVE:
        decisions[newest] = dict(decisions[newest], action=retention.KEEP, rule="newest", period=None,
                                 reason="the newest point is never removed (the next backup's base); the policy "
                                        "alone would remove it: %s" % decisions[newest]["reason"])
    removed = set(n for n, d in decisions.items() if d["action"] != retention.KEEP)
    # A removed point kept points read through is merged out (``_engine/merge.py``) unless it cannot be
    # (a resize in between): then it stays, and so may its ancestors' merges change: to a fixpoint.
    stays = {}
    while True:
        merges, problems = _merge.plan_merges(repo, removed - set(stays))
        if not problems:
            break
        stays.update(problems)
    into = {}
    for merge in merges:
        for name in merge["removed"]:
            into.setdefault(name, []).append(merge["child"])
    rows = []
    for point in points:
        name = point["name"]
        decision = decisions[name]
        row = dict(name=name, segment=point["segment"], parent=point["parent"], rule=decision["rule"],
                   period=decision["period"], reason=decision["reason"], files=point_files(point),
                   bytes=sum(_allocated(repo.path(f)) for f in point_files(point)), merged_into=None)
        if decision["action"] == retention.KEEP:
            row["action"] = KEEP
        elif name in stays:
            row.update(action=NEEDS_MERGE, reason="%s; kept this run: %s" % (decision["reason"], stays[name]))
        else:
            row["action"] = REMOVE
            if name in into:
                readers = sorted(into[name])
                row.update(merged_into=readers[0] if len(readers) == 1 else readers, reason=(
                    "%s; its data that kept point%s %s read%s is merged into %s" % (
                        decision["reason"], "s" if len(readers) > 1 else "", ", ".join(readers),
                        "" if len(readers) > 1 else "s", "them" if len(readers) > 1 else "it")))
        rows.append(row)
    return rows, merges


def _names(rows, action):
    return [r["name"] for r in rows if r["action"] == action]


def _diff(repo, rows):
    # The same line before and after for what stays, so the diff shows every point with its decision.
    def line(row):
        why = row["rule"] or row["reason"]
        if row["period"] and row["rule"] not in (None, "keep_last"):
            why = "%s %s" % (row["rule"], row["period"])
        if row["action"] == NEEDS_MERGE:
            why = "cannot be merged out, kept this run"
        elif row.get("merged_into"):
            into = row["merged_into"]
            why = "%s; merged into %s" % (row["rule"] or row["reason"].split("; ")[0],
                                          into if isinstance(into, str) else ", ".join(into))
        return "%s  segment %d  %d bytes  %s (%s)\n" % (row["name"], row["segment"], row["bytes"], row["action"], why)

    return dict(before_header="%s (before)" % os.path.join(repo.disk_dir, MANIFEST),
                after_header="%s (after)" % os.path.join(repo.disk_dir, MANIFEST),
                before="".join(line(r) for r in rows),
                after="".join(line(r) for r in rows if r["action"] != REMOVE))


def finish_killed_prune(repo):
    """Complete what a killed prune journalled; returns the files it removed.

    Manifest not replaced yet (a journalled point still in it): nothing a point reads changed (a
    merged child's digests, if already replaced, are right under the old manifest too), so the
    journal is dropped and this run decides afresh.  Manifest replaced: every journalled merge's
    data step is finished (``merge.merge_data``, idempotent), then the files of the journalled
    points that no manifest point refers to are removed."""
    record = repo.intent(JOURNAL_KIND)
    if record is None:
        return []
    names = set(repo.names())
    journalled = [check_point_name(n) for n in record.get("points") or []]
    removed = []
    if record.get("consolidate"):
        _merge.finish_consolidate(repo, check_point_name(record["consolidate"]))
    elif not names & set(journalled):
        for merge in record.get("merges") or []:
            if merge.get("child") in names:
                _merge.merge_data(repo, merge)
        referenced = set()
        for point in repo.points():
            referenced.update(point_files(point))
        for name in journalled:
            for entry in (name + LAYER_SUFFIX, name + DIGESTS_SUFFIX):
                if entry not in referenced and os.path.lexists(repo.path(entry)):
                    repo.remove_file(entry)
                    removed.append(entry)
        for entry in record.get("files") or []:
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
                  keep_all=not retention.keeps_something(opts["policy"]), cleaned=[], warnings=[], merges=[],
                  consolidated=None, max_depth=opts["max_depth"])
    if check_mode:
        repo.load(verify=False)
        rows, merges = plan(repo, opts["policy"], opts["timezone"], opts["protected"])
        journal = repo.intent(JOURNAL_KIND)
        result["changed"] = bool(_names(rows, REMOVE)) or journal is not None
        result["merges"] = [_merge_result(m) for m in merges]
        result["consolidated"] = _deep(repo, rows, opts["max_depth"])
        result["changed"] = result["changed"] or result["consolidated"] is not None
    else:
        with repo.lock(wait=opts["lock_wait"], exclude_readers=True):
            repo.load(verify=True)
            result["cleaned"] = repo.cleanup_partial() + finish_killed_prune(repo)
            repo.load(verify=True)
            rows, merges = plan(repo, opts["policy"], opts["timezone"], opts["protected"])
            gone = _names(rows, REMOVE)
            if gone:
                result["merges"] = remove_points(repo, [r for r in rows if r["action"] == REMOVE], merges)
            result["consolidated"] = deep = _deep(repo, rows, opts["max_depth"])
            if deep is not None:
                deep["seconds"] = _merge.consolidate(
                    repo, deep["point"], lambda record: repo.record_intent(JOURNAL_KIND, record))
                repo.clear_intent(JOURNAL_KIND)
                _merge.step("consolidate-cleared")
            result["changed"] = bool(gone or result["cleaned"] or deep)
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


def _deep(repo, rows, max_depth):
    """``{point, depth}`` when the newest point that stays reads through more than ``max_depth`` layers
    (it then becomes a new segment's base: ``merge.consolidate``), else None."""
    if not max_depth:
        return None
    stays = dict((r["name"], r) for r in rows if r["action"] != REMOVE)
    if not stays:
        return None
    by_name = dict((p["name"], p) for p in repo.points())
    newest = max(stays)
    depth, name = 0, newest
    while name is not None:
        depth += 1
        name = _parent_after(by_name, stays, name)
    return dict(point=newest, depth=depth, max_depth=max_depth) if depth > max_depth else None


def _parent_after(by_name, stays, name):
    """The parent a point has after this run's merges: its nearest ancestor that stays."""
    parent = by_name[name]["parent"] if name in by_name else None
    while parent is not None and parent not in stays:
        parent = by_name[parent]["parent"]
    return parent


def _merge_result(merge, seconds=None):
    out = dict(child=merge["child"], removed=list(merge["removed"]), parent=merge["parent"],
               method=merge["method"], cost_bytes=merge["cost"])
    if seconds is not None:
        out["seconds"] = seconds
    return out


def remove_points(repo, rows, merges=()):
    """Journal, merged digests, manifest, merged data, files, journal cleared (see the module
    docstring and ``_engine/merge.py``); under the lock.  Returns one entry per merge done."""
    names = set(r["name"] for r in rows)
    files = [entry for row in rows for entry in row["files"]]
    merges = [dict((k, m[k]) for k in ("child", "removed", "parent", "method", "cost")) for m in merges]
    digests_kept = {}
    for merge in merges:
        # a child whose merged digests cannot be had (a layer without any) loses its digests file
        digests_kept[merge["child"]] = all(repo.get(n).get("digests") for n in merge["removed"] + [merge["child"]])
        if not digests_kept[merge["child"]] and repo.get(merge["child"]).get("digests"):
            files.append(merge["child"] + DIGESTS_SUFFIX)
    repo.record_intent(JOURNAL_KIND, dict(points=sorted(names), merges=merges, files=sorted(set(files)),
                                          pid=os.getpid()))
    _merge.step("journal")
    for merge in merges:
        if digests_kept[merge["child"]]:
            _merge.write_digests(repo, merge)
            _merge.step("digests")
    repo.save(_merge.new_points(repo.points(), names, merges, digests_kept))
    _merge.step("manifest")
    done = []
    for merge in merges:
        how, seconds = _merge.timed(_merge.merge_data, repo, merge)
        done.append(_merge_result(merge, seconds))
        _merge.step("merged")
    for entry in sorted(set(files)):
        repo.remove_file(entry)
        _merge.step("remove")
    repo.clear_intent(JOURNAL_KIND)
    _merge.step("cleared")
    return done
