import json
import os
import threading

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.jobs import (
    ENDED, RUNNING, WaitTimeout, job_state, wait)

STARTED = {"started": 1, "finished": 0, "ansible_job_id": "j1.2"}  # what async_wrapper writes first


def job(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def params(files, **kw):
    out = dict(results_files=files, min_ended=1, timeout=0, poll_interval=0.01)
    out.update(kw)
    return out


@pytest.mark.parametrize("content, state", [
    (STARTED, RUNNING),
    ({"started": 1}, RUNNING),
    ("", RUNNING),                                   # not written yet: running, as async_status says
    ('{"started": 1, "fini', RUNNING),
    ({"changed": True, "rc": 0}, ENDED),             # the module's result replaced the file
    ({"failed": True, "msg": "timed out", "finished": 1, "started": 1}, ENDED),
    (None, ENDED),                                   # gone: async_status reports "could not find job"
])
def test_job_state_follows_async_status(tmp_path, content, state):
    assert job_state(job(tmp_path, "j1.2", content)) == state


def test_returns_as_soon_as_any_job_ends_not_the_oldest(tmp_path):
    oldest = job(tmp_path, "a", STARTED)
    middle = job(tmp_path, "b", STARTED)
    newest = job(tmp_path, "c", STARTED)

    def finish():
        tmp = newest + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"changed": False}, fh)
        os.rename(tmp, newest)  # the way async_wrapper replaces the file

    timer = threading.Timer(0.2, finish)
    timer.start()
    try:
        result = wait(params([oldest, middle, newest], timeout=30))
    finally:
        timer.cancel()
    assert result["ended"] == [newest] and result["running"] == [oldest, middle]
    assert 0.1 < result["waited"] < 30 and result["changed"] is False


def test_min_ended_counts_and_is_capped_at_the_jobs_given(tmp_path):
    done = [job(tmp_path, "d%d" % n, {"rc": 0}) for n in range(2)]
    running = job(tmp_path, "r", STARTED)
    result = wait(params([running] + done, min_ended=2))
    assert result["ended"] == done and result["running"] == [running] and result["waited"] < 1
    assert wait(params(done, min_ended=5))["ended"] == done  # asks for more than there are: all of them


def test_timeout_names_what_still_runs(tmp_path):
    running = job(tmp_path, "r", STARTED)
    done = job(tmp_path, "d", {"rc": 0})
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(WaitTimeout) as err:
        wait(params([running, done], min_ended=2, timeout=5, poll_interval=2), clock=lambda: now[0], sleep=sleep)
    assert "1 of 2 job(s) ended within 5 s; 2 asked for" in err.value.msg
    assert err.value.details["running"] == [running] and err.value.details["ended"] == [done]
    assert sleeps == [2, 2, 1]  # the last pause stops at the timeout


@pytest.mark.parametrize("bad, message", [
    (dict(results_files=[]), "results_files is empty"),
    (dict(results_files=["/x", "/x"]), "names a job twice"),
    (dict(min_ended=0), "min_ended must be at least 1"),
    (dict(poll_interval=0), "poll_interval must be more than 0"),
    (dict(timeout=-1), "timeout must be 0"),
])
def test_bad_input(tmp_path, bad, message):
    given = params([job(tmp_path, "a", STARTED)])
    given.update(bad)
    with pytest.raises(InputError, match=message):
        wait(given)
