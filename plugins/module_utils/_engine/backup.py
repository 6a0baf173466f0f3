# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one backup flow: every module that appends a point to a chain runs this.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

    lock ─▶ clean what a killed run left ─▶ refuse / no-op ─▶ choose the base ─▶ snapshot
         ─▶ copy (one engine) ─▶ publish ─▶ source cleanup

Each step runs only after the previous one succeeded, all of it under the repository lock.
What the source does (snapshot, extents, reads, pruning) is behind the Source interface
(``_sources/base.py``); what the repository does (partial files, journal, publish) is behind
``Repository``.  The rules that keep backups safe live here, once:

- Before the source creates anything (a snapshot), the repository journals it
  (``.intent.json``); the journal names the point too before its layer is written.  A run killed
  at any moment leaves at most what the journal names; the next run removes exactly that (and
  only what no point of the manifest uses), then proceeds.
- A failure before publish removes what this run created (the snapshot, the partial layer).
- Once the manifest references the point, nothing removes its snapshot or its files: a later
  error (the directory fsync, the snapshot pruning) becomes a warning in the result, with the
  point, never a lost base and a forced full next time.
"""

from __future__ import annotations

import os

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import ConflictError, SnapchainError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import Progress
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository import run_summary as _runs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import (
    DIGESTS_SUFFIX, LAYER_SUFFIX, check_point_name)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._transfer.engine import layer_sink

_COUNTERS = ("bytes_read", "bytes_written", "zero_bytes", "extents", "seconds")


def check_point_name_option(repo, name):
    """An explicit point name must be new and the newest (ConflictError otherwise)."""
    if name is None:
        return
    check_point_name(name)
    names = repo.names()
    if name in names:
        raise ConflictError("point %s already exists in %s" % (name, repo.disk_dir), point=name)
    if names and name <= names[-1]:
        raise ConflictError("point_name %s would not be the newest point of %s (latest is %s)"
                            % (name, repo.disk_dir, names[-1]), point=name)


def backup(repo, source, force_full=False, point_name=None, writer="direct", parallel=8, cache="none",
           extra=None, check_mode=False, run_info=None, run_keep=_runs.DEFAULT_KEEP, progress_file=None):
    """Append one point of ``source`` to ``repo``; returns the result dict of the module.

    ``writer``/``cache``: how the layer is written (a source may require one: ``source.writer``).
    ``extra``: fields for the point's ``extra`` record.  In check mode nothing is created:
    the result says what a real run would do.  ``run_info``/``run_keep``: the run summary written
    into ``<disk>/runs/`` at the end, failed or not (``_repository/run_summary.py``);
    ``progress_file``: the progress of the copy, rewritten every few seconds (``_core/progress.py``).
    """
    result = dict(changed=True, chain=repo.disk_dir, point=None, parent=None, cleaned_partial=[],
                  cleaned_orphans=[], warnings=[])
    if check_mode:
        repo.load()  # no manifest (or no directory): an empty repository
        return _plan(repo, source, force_full, point_name, result)
    summary = _runs.RunSummary(repo.disk_dir, "backup", run_info, keep=run_keep, dir_mode=repo.dir_mode,
                               file_mode=repo.file_mode)
    if not summary.doc["consistency"]:
        summary.update(consistency="crash")  # a snapshot taken without a freeze
    try:
        with Progress(progress_file, chain=repo.disk_dir, kind="backup") as progress:
            source.progress = progress
            _backup(repo, source, force_full, point_name, writer, parallel, cache, extra, result)
    except BaseException as exc:
        summary.update(warnings=list(result["warnings"]))
        summary.finish(error=_runs.error_text(exc))
        raise
    summary.update(**_runs.backup_fields(result, repo))
    result["run_summary"] = summary.finish(warnings=result["warnings"])
    return result


def _backup(repo, source, force_full, point_name, writer, parallel, cache, extra, result):
    repo.ensure_dir()
    with repo.lock():
        repo.load()
        result["cleaned_partial"] = repo.cleanup_partial()
        result["cleaned_orphans"] = clean_killed_run(repo, source, result["warnings"])
        done = source.refuse(repo)
        if done is not None:
            _already(result, done)
            return
        check_point_name_option(repo, point_name)
        parent, base, reason = source.choose_base(repo, force_full)
        published = []
        try:
            source.prepare(lambda record: repo.record_intent(source.kind, record))
            name = point_name or _naming.unique_managed_name(repo.names(), prefix="", when=source.point_time())
            repo.record_intent(source.kind, dict(repo.intent(source.kind) or {}, point=name))
            point = _write(repo, source, name, parent, base, reason, writer, parallel, cache, extra, published)
        except BaseException:
            if not published:
                _discard(repo, source, result["warnings"])
            raise
        finally:
            if base is not None:
                base.close()  # the parent's effective digests, spooled to a file of the repository
        # Published: from here on, errors are warnings and nothing undoes the point.
        result["warnings"].extend(repo.take_warnings())
        try:
            repo.clear_intent(source.kind)
        except OSError as exc:
            result["warnings"].append("point %s is published, but its journal could not be removed: %s"
                                      % (point["name"], exc.strerror))
        try:
            result.update(source.finish(point))
        except (SnapchainError, OSError) as exc:
            result["warnings"].append("point %s is published; the cleanup of the source after it failed "
                                      "(the next run retries): %s" % (point["name"], exc))
    result.update(point=point, parent=point["parent"], full=point["parent"] is None, full_reason=reason,
                  mb_per_s=point["extra"].get("mb_per_s"))
    for key in _COUNTERS:
        result[key] = point[key]


def tidy(repo, source, check_mode=False):
    """No backup: what a killed or failed run left is cleaned (the journal, partial files) and the
    source's own housekeeping runs (``source.tidy(keep)``: the snapshots of ours that the newest point
    does not need go).  What a role runs in ``always:`` after a backup; returns the result dict."""
    result = dict(changed=False, chain=repo.disk_dir, cleaned_partial=[], cleaned_orphans=[], tidied=[],
                  warnings=[])
    if check_mode or not os.path.isdir(repo.disk_dir):
        return result  # nothing is changed in check mode; without a repository there is no run to clean up
    with repo.lock():
        repo.load()
        result["cleaned_partial"] = repo.cleanup_partial()
        result["cleaned_orphans"] = clean_killed_run(repo, source, result["warnings"])
        latest = repo.latest()
        result["tidied"] = source.tidy(latest.get("snapshot") if latest else None)
    result["changed"] = bool(result["cleaned_partial"] or result["cleaned_orphans"] or result["tidied"])
    return result


def _plan(repo, source, force_full, point_name, result):
    done = source.refuse(repo)
    if done is not None:
        return _already(result, done)
    check_point_name_option(repo, point_name)
    parent, _base, reason = source.choose_base(repo, force_full)
    result.update(full=parent is None, full_reason=reason, parent=parent and parent["name"])
    return result


def _already(result, point):
    result.update(changed=False, point=point, parent=point["parent"], full=point["parent"] is None,
                  full_reason=None, already_backed_up=True)
    result["warnings"].append("point %s already holds this moment of the source (snapshot %s): nothing written"
                              % (point["name"], point.get("snapshot")))
    for key in _COUNTERS:
        result[key] = 0
    return result


def _write(repo, source, name, parent, base, reason, writer, parallel, cache, extra, published):
    with repo.begin_point(name, source.size, parent=parent and parent["name"], create=False,
                          digest=source.segment_digest) as pending:
        with layer_sink(pending, source.writer or writer, parallel, cache) as sink:
            stats, digests, source_extra = source.copy(sink, parent, base, pending, parallel)
        run = stats.as_dict()
        fields = dict(extra or {}, **source_extra)
        fields.update(mb_per_s=run["mb_per_s"], full_reason=reason)
        point = repo.publish(pending, dict(
            snapshot=source.snapshot, source=source.identity(), bytes_read=run["bytes_read"],
            bytes_written=run["bytes_written"], zero_bytes=run["zero_bytes"], extents=run["extents"],
            seconds=run["seconds"], extra=fields), digests=digests)
        published.append(point)
        return point


def _discard(repo, source, warnings):
    """Undo this run's source side; the journal stays if that fails (the next run retries)."""
    try:
        source.discard()
    except (SnapchainError, OSError) as exc:
        warnings.append("could not remove what this run created on the source (the next run will): %s" % exc)
        return
    try:
        repo.clear_intent(source.kind)
    except OSError:
        pass


def clean_killed_run(repo, source, warnings):
    """Remove what a killed run journalled, if no point uses it; returns what was removed."""
    cleaned = []
    names = set(repo.names())
    for entry in repo.orphans():
        if entry.rsplit(".", 1)[0] > max(names or [""]):
            # a point is only ever added as the newest: a newer unreferenced layer is a killed run's
            repo.remove_file(entry)
            cleaned.append(entry)
    for kind in repo.intent_kinds():
        if kind != source.kind:
            run = "prune" if kind == "prune" else "%s backup" % kind  # the prune journal: _engine/prune.py
            warnings.append("a killed %s left its journal in %s; the next %s of this disk cleans "
                            "what it left" % (run, repo.disk_dir, run))
    record = repo.intent(source.kind)
    if record is None:
        return cleaned
    point = record.get("point")
    if point and point not in names:
        for entry in (point + LAYER_SUFFIX, point + DIGESTS_SUFFIX):
            if os.path.lexists(repo.path(entry)) and entry not in cleaned:
                repo.remove_file(entry)
                cleaned.append(entry)
    referenced = any(p.get("snapshot") == record.get("snapshot") for p in repo.points()) \
        if record.get("snapshot") else False
    what = source.remove_orphan(record, referenced)
    if what:
        cleaned.append(what)
    repo.clear_intent(source.kind)
    return cleaned
