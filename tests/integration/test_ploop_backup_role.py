"""The ploop_backup role through playbooks/ploop_backup.yml, with the real ``ploop`` 1.15 and QEMU.

Containers are real, unmounted ploop disks holding ext4 (tests/ploop_fixtures.py) in a private area
of the test's own; writes between runs go through ``qemu-io -f parallels`` into the top delta.
What is NOT run here: a mounted disk of a running container (this host has no ploop kernel module).
Its command sequence is the same as an unmounted one's, because we never mount, never use
``ploop snapshot -d <device>`` and only talk to ploop through ``DiskDescriptor.xml``: the last test
records the exact commands with a STAND-IN (labelled there) and checks that nothing but frozen
images is ever read, which is what makes the same sequence safe while the kernel writes the top delta.
"""

import json
import os
import shutil
import sys

import pytest

import module_runner
import ploop_fixtures as pf
from ansible_runner import ROOT, playbook

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop

MiB = pf.MiB
SIZE = 32 * MiB
PLAYBOOK = os.path.join(ROOT, "playbooks", "ploop_backup.yml")

pytestmark = pytest.mark.skipif(shutil.which("ploop") is None or shutil.which("qemu-io") is None,
                                reason="needs ploop and qemu-io (snaplab.py install)")


@pytest.fixture
def area(tmp_path):
    """A private area with containers 101, 102 and 900, a config for 101, a repository and an inventory."""
    root, conf = tmp_path / "private", tmp_path / "conf"
    conf.mkdir()
    dds = {ctid: pf.make_ext4_disk(root / ctid / "root.hdd", tmp_path, size=SIZE, hostname="ct" + ctid)
           for ctid in ("101", "102", "900")}
    (conf / "101.conf").write_text('HOSTNAME="ct101"\n')
    (tmp_path / "repo").mkdir()
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"ploop_backup": {"hosts": {"ovz1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    return dict(root=str(root), conf=str(conf), repo=str(tmp_path / "repo"), dds=dds, inventory=str(inventory))


def run_role(area, check=False, expect_rc=0, env=None, **extra):
    variables = dict(ploop_backup_root=area["root"], ploop_backup_conf_dir=area["conf"],
                     ploop_backup_repository=area["repo"], ploop_backup_parallel_reads=2)
    variables.update(extra)
    return playbook(PLAYBOOK, variables, check=check, expect_rc=expect_rc, env=env, inventory=area["inventory"])


def summary(proc):
    """The lines of the role's Summary task (the debug msg list)."""
    text = proc.stdout[proc.stdout.index("TASK [snapchain.vmbackup.ploop_backup : Summary]"):]
    body = text[text.index('"msg": [') + len('"msg": '):]
    return json.JSONDecoder().raw_decode(body)[0]


def points(area, ctid):
    with open(os.path.join(area["repo"], "ovz1", "ploop", ctid, "manifest.json")) as f:
        return [p["name"] for p in json.load(f)["points"]]


def point_sha(area, ctid, name):
    return pf.sha256_of_stack(os.path.join(area["repo"], "ovz1", "ploop", ctid, name + ".qcow2"), fmt="qcow2")


def test_discovered_containers_full_then_incremental_every_point_restores(area):
    dds = area["dds"]
    before = {ctid: pf.tree_state(os.path.dirname(dd)) for ctid, dd in dds.items()}
    plan = run_role(area, check=True, ploop_backup_discover=True, ploop_backup_exclude=["9??"])
    lines = summary(plan)
    assert lines[0].startswith("2 of 2 container backup(s) done, 0 failed"), lines
    assert lines[1].startswith("CT 101: full (") and "[check mode: nothing written]" in lines[1], lines
    assert {ctid: pf.tree_state(os.path.dirname(dd)) for ctid, dd in dds.items()} == before
    assert os.listdir(area["repo"]) == []

    shas = {ctid: pf.disk_sha(dd) for ctid, dd in dds.items()}
    first = run_role(area, ploop_backup_discover=True, ploop_backup_exclude=["9??"])
    lines = summary(first)
    assert lines[0].startswith("2 of 2 container backup(s) done, 0 failed"), lines
    assert lines[1].startswith("CT 101: full (first backup of this disk)") and lines[2].startswith("CT 102: full ("), lines
    for ctid in ("101", "102"):
        (name,) = points(area, ctid)
        assert point_sha(area, ctid, name) == shas[ctid]
        assert len(pf.ours(dds[ctid])) == 1  # one snapshot of ours stays per container: the next base
    with open(os.path.join(area["repo"], "ovz1", "ploop", "101", "manifest.json")) as f:
        assert json.load(f)["points"][0]["extra"]["ploop"]["config_text"] == 'HOSTNAME="ct101"\n'
    assert pf.tree_state(os.path.dirname(dds["900"])) == before["900"]  # excluded: untouched
    assert not os.path.exists(os.path.join(area["repo"], "ovz1", "ploop", "900"))

    pf.write(pf.top_file(dds["101"]), 0x5a, 8 * MiB, 2 * MiB)
    shas["101"] = pf.disk_sha(dds["101"])
    second = run_role(area, ploop_backup_discover=True, ploop_backup_exclude=["9??"])
    lines = summary(second)
    assert "CT 101: incremental from %s, read 2.0 MiB" % points(area, "101")[0] in lines[1], lines
    assert "CT 102: incremental from %s, read 0.0 MiB" % points(area, "102")[0] in lines[2], lines
    assert "FAILED - RETRYING" not in second.stdout
    for ctid in ("101", "102"):
        assert len(points(area, ctid)) == 2 and len(pf.ours(dds[ctid])) == 1
        assert point_sha(area, ctid, points(area, ctid)[-1]) == shas[ctid]
        stack = [r["uuid"] for r in ploop.snapshot_list(dds[ctid])]
        assert stack == pf.ours(dds[ctid]) + [ploop.TOP_GUID]  # the older snapshot was folded away


def test_a_broken_container_fails_alone_and_the_host_fails_at_the_end(area):
    """102's image file is gone: its backup fails with the reason, 101 is still backed up (named
    containers, no discovery), the summary names both, and the play fails."""
    dds = area["dds"]
    os.unlink(pf.top_file(dds["102"]))
    proc = run_role(area, expect_rc=2, ploop_backup_containers=[{"ctid": "101"}, {"ctid": "102"}])
    lines = summary(proc)
    assert lines[0].startswith("1 of 2 container backup(s) done, 1 failed"), lines
    assert lines[1].startswith("CT 101: full (first backup of this disk)"), lines
    assert lines[2].startswith("CT 102: FAILED: ") and "root.hdd" in lines[2], lines
    assert "1 container backup(s) failed on ovz1: CT 102 (" in proc.stdout
    assert len(points(area, "101")) == 1
    assert not os.path.exists(os.path.join(os.path.dirname(dds["102"]), ".snapchain-ploop.json"))


def test_bad_settings_are_refused_before_anything_runs(area):
    proc = run_role(area, expect_rc=2)
    assert "Nothing to back up on ovz1" in proc.stdout
    proc = run_role(area, expect_rc=2, ploop_backup_containers=[{"ctid": "../etc"}])
    assert "every entry needs a ctid that is one directory name" in proc.stdout
    proc = run_role(area, expect_rc=2, ploop_backup_discover=True, ploop_backup_repository=area["repo"] + "/absent")
    assert "does not exist or is not a directory" in proc.stdout
    assert os.listdir(area["repo"]) == [] and not any(
        os.path.exists(os.path.join(os.path.dirname(dd), ".snapchain-ploop.json")) for dd in area["dds"].values())


def test_a_temporary_snapshot_a_killed_run_left_is_merged_by_the_next_role_run(area):
    """The seed's "snapshot, copy, merge back" with ploop_snapshot temporary=true, killed before the merge:
    the next snapshot is refused with a message naming the role; the role's run merges it away (data
    kept) and the seed flow works again.  A non-temporary snapshot of ours ("nightly") stays."""
    dd, root = area["dds"]["101"], area["root"]
    nightly = module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, name="nightly"))["uuid"]
    pf.write(pf.top_file(dd), 0x11, 0, MiB)
    left = module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, name="seed-copy", temporary=True))["uuid"]
    pf.write(pf.top_file(dd), 0x12, 4 * MiB, MiB)
    sha = pf.disk_sha(dd)
    refused = module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, name="seed-copy-2", temporary=True),
                                expect_failed=True)
    assert "unmerged temporary snapshot" in refused["msg"] and "ploop backup role" in refused["msg"]
    lines = summary(run_role(area, ploop_backup_containers=[{"ctid": "101"}]))
    assert lines[1].startswith("CT 101: full ("), lines
    stack = [r["uuid"] for r in ploop.snapshot_list(dd)]
    assert left not in stack and nightly in stack and len(stack) == 3, stack
    assert pf.disk_sha(dd) == sha and point_sha(area, "101", points(area, "101")[0]) == sha
    module_runner.run("ploop_snapshot", dict(descriptor=dd, root=root, name="seed-copy-2", temporary=True))


def test_the_role_prunes_what_it_backed_up_with_its_policy(area):
    """ploop_backup_prune with keep_last 1: after the second run the first point is merged out of the chain,
    the kept one reads exactly the disk, and a policy that keeps nothing in particular is refused up front."""
    dd = area["dds"]["101"]
    named = dict(ploop_backup_containers=[{"ctid": "101"}])
    proc = run_role(area, expect_rc=2, ploop_backup_prune=True, ploop_backup_prune_policy={"keep_last": 0}, **named)
    assert "keeps nothing in particular" in proc.stdout and os.listdir(area["repo"]) == []
    run_role(area, ploop_backup_prune=True, ploop_backup_prune_policy={"keep_last": 1}, **named)
    pf.write(pf.top_file(dd), 0x66, 3 * MiB, MiB)
    sha = pf.disk_sha(dd)
    proc = run_role(area, ploop_backup_prune=True, ploop_backup_prune_policy={"keep_last": 1}, **named)
    assert "1 of 1 disk(s) pruned, 0 failed; 1 point(s) removed" in proc.stdout, proc.stdout
    (kept,) = points(area, "101")
    assert point_sha(area, "101", kept) == sha


RECORDER = """#!/usr/bin/python3
# STAND-IN (a recorder, not a mock of behaviour): logs its argv, then runs the real %(tool)s.
import json, os, sys
with open(%(log)r, "a") as f:
    f.write(json.dumps([%(tool)r] + sys.argv[1:]) + "\\n")
os.execv(%(real)r, [%(real)r] + sys.argv[1:])
"""


def test_mounted_container_command_sequence_recorded_by_a_stand_in(area, tmp_path):
    """STAND-IN: ``ploop``, ``qemu-img`` and ``qemu-nbd`` are wrapped by recorders (first on PATH)
    that log every argv and run the real tool.  For a mounted container ploop itself talks to the
    kernel, so what we send is what matters: exactly one ``snapshot -u NEW`` on the descriptor and,
    after the point is published, one ``snapshot-delete -u OLD``; never the ``-d <device>`` form, a
    mount, a merge of a snapshot not ours; and QEMU only ever opens frozen images, never the top
    delta the running container writes to."""
    dd = area["dds"]["101"]
    run_role(area, ploop_backup_containers=[{"ctid": "101"}])
    (old,) = pf.ours(dd)
    pf.write(pf.top_file(dd), 0x33, 0, MiB)
    bindir, log = tmp_path / "recorders", tmp_path / "commands.jsonl"
    bindir.mkdir()
    for tool in ("ploop", "qemu-img", "qemu-nbd"):
        (bindir / tool).write_text(RECORDER % dict(tool=tool, log=str(log), real=shutil.which(tool)))
        (bindir / tool).chmod(0o755)
    run_role(area, ploop_backup_containers=[{"ctid": "101"}],
             env={"PATH": "%s:%s" % (bindir, os.environ["PATH"])})
    (new,) = pf.ours(dd)
    live = pf.top_file(dd)  # the delta the container would be writing to now
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    changing = [c for c in commands if c[0] == "ploop" and c[1] != "snapshot-list"]
    assert changing == [["ploop", "snapshot", "-u", new, dd], ["ploop", "snapshot-delete", "-u", old, dd]], commands
    assert all(c[1] == "snapshot-list" and c[-1] == dd for c in commands if c[0] == "ploop" and c not in changing)
    flat = [arg for c in commands for arg in c]
    assert "-d" not in flat and not any(a.startswith("/dev/") for a in flat), commands
    qemu = [c for c in commands if c[0] != "ploop"]
    assert qemu and not any(live in arg for c in qemu for arg in c), (live, qemu)
    assert all(not a.startswith("mount") for a in flat)
