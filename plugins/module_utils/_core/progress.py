# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one progress file of long runs (restores, diff replays, backups): ``progress_file``.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

A module run with ``async`` rewrites a small JSON document atomically every few seconds; a role
polling the job (``async_wait`` with ``progress_files``) reads it and prints one line per poll.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import threading
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError

PROGRESS_INTERVAL = 2.0
# Phases during which the data moves: the rate is measured from the first of them.
TRANSFER_PHASES = ("writing", "copying")


def iso(when):
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_progress(path):
    """The document of a progress file, or None when it is missing or not written yet."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _size(nbytes):
    value = float(nbytes or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024.0
    return "%d B" % nbytes  # not reached


def progress_line(doc, label=None):
    """One line for a job log: ``label: copying 40% (820.0 MiB of 2.0 GiB), 105.3 MB/s, ETA 12 s``."""
    what = label or doc.get("destination") or doc.get("source") or "job"
    line = "%s: %s" % (what, doc.get("phase") or doc.get("state"))
    total = doc.get("bytes_total")
    if total:
        line += " %.0f%% (%s of %s)" % (doc.get("percent") or 0.0, _size(doc.get("bytes_done")), _size(total))
    elif doc.get("bytes_done"):
        line += " %s" % _size(doc["bytes_done"])
    if doc.get("rate_bytes_per_s") is not None:
        line += ", %.1f MB/s" % (doc["rate_bytes_per_s"] / 1e6)
    if doc.get("eta_seconds") is not None and doc.get("state") == "running":
        line += ", ETA %d s" % doc["eta_seconds"]
    line += ", %s s elapsed" % doc.get("elapsed_seconds")
    return line


def check_progress_file(path, *others):
    """A ``progress_file`` option: its directory must exist, it must not be a directory nor one of
    ``others`` (the file a run writes); InputError before anything changes."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError("the directory of progress_file %s does not exist; create it or choose another path" % path)
    if os.path.isdir(path):
        raise InputError("progress_file %s is a directory: give the path of a file, e.g. %s"
                         % (path, os.path.join(path, "progress.json")))
    for other in others:
        if other and os.path.abspath(path) == os.path.abspath(other):
            raise InputError("progress_file is %s, the file this run writes: give the progress file another path"
                             % path)


class Progress:
    """Rewrites a small JSON file atomically every ``interval`` seconds while a long run goes on.

    ``{"state": "running|done|failed", "phase": ..., "bytes_done": N, "bytes_total": N,
    "percent": P, "rate_bytes_per_s": R, "eta_seconds": E, ...}``; ``bytes_*`` count the
    data to copy (what takes the time); ``zero_bytes_*`` the ranges written as zeroes.
    Without a path every call is a no-op.
    """

    def __init__(self, path, interval=PROGRESS_INTERVAL, **static):
        self.path = path
        self.interval = interval
        self.static = static
        self.lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.state = "running"
        self.phase = "starting"
        self.bytes_done = 0
        self.bytes_total = None
        self.zero_done = 0
        self.zero_total = 0
        self.message = None
        self.started = time.time()
        self.transfer_started = None
        self.samples = collections.deque()
        self._stop = threading.Event()
        self._thread = None
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise InputError("the directory of progress_file %s does not exist" % path)

    def __enter__(self):
        if self.path:
            self.write()
            self._thread = threading.Thread(target=self._run, name="snapchain-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close("done")
        else:
            self.close("failed", getattr(exc, "msg", None) or str(exc) or exc_type.__name__)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError:
                pass  # progress is best effort; the restore goes on

    def set_phase(self, phase, bytes_total=None, zero_total=None):
        with self.lock:
            self.phase = phase
            if bytes_total is not None:
                self.bytes_total = bytes_total
            if zero_total is not None:
                self.zero_total = zero_total
            if phase in TRANSFER_PHASES and self.transfer_started is None:
                self.transfer_started = time.time()
        if self._thread is not None:
            try:
                self.write()  # a new phase shows at once (its total), not at the next tick
            except OSError:
                pass  # progress is best effort; the run goes on

    def update(self, bytes_done=None, zero_done=None):
        with self.lock:
            if bytes_done is not None:
                self.bytes_done = bytes_done
            if zero_done is not None:
                self.zero_done = zero_done

    def snapshot(self, now=None):
        """The document as it would be written now (also used by the tests)."""
        now = time.time() if now is None else now
        with self.lock:
            done, total_ = self.bytes_done, self.bytes_total
            self.samples.append((now, done))
            while len(self.samples) > 2 and now - self.samples[0][0] > 10.0:
                self.samples.popleft()
            first_t, first_done = self.samples[0]
            rate = None
            if now - first_t >= 0.5:
                rate = (done - first_done) / (now - first_t)
            elif self.transfer_started and now > self.transfer_started:
                rate = done / (now - self.transfer_started)
            eta = None
            if self.state == "done":
                eta = 0
            elif rate and total_ is not None:
                eta = int(round(max(total_ - done, 0) / rate))
            doc = dict(self.static)
            doc.update(
                state=self.state, phase=self.phase, message=self.message,
                bytes_done=done, bytes_total=total_,
                percent=round(100.0 * done / total_, 1) if total_ else (100.0 if self.state == "done" else 0.0),
                zero_bytes_done=self.zero_done, zero_bytes_total=self.zero_total,
                rate_bytes_per_s=int(rate) if rate is not None else None, eta_seconds=eta,
                elapsed_seconds=round(now - self.started, 1), pid=os.getpid(),
                started=iso(datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)),
                updated=iso(datetime.datetime.fromtimestamp(now, datetime.timezone.utc)))
        return doc

    def write(self):
        if not self.path:
            return
        data = (json.dumps(self.snapshot(), sort_keys=True) + "\n").encode("utf-8")
        temp = "%s.%d.tmp" % (self.path, os.getpid())
        with self._write_lock:  # the ticking thread and set_phase share the temporary name
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(temp, self.path)

    def close(self, state, message=None):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:
            self.state = state
            self.message = message
            if state == "done":
                self.phase = "done"
                if self.bytes_total is not None:
                    self.bytes_done = self.bytes_total
        try:
            self.write()
        except OSError:
            pass
