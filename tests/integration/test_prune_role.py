"""The prune role (and playbooks/prune.yml) through ansible-playbook on local repositories: no Ceph."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from ansible_runner import ROOT, playbook

from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._repository.repository import Repository

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
NAMES = ["202601%02dT031500Z" % day for day in range(1, 7)]  # one a day; a full backup on the 4th


def build(tmp_path, disk):
    """A disk repository of six points in two segments; returns (chain, {name: sha256 of the point})."""
    chain = str(tmp_path / "repo" / "host1" / disk)
    source = tmp_path / (disk + ".raw")
    data = bytearray(2 * MiB)
    content = {}
    for i, name in enumerate(NAMES):
        data[i * 65536:(i + 1) * 65536] = os.urandom(65536)
        source.write_bytes(bytes(data))
        append_point(dict(chain=chain, source=str(source), parallel=2, point_name=name, force_full=(i == 3)))
        content[name] = hashlib.sha256(bytes(data)).hexdigest()
    return chain, content


def point_sha(chain, name, tmp_path):
    raw = tmp_path / "read.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.path.join(chain, name + ".qcow2"), str(raw)],
                   check=True, capture_output=True)
    try:
        return hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        raw.unlink()


def manifest(chain):
    with open(os.path.join(chain, "manifest.json")) as fh:
        return fh.read()


def test_role_prunes_every_disk_with_a_summary_and_fails_for_a_locked_one(tmp_path):
    first, first_content = build(tmp_path, "disk0")
    second = build(tmp_path, "disk1")[0]
    policy = dict(prune_repository=str(tmp_path / "repo"), prune_keep_daily=2)

    # check mode: the summary says what would go, nothing changes
    before = (manifest(first), manifest(second))
    proc = playbook("prune_role.yml", policy, check=True)
    assert "2 of 2 disk(s) pruned, 0 failed; 8 point(s) removed (2 merge(s) into kept points)" in proc.stdout
    assert "(check mode: nothing removed)" in proc.stdout
    assert (manifest(first), manifest(second)) == before

    # a verify reading disk1 (the shared lock): disk0 is pruned, disk1 fails, the host fails
    with Repository(second).lock(shared=True):
        proc = playbook("prune_role.yml", policy, expect_rc=2)
    assert "1 of 2 disk(s) pruned, 1 failed; 4 point(s) removed (1 merge(s) into kept points)" in proc.stdout
    lines = [line.strip(' ",') for line in proc.stdout.splitlines() if line.rstrip('",').endswith(("disk0", "disk1"))]
    assert any(line.startswith("ok ") and line.split()[1:5] == ["2", "4", "1", "0"] and line.endswith(first)
               for line in lines), lines  # kept 2 (5th, 6th), removed 1-4, the 4th merged into the 5th
    assert any(line.startswith("FAILED ") and line.endswith(second) for line in lines), lines
    assert "another run reads %s" % second in proc.stdout
    assert "1 of 2 disk(s), 0 of 0 diff set(s) and 0 of 0 ZFS dataset(s) could not be pruned" in proc.stdout
    assert Repository(first).load(verify=True).names() == NAMES[4:]
    for name in NAMES[4:]:
        assert point_sha(first, name, tmp_path) == first_content[name]

    # the shipped playbook, disk1 alone, protecting one point
    proc = playbook(os.path.join(ROOT, "playbooks", "prune.yml"),
                    dict(prune_hosts="all", prune_chains=[second], prune_keep_daily=2, prune_protected=[NAMES[0]]))
    assert "1 of 1 disk(s) pruned, 0 failed; 3 point(s) removed (1 merge(s) into kept points)" in proc.stdout
    assert Repository(second).load(verify=True).names() == [NAMES[0]] + NAMES[4:]
    assert json.loads(manifest(second))["points"][0]["name"] == NAMES[0]


def test_role_keeps_everything_without_a_rule_and_fails_clearly_without_disks(tmp_path):
    chain = build(tmp_path, "disk0")[0]
    before = manifest(chain)
    proc = playbook("prune_role.yml", dict(prune_repository=str(tmp_path / "repo")))
    assert "(no keep_* above 0: every point kept)" in proc.stdout and manifest(chain) == before
    (tmp_path / "empty").mkdir()
    proc = playbook("prune_role.yml", dict(prune_repository=str(tmp_path / "empty")), expect_rc=2)
    assert "No disk repository (a directory holding manifest.json) under %s" % (tmp_path / "empty") in proc.stdout


def test_role_prunes_sets_of_rbd_diff_files(tmp_path):
    """prune_diff_directories alone: each set pruned by rbd_diff_prune with the role's policy, a summary line
    per set; check mode removes nothing."""
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.rbd_diff import DiffWriter

    snaps = ["snapchain-2026110%dT010000Z" % d for d in range(1, 5)]
    sets = []
    for name in ("vm1-disk0", "vm2-disk0"):
        directory = tmp_path / "diffs" / name
        directory.mkdir(parents=True)
        for i, snap in enumerate(snaps):
            with open(directory / ("%d.rbdiff" % i), "wb") as f:
                writer = DiffWriter(f)
                writer.header(size=1 << 20, from_snap=snaps[i - 1] if i % 2 else None, to_snap=snap)
                writer.write(0, os.urandom(4096))
                writer.end()
        sets.append(str(directory))
    policy = dict(prune_diff_directories=sets, prune_keep_last=1, prune_repository=str(tmp_path / "none"))
    proc = playbook("prune_role.yml", policy, check=True)
    assert "%s: 2 file(s) kept, 2 removed" % sets[0] in proc.stdout and "(check mode: nothing removed)" in proc.stdout
    assert all(len(os.listdir(d)) == 4 for d in sets)
    proc = playbook("prune_role.yml", policy)
    assert "%s: 2 file(s) kept, 2 removed" % sets[1] in proc.stdout
    assert all(sorted(os.listdir(d)) == ["2.rbdiff", "3.rbdiff"] for d in sets)
