# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Waiting for whichever of several Ansible async jobs ends first (the async_wait module's logic).

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

An async task started with ``poll: 0`` returns ``results_file``: the file its wrapper
rewrites (atomically) when the job ends.  A job is running while that file holds
``"started"`` without ``"finished"``, or cannot be parsed yet; it has ended when the
file holds the module's result, or when the file is gone (``async_status`` then reports
"could not find job", which is how the caller learns about it).  These are the rules
``ansible.builtin.async_status`` applies to the same file.
"""

from __future__ import annotations

import json
import time

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, SnapchainError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.progress import progress_line, read_progress

RUNNING = "running"
ENDED = "ended"


class WaitTimeout(SnapchainError):
    """Fewer jobs than asked for ended before the timeout."""


def job_state(results_file):
    """RUNNING or ENDED, read from an async job's results file."""
    try:
        with open(results_file, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return ENDED
    except OSError as exc:
        raise SnapchainError("cannot read the job file %s: %s" % (results_file, exc.strerror),
                             results_file=results_file)
    try:
        data = json.loads(text)
    except ValueError:
        return RUNNING  # as async_status: not written yet
    if isinstance(data, dict) and "started" in data and not data.get("finished"):
        return RUNNING
    return ENDED


def check(params):
    files = params["results_files"]
    if not files:
        raise InputError("results_files is empty: there is no job to wait for")
    if len(set(files)) != len(files):
        raise InputError("results_files names a job twice")
    if params["min_ended"] < 1:
        raise InputError("min_ended must be at least 1, not %d" % params["min_ended"])
    if params["poll_interval"] <= 0:
        raise InputError("poll_interval must be more than 0 seconds")
    if params["timeout"] < 0:
        raise InputError("timeout must be 0 (no limit) or more seconds")
    if (params.get("return_after") or 0) < 0:
        raise InputError("return_after must be 0 (wait until enough jobs ended) or more seconds")
    progress = params.get("progress_files") or []
    if progress and len(progress) != len(files):
        raise InputError("progress_files has %d entries but results_files %d: give one progress file per job, in the "
                         "same order" % (len(progress), len(files)))


def _progress(params, running):
    """The progress documents (and one line each) of the running jobs that have a progress file."""
    files = params.get("progress_files") or []
    docs, lines = [], []
    labels = params.get("labels") or []
    for i, (results_file, progress_file) in enumerate(zip(params["results_files"], files)):
        if results_file not in running or not progress_file:
            continue
        doc = read_progress(progress_file)
        if doc is None:
            continue
        label = labels[i] if i < len(labels) else None
        docs.append(dict(doc, results_file=results_file, label=label))
        lines.append(progress_line(doc, label))
    return dict(progress=docs, progress_lines=lines)


def wait(params, clock=time.monotonic, sleep=time.sleep):
    """Wait until ``min_ended`` of the jobs (all of them, if fewer) have ended.

    Returns dict(ended=[...], running=[...], waited=seconds, done=True, progress=[...],
    progress_lines=[...]), each list in the order given.  With ``return_after``, returns after that
    many seconds even when fewer jobs ended (``done`` false), so a role can print the progress and
    call it again (an include loop) instead of ``until``, which prints "FAILED - RETRYING" per poll.
    Raises WaitTimeout (with the same lists) when ``timeout`` seconds pass first.
    """
    check(params)
    files = params["results_files"]
    want = min(params["min_ended"], len(files))
    return_after = params.get("return_after") or 0
    started = clock()
    while True:
        states = [(path, job_state(path)) for path in files]
        ended = [path for path, state in states if state == ENDED]
        running = [path for path, state in states if state == RUNNING]
        waited = round(clock() - started, 3)
        done = len(ended) >= want
        if done or (return_after and waited >= return_after):
            result = dict(ended=ended, running=running, waited=waited, done=done, changed=False)
            result.update(_progress(params, running))
            return result
        if params["timeout"] and waited >= params["timeout"]:
            raise WaitTimeout("%d of %d job(s) ended within %d s; %d asked for"
                              % (len(ended), len(files), params["timeout"], want),
                              ended=ended, running=running, waited=waited)
        pause = params["poll_interval"]
        if params["timeout"]:
            pause = max(0.0, min(pause, params["timeout"] - waited))
        if return_after:
            pause = max(0.0, min(pause, return_after - waited))
        sleep(pause)
