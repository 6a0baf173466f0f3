# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run summaries: one small JSON document per run (backup, verify, prune) and disk, in the repository.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

    <disk dir>/runs/<UTC start, ms>-<kind>-<run id>.json   (20261207T031500.250Z-backup-1a2b3c.json)

Written atomically (``write_json_atomic``) when the run ends, failed or not, so a report (or any
monitoring) reads what happened without the Ansible log.  The schema is
``meta/run-summary.schema.json`` (``SCHEMA``); a disk keeps its newest ``keep`` summaries (older ones
are removed when a new one is written).  A run in check mode writes none, and neither does a run that
failed before the disk directory existed (bad input: no run happened).  Writing a summary is best
effort: a failure to write it is a warning of the run, never its failure.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time
import uuid

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.files import write_json_atomic

SCHEMA = "snapchain.vmbackup/run-summary/1"
RUNS_DIR = "runs"
KINDS = ("backup", "verify", "prune")
CONSISTENCIES = ("application", "crash", "stopped")
DEFAULT_KEEP = 200
MAX_KEEP = 100000
RUN_INFO_KEYS = ("run_id", "label", "vm", "consistency", "freeze_seconds")
_NAME = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z)-(backup|verify|prune)-([A-Za-z0-9_.-]{1,64})(-\d+)?\.json$")
_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def run_summary_argument_spec():
    """Options of the modules that write run summaries (doc fragment snapchain.vmbackup.run_summary)."""
    return dict(run_info=dict(type="dict"), run_summaries_keep=dict(type="int", default=DEFAULT_KEEP))


def check_run_options(params):
    """``run_info`` and ``run_summaries_keep`` -> (info dict, keep); InputError before anything changes."""
    info = dict(params.get("run_info") or {})
    unknown = sorted(set(info) - set(RUN_INFO_KEYS))
    if unknown:
        raise InputError("run_info has unknown key(s) %s; known: %s" % (", ".join(unknown), ", ".join(RUN_INFO_KEYS)))
    if info.get("consistency") not in (None, "") + CONSISTENCIES:
        raise InputError("run_info.consistency must be one of %s, not %r"
                         % (", ".join(CONSISTENCIES), info["consistency"]))
    if info.get("freeze_seconds") not in (None, ""):
        try:
            info["freeze_seconds"] = float(info["freeze_seconds"])
        except (TypeError, ValueError):
            raise InputError("run_info.freeze_seconds must be a number of seconds, not %r" % info["freeze_seconds"])
        if info["freeze_seconds"] < 0:
            raise InputError("run_info.freeze_seconds must not be negative")
    for key in ("run_id", "label", "vm"):
        if info.get(key) is not None:
            info[key] = str(info[key])
    keep = params.get("run_summaries_keep")
    keep = DEFAULT_KEEP if keep is None else keep
    if not 0 <= keep <= MAX_KEEP:
        raise InputError("run_summaries_keep must be between 0 (write none) and %d, not %r" % (MAX_KEEP, keep))
    return info, keep


def utc_iso(when):
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def allocated_bytes(path):
    """Bytes the file system allocates to ``path`` (a file, or every file below a directory)."""
    if os.path.isfile(path):
        return os.lstat(path).st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # removed meanwhile
    return total


class RunSummary:
    """The summary of one run on one disk; ``fields`` are filled by the flow, ``write()`` at the end."""

    def __init__(self, disk_dir, kind, run_info=None, keep=DEFAULT_KEEP, dir_mode=0o700, file_mode=0o600):
        if kind not in KINDS:
            raise ValueError("unknown run kind %r" % kind)
        info = dict(run_info or {})
        self.disk_dir = os.path.abspath(disk_dir)
        self.kind = kind
        self.keep = keep
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self.started = time.time()
        self._clock = time.monotonic()
        self.run_id = _ID_BAD.sub("_", info.get("run_id") or uuid.uuid4().hex[:12])[:64]
        self.doc = dict(
            schema=SCHEMA, kind=kind, run_id=self.run_id, state="running", error=None,
            started=utc_iso(self.started), ended=None, seconds=None, host=socket.gethostname(),
            chain=self.disk_dir, label=info.get("label"), vm=info.get("vm"),
            consistency=info.get("consistency") or None, freeze_seconds=info.get("freeze_seconds"),
            point=None, parent=None, full=None, full_reason=None, size=None, bytes_read=0, bytes_written=0,
            zero_bytes=0, transfer_seconds=None, mb_per_s=None, layer_bytes=None, repository_bytes=None,
            points=None, verify=None, prune=None, warnings=[])

    def update(self, **fields):
        unknown = set(fields) - set(self.doc)
        if unknown:
            raise ValueError("not run summary fields: %s" % ", ".join(sorted(unknown)))
        self.doc.update(fields)

    def filename(self):
        # milliseconds: two runs of one second still sort in the order they started
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started)) + ".%03dZ" % (self.started % 1 * 1000)
        return "%s-%s-%s.json" % (stamp, self.kind, self.run_id)

    def finish(self, error=None, warnings=None):
        """Write the summary (state ok, or failed with ``error``); returns its path, or None when it
        was not written (keep 0, no disk directory).  Raises nothing: a warning is appended instead."""
        self.doc.update(state="failed" if error else "ok", error=error, ended=utc_iso(time.time()),
                        seconds=round(time.monotonic() - self._clock, 3))
        if self.keep == 0 or not os.path.isdir(self.disk_dir):
            return None
        try:
            self.doc["repository_bytes"] = allocated_bytes(self.disk_dir)
            runs = os.path.join(self.disk_dir, RUNS_DIR)
            if not os.path.isdir(runs):
                os.mkdir(runs, self.dir_mode)
            path = os.path.join(runs, self.filename())
            n = 2
            while os.path.exists(path):
                path = os.path.join(runs, self.filename()[:-5] + "-%d.json" % n)
                n += 1
            write_json_atomic(path, self.doc, mode=self.file_mode)
            prune_runs(self.disk_dir, self.keep)
        except Exception as exc:  # pylint: disable=broad-except
            # the run's own outcome stands; its summary is a report, not part of the backup
            if warnings is not None:
                warnings.append("the run summary of %s could not be written: %s" % (self.disk_dir, exc))
            return None
        return path


def run_files(disk_dir):
    """The summary files of a disk, oldest first (by name: the UTC start time leads)."""
    runs = os.path.join(disk_dir, RUNS_DIR)
    if not os.path.isdir(runs):
        return []
    return [os.path.join(runs, e) for e in sorted(os.listdir(runs)) if _NAME.match(e)]


def prune_runs(disk_dir, keep):
    """Remove all but the newest ``keep`` summaries of a disk; returns the removed names."""
    files = run_files(disk_dir)
    removed = []
    for path in files[:max(0, len(files) - keep)]:
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:
            pass  # another run removed it
    return removed


def load_runs(disk_dir):
    """The summaries of a disk, oldest first; an unreadable one is skipped (returned in ``bad``)."""
    import json
    docs, bad = [], []
    for path in run_files(disk_dir):
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            bad.append("%s: %s" % (path, exc))
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            bad.append("%s: not a %s document" % (path, SCHEMA))
            continue
        docs.append(doc)
    return docs, bad


def backup_fields(result, repo):
    """The summary fields of a backup's result (``_engine/backup.py``)."""
    point = result.get("point") or {}
    layer = repo.layer_path(point["name"]) if point.get("name") else None
    return dict(point=point.get("name"), parent=result.get("parent"), full=result.get("full"),
                full_reason=result.get("full_reason"), size=point.get("size"),
                bytes_read=result.get("bytes_read") or 0, bytes_written=result.get("bytes_written") or 0,
                zero_bytes=result.get("zero_bytes") or 0, transfer_seconds=result.get("seconds"),
                mb_per_s=result.get("mb_per_s"),
                layer_bytes=allocated_bytes(layer) if layer and os.path.exists(layer) else None,
                points=len(repo.names()), warnings=list(result.get("warnings") or []))


def verify_fields(result):
    """The summary fields of a verify's result (``_engine/verify.py``)."""
    return dict(bytes_read=result.get("bytes_read") or 0, transfer_seconds=result.get("seconds"),
                mb_per_s=result.get("mb_per_s"), points=len(result.get("points") or []),
                warnings=list(result.get("repository_warnings") or []),
                verify=dict(clean=bool(result.get("clean")), points_checked=result.get("points_checked") or [],
                            mismatch_count=result.get("mismatch_count") or 0,
                            structure_problems=len(result.get("structure_problems") or []),
                            errors=len(result.get("errors") or []),
                            marked_bad=[m["point"] for m in result.get("marked_bad") or []],
                            sample_percent=result.get("sample_percent"), summary=result.get("msg")))


def prune_fields(result):
    """The summary fields of a prune's result (``_engine/prune.py``)."""
    return dict(points=len(result.get("kept") or []), warnings=list(result.get("warnings") or []),
                prune=dict(kept=result.get("kept") or [], removed=result.get("removed") or [],
                           needs_merge=result.get("needs_merge") or [], bytes_freed=result.get("bytes_freed") or 0))


def error_text(exc):
    """The message of a failed run's exception, as fail_json would show it."""
    return getattr(exc, "msg", None) or str(exc) or type(exc).__name__
