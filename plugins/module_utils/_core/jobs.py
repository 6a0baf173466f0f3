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


def wait(params, clock=time.monotonic, sleep=time.sleep):
    """Wait until ``min_ended`` of the jobs (all of them, if fewer) have ended.

    Returns dict(ended=[...], running=[...], waited=seconds), each list in the order given.
    Raises WaitTimeout (with the same lists) when ``timeout`` seconds pass first.
    """
    check(params)
    files = params["results_files"]
    want = min(params["min_ended"], len(files))
    started = clock()
    while True:
        states = [(path, job_state(path)) for path in files]
        ended = [path for path, state in states if state == ENDED]
        running = [path for path, state in states if state == RUNNING]
        waited = round(clock() - started, 3)
        if len(ended) >= want:
            return dict(ended=ended, running=running, waited=waited, changed=False)
        if params["timeout"] and waited >= params["timeout"]:
            raise WaitTimeout("%d of %d job(s) ended within %d s; %d asked for"
                              % (len(ended), len(files), params["timeout"], want),
                              ended=ended, running=running, waited=waited)
        pause = params["poll_interval"]
        if params["timeout"]:
            pause = max(0.0, min(pause, params["timeout"] - waited))
        sleep(pause)
