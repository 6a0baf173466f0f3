"""virsh_freeze against real TCG guests (tests/lab/guest.py): the QEMU guest agent's own
guest-fsfreeze-status, libvirt's domain state and the serial console are the evidence.

The safety deadline is tested the hard way: the play is SIGKILLed (its whole process group)
between freeze and thaw, and the watchdog must release the guest on time by itself.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import module_runner
from ansible_runner import PLAYBOOKS, ROOT, playbook
from guest_fixtures import pid_alive, reset_guest
# Fixtures, found by pytest under these names:

KILL_DEADLINE = 8  # max_frozen_seconds of the killed play: the freeze task must finish well within it
SLACK = 10.0  # how late the watchdog may act on a loaded 2-core host


@pytest.fixture(autouse=True)
def _released(request):
    """Every test starts and ends with its guests running, thawed and without a record."""
    used = [(name, name == "guest") for name in ("guest", "guest_noagent") if name in request.fixturenames]
    for name, agent in used:
        reset_guest(request.getfixturevalue(name), agent=agent)
    yield
    for name, agent in used:
        reset_guest(request.getfixturevalue(name), agent=agent)


def freeze(g, check_mode=False, expect_failed=False, **args):
    args.setdefault("domain", g.name)
    return module_runner.run("virsh_freeze", args, check_mode=check_mode, expect_failed=expect_failed, timeout=120)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


def test_freeze_thaw_through_the_agent_playbook(guest):
    playbook("freeze_agent.yml", dict(guest_domain=guest.name))
    assert guest.fsfreeze_status() == "thawed"
    assert guest.record() is None


def test_freeze_only_listed_mountpoints(guest):
    frozen = freeze(guest, state="frozen", mode="agent", mountpoints=["/mnt"])
    assert frozen["changed"] and frozen["filesystems_frozen"] == 1
    assert guest.fsfreeze_status() == "frozen"
    record = guest.record()
    assert record["mountpoints"] == ["/mnt"] and record["froze_fs"] and not record["paused"]
    thawed = freeze(guest, state="thawed")
    assert thawed["changed"] and thawed["actions"][0] == "fsthaw"
    assert guest.fsfreeze_status() == "thawed"


def test_agent_error_fails_cleanly_and_leaves_guest_thawed(guest):
    result = freeze(guest, expect_failed=True, state="frozen", mode="agent", mountpoints=["/no/such/mount"])
    assert "froze 0 of the 1 mountpoints /no/such/mount" in result["msg"] and guest.name in result["msg"]
    assert guest.fsfreeze_status() == "thawed"
    assert guest.state() == "running"
    assert guest.record() is None


def test_suspend_resume_by_uuid(guest):
    started = time.monotonic()
    check = freeze(guest, check_mode=True, domain=guest.uuid, state="suspended")
    assert check["changed"] and check["mode_used"] == "suspend"
    assert guest.state() == "running"
    paused = freeze(guest, domain=guest.uuid, state="suspended")
    # The module returned although its watchdog (60 s deadline) lives on: nothing of
    # Ansible's (stdout pipe, process group, session) is held by the watchdog.
    assert time.monotonic() - started < 45
    wd = paused["watchdog"]
    assert pid_alive(wd["pid"])
    assert paused["changed"] and paused["actions"] == ["suspend"] and paused["consistency"] == "crash"
    assert guest.state() == "paused"
    again = freeze(guest, domain=guest.uuid, state="suspended")
    assert not again["changed"] and again["watchdog"]["pid"] == wd["pid"]
    resume_check = freeze(guest, check_mode=True, domain=guest.uuid, state="running")
    assert resume_check["changed"] and guest.state() == "paused"
    resumed = freeze(guest, domain=guest.uuid, state="running")
    assert resumed["changed"] and resumed["actions"] == ["resume", "cancel-watchdog"]
    assert resumed["frozen_ms"] >= 0 and resumed["frozen_at"] == paused["frozen_at"]
    assert guest.state() == "running"
    wait_for(lambda: not pid_alive(wd["pid"]), 5, "the cancelled watchdog to exit")
    assert not freeze(guest, domain=guest.uuid, state="running")["changed"]


def test_sync_suspend_sends_sysrq_sync(guest):
    before = guest.serial().count("Emergency Sync")
    paused = freeze(guest, state="suspended", mode="sync_suspend")
    assert paused["actions"] == ["sysrq-sync", "suspend"]
    assert guest.state() == "paused"
    assert freeze(guest, state="thawed")["changed"]
    assert guest.state() == "running"
    # The guest kernel saw Alt+SysRq+S (normally before the pause; on a very loaded host TCG may
    # only get to it after the resume, hence the wait).
    wait_for(lambda: guest.serial().count("Emergency Sync") > before, 15, "sysrq: Emergency Sync on the console")


def test_paused_vm_stays_paused(guest):
    guest.dom.suspend()  # paused by someone else
    for state, mode in (("suspended", "suspend"), ("frozen", "auto"), ("frozen", "sync_suspend")):
        result = freeze(guest, state=state, mode=mode)
        assert not result["changed"] and result["already_paused"], result
        assert result["consistency"] == "crash"
    assert guest.record() is None
    for state in ("running", "thawed"):
        result = freeze(guest, state=state)
        assert not result["changed"] and result["already_paused"]
    assert guest.state() == "paused"


def test_release_cancels_the_watchdog(guest):
    frozen = freeze(guest, state="frozen", mode="suspend", max_frozen_seconds=3)
    pid = frozen["watchdog"]["pid"]
    freeze(guest, state="running")
    wait_for(lambda: not pid_alive(pid), 5, "the cancelled watchdog to exit")
    guest.dom.suspend()  # someone else pauses it after our release: not the watchdog's business
    time.sleep(4)
    assert guest.state() == "paused"


def test_auto_falls_back_to_suspend_without_agent(guest_noagent):
    g = guest_noagent
    result = freeze(g, state="frozen", mode="auto")
    assert result["changed"] and result["mode_used"] == "suspend" and result["consistency"] == "crash"
    assert "agent" in result["fallback_reason"]
    assert g.state() == "paused"
    assert not freeze(g, state="frozen", mode="auto")["changed"]
    released = freeze(g, state="thawed")
    assert released["changed"] and released["mode_used"] == "suspend"
    assert g.state() == "running"


def test_agent_mode_without_agent(guest_noagent):
    g = guest_noagent
    failed = freeze(g, expect_failed=True, state="frozen", mode="agent")
    assert "agent" in failed["msg"] and g.name in failed["msg"]
    assert g.state() == "running" and g.record() is None
    carried_on = freeze(g, state="frozen", mode="agent", on_failure="continue")
    assert not carried_on["changed"] and carried_on["consistency"] == "crash"
    assert "agent" in carried_on["failure"] and carried_on["warnings"]
    assert g.state() == "running" and g.record() is None


def test_bad_input_is_refused(guest):
    result = freeze(guest, expect_failed=True, domain="snaptest-no-such-domain")
    assert "does not exist" in result["msg"]
    result = freeze(guest, expect_failed=True, state="suspended", mode="agent")
    assert "mode must be suspend or sync_suspend" in result["msg"]
    result = freeze(guest, expect_failed=True, mode="suspend", mountpoints=["/mnt"])
    assert "mountpoints only applies" in result["msg"]
    result = freeze(guest, expect_failed=True, max_frozen_seconds=0)
    assert "max_frozen_seconds" in result["msg"]
    assert guest.state() == "running" and guest.fsfreeze_status() == "thawed"


def _start_play(extra_vars):
    """ansible-playbook in its own process group, like ansible_runner.playbook() but killable."""
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", "localhost,", "-c", "local",
            "-e", "ansible_python_interpreter=%s" % sys.executable, "-e", json.dumps(extra_vars),
            os.path.join(PLAYBOOKS, "freeze_killed.yml")]
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, "build", "collections"),
               ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="0", ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=os.path.join(ROOT, "build", "ansible-tmp"))
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("mode", ["agent", "suspend"])
def test_killed_play_is_released_by_the_deadline(guest, mode):
    proc = _start_play(dict(guest_domain=guest.name, guest_state="frozen", guest_mode=mode,
                            guest_deadline=KILL_DEADLINE))
    try:
        record = wait_for(lambda: (guest.record() or {}).get("actions") and guest.record(), 120,
                          "the freeze task to quiesce the guest")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # controller, its workers and any module they run
        out = proc.communicate()[0]
    killed_at = time.time()
    assert proc.returncode == -signal.SIGKILL, out

    def quiesced():
        return guest.fsfreeze_status() == "frozen" if mode == "agent" else guest.state() == "paused"

    assert quiesced(), "released before the deadline (killed %.1fs after the freeze)\n%s" % (
        killed_at - record["frozen_ts"], out)
    assert pid_alive(record["watchdog"]["pid"], record["watchdog"]["start_time"])
    wait_for(lambda: not quiesced(), KILL_DEADLINE + SLACK, "the watchdog to release the guest")
    released_at = time.time()
    assert released_at - record["frozen_ts"] >= KILL_DEADLINE - 0.5
    assert released_at - record["frozen_ts"] <= KILL_DEADLINE + SLACK
    assert guest.state() == "running"
    wait_for(lambda: not pid_alive(record["watchdog"]["pid"], record["watchdog"]["start_time"]), 5,
             "the watchdog to exit")
    assert guest.record() is None
    with open(guest.record_path(".expired.json")) as fh:
        expired = json.load(fh)
    assert expired["actions"] == (["fsthaw"] if mode == "agent" else ["resume"])
    print("\nwatchdog released the %s freeze %.2fs after it started (max_frozen_seconds=%d), play killed after %.2fs"
          % (mode, expired["released_ts"] - expired["frozen_ts"], KILL_DEADLINE, killed_at - record["frozen_ts"]))
    # The next release reports it, changes nothing, and clears the marker.
    late = freeze(guest, state="thawed")
    assert late["expired"] and not late["changed"] and late["warnings"]
    assert late["frozen_ms"] >= KILL_DEADLINE * 1000 - 500
    assert not os.path.exists(guest.record_path(".expired.json"))
