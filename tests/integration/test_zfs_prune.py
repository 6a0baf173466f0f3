"""The keep-* policy over our ZFS snapshots (issue 13: the seed-004 repository kind's points), in the lab VM.

Real OpenZFS 2.1: a filesystem dataset with a file rewritten between snapshots (so each holds blocks
of its own), our managed snapshots dated over four days, a snapshot of somebody else's and one of ours
held by our tag.  zfs_snapshot with a policy, check and diff mode first, then for real, then again;
then the prune role with prune_zfs_datasets.  Every assert on state reads `zfs list` / `zfs holds`
in the VM.
"""

import json

import pytest

from test_zfs_snapshot import _destroy, holds, snapshots

DAYS = ["snapchain-202612%02dT%02d0000Z" % (day, hour) for day in (1, 2, 3, 4) for hour in (3, 15)]


@pytest.fixture
def dataset(labvm, request):
    name = "labzpool/prune-" + request.node.name.replace("test_", "")[:30].replace("_", "-")
    labvm.ssh(["zfs", "create", "-o", "mountpoint=/var/lib/labvm/" + name.split("/")[1], name])
    mnt = "/var/lib/labvm/" + name.split("/")[1]
    for snap in DAYS[:4] + ["manual"] + DAYS[4:]:
        labvm.sh("dd if=/dev/urandom of=%s/disk.raw bs=1M count=2 conv=notrunc status=none && sync" % mnt)
        labvm.ssh(["zfs", "snapshot", "%s@%s" % (name, snap)])
    labvm.ssh(["zfs", "hold", "snapchain", "%s@%s" % (name, DAYS[0])])
    yield name
    _destroy(labvm, name)


def names(labvm, dataset):
    return [s.split("@", 1)[1] for s in snapshots(labvm, dataset)]


def test_policy_check_diff_real_then_nothing(labvm, dataset):
    policy = dict(dataset=dataset, state="absent", keep_last=1, keep_daily=2, protected=[DAYS[1]])
    before = names(labvm, dataset)
    checked = labvm.module("zfs_snapshot", policy, check=True, diff=True)
    assert checked["changed"] and names(labvm, dataset) == before
    decided = dict((d["name"], d["action"]) for d in checked["decisions"])
    assert sorted(decided) == sorted(DAYS) and "manual" not in decided
    kept = sorted(n for n, a in decided.items() if a == "keep")
    # keep_last: 4th 15:00; keep_daily 2: the 3rd's and 2nd's newest; protected: the 1st 15:00
    assert kept == sorted([DAYS[7], DAYS[5], DAYS[3], DAYS[1]]), checked["decisions"]
    assert checked["bytes_freed"] > 0
    assert any("remove" in line for line in checked["diff"]["after"]["policy"])

    done = labvm.module("zfs_snapshot", policy)
    assert done["changed"] and sorted(done["destroyed"]) == sorted("%s@%s" % (dataset, n) for n in decided
                                                                   if decided[n] == "remove")
    assert names(labvm, dataset) == [n for n in before if n == "manual" or decided.get(n) == "keep"]
    assert "%s@%s" % (dataset, DAYS[0]) in done["released"]  # our hold went with it
    assert done["bytes_freed"] == checked["bytes_freed"]
    for snap in snapshots(labvm, dataset):
        assert holds(labvm, snap) == []
    again = labvm.module("zfs_snapshot", policy)
    assert not again["changed"] and again["destroyed"] == [] and again["bytes_freed"] == 0


def test_a_foreign_hold_refuses_the_prune_before_anything_is_destroyed(labvm, dataset):
    labvm.ssh(["zfs", "hold", "zrepl", "%s@%s" % (dataset, DAYS[2])])
    try:
        before = names(labvm, dataset)
        failed = labvm.module("zfs_snapshot", dict(dataset=dataset, state="absent", keep_last=1), expect_failed=True)
        assert "is held by zrepl" in failed["msg"] and names(labvm, dataset) == before
    finally:
        labvm.ssh(["zfs", "release", "zrepl", "%s@%s" % (dataset, DAYS[2])])


def test_the_prune_role_applies_the_policy_to_zfs_datasets(labvm, dataset):
    tasks = [dict(name="prune", **{"ansible.builtin.include_role": dict(name="snapchain.vmbackup.prune")},
                  vars=dict(prune_zfs_datasets=[dataset], prune_policy=dict(keep_last=2)))]
    rc, results = labvm.playbook(tasks, check=True)
    assert rc == 0 and names(labvm, dataset) == DAYS[:4] + ["manual"] + DAYS[4:]
    rc, results = labvm.playbook(tasks)
    assert rc == 0, results
    assert names(labvm, dataset) == ["manual"] + DAYS[6:]
    summary = [json.dumps(r) for r in results if "snapshot(s) of ours kept" in json.dumps(r)]
    assert summary and "%s: 2 snapshot(s) of ours kept, 6 destroyed" % dataset in summary[0], summary
