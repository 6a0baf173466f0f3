"""The seed-004 flow (issue 11) in the lab VM: an LV mirrored in place onto a ZFS dataset, whose ZFS snapshots
are the points (zfs_mirror), against real device-mapper and OpenZFS 2.1.

The seed's own sequence with our modules: LVM snapshot of the LV, the mirror file updated with only the
changed blocks, a ZFS snapshot of the dataset per run, the LVM snapshot removed.  Each snapshot's copy of
the mirror (under .zfs/snapshot/) is sha256-equal to the LVM snapshot it was made from; the second run
writes only what changed; a run killed in the middle of its in-place update changes no snapshot already
taken, and the next run brings the mirror back exactly.
"""

import json
import time

import pytest

MIB = 1 << 20
LV = "mirror-disk"


@pytest.fixture
def seed(labvm):
    dataset = "labzpool/mirror"
    mnt = "/var/lib/labvm/mirror"
    labvm.sh("lvcreate -q -y -L 32M -n {lv} {vg} && blkdiscard -z /dev/{vg}/{lv} && "
             "dd if=/dev/urandom of=/dev/{vg}/{lv} bs=1M count=24 "
             "oflag=direct status=none && zfs create -o mountpoint={mnt} {ds}".format(lv=LV, vg=labvm.vg, mnt=mnt,
                                                                                      ds=dataset))
    yield dataset, mnt
    labvm.sh("zfs destroy -r {ds}; for s in $(lvs --noheadings -o lv_name -S origin={lv} {vg}); do "
             "lvremove -q -y {vg}/$s; done; lvremove -q -y {vg}/{lv}".format(ds=dataset, lv=LV, vg=labvm.vg),
             check=False)


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def run(labvm, dataset, **extra):
    """One run of the seed's flow: LVM snapshot, mirror + ZFS snapshot, LVM snapshot removed."""
    snap = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=LV, size="16m"))
    expected = sha256(labvm, snap["path"])
    try:
        args = dict(dataset=dataset, file="disk.raw", lvm_snapshot="%s/%s" % (labvm.vg, snap["snapshot"]))
        args.update(extra)
        result = labvm.module("zfs_mirror", args)
    finally:
        labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=LV, name=snap["snapshot"], state="absent"))
    return result, expected


def test_two_runs_two_snapshots_each_equal_to_its_point_then_a_killed_run(labvm, seed):
    dataset, mnt = seed
    checked = labvm.module("zfs_mirror", dict(dataset=dataset, file="disk.raw", source="/dev/%s/%s" % (labvm.vg, LV)),
                           check=True)
    assert checked["changed"] and checked["full"] and checked["snapshot"] is None
    assert labvm.ssh(["ls", "-A", mnt]).stdout.split() == []  # check mode wrote nothing

    first, first_sha = run(labvm, dataset)
    assert first["full"] and first["full_reason"] == "first update of this mirror"
    assert first["bytes_read"] == 32 * MIB and 24 * MIB <= first["bytes_written"] <= 24 * MIB + MIB
    assert first["zero_bytes"] >= 7 * MIB  # the 8 MiB never written read as zeroes: holes
    assert sha256(labvm, first["snapshot_path"]) == first_sha

    # between runs: 1 MiB rewritten, 2 MiB discarded (zeroes on a linear LV)
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{lv} bs=1M count=1 seek=3 oflag=direct status=none && "
             "blkdiscard -z -o $((10 << 20)) -l $((2 << 20)) /dev/{vg}/{lv}".format(vg=labvm.vg, lv=LV))
    second, second_sha = run(labvm, dataset, keep_managed=5)
    assert not second["full"] and second["bytes_read"] == 32 * MIB
    assert second["bytes_written"] == MIB and second["zero_bytes"] == 2 * MIB, second
    assert second["snapshot"] > first["snapshot"] and second["snapshots"] == [first["snapshot"], second["snapshot"]]
    assert sha256(labvm, second["snapshot_path"]) == second_sha
    assert sha256(labvm, first["snapshot_path"]) == first_sha  # the older point is as it was
    # the space the second point holds on its own is what it changed, not the disk
    used = int(labvm.ssh(["zfs", "get", "-H", "-p", "-o", "value", "written", "%s@%s" % (dataset, second["snapshot"])])
               .stdout.strip())
    assert used < 4 * MIB, used

    # a run killed in the middle of its update (bwlimit 2 MiB/s: 16 s for 32 MiB, killed after 4 s)
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{lv} bs=1M count=32 oflag=direct status=none".format(vg=labvm.vg, lv=LV))
    snap = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=LV, size="16m"))
    try:
        task = {"snapchain.vmbackup.zfs_mirror": dict(dataset=dataset, file="disk.raw", bwlimit=2 * MIB,
                                                      lvm_snapshot="%s/%s" % (labvm.vg, snap["snapshot"])),
                "async": 600, "poll": 0}
        rc, _results = labvm.playbook([task])
        assert rc == 0
        deadline = time.monotonic() + 120
        while not json.loads(labvm.ssh(["cat", "%s/.disk.raw.snapchain.json" % mnt]).stdout)["dirty"]:
            assert time.monotonic() < deadline, "the mirror update never started writing"
            time.sleep(0.5)
        time.sleep(3)  # in the middle of the in-place update (16 s at 2 MiB/s)
        labvm.ssh(["pkill", "-KILL", "-f", "AnsiballZ_zfs_mirror"])
        time.sleep(1)
        assert labvm.ssh(["pgrep", "-f", "AnsiballZ_zfs_mirror"], check=False).returncode != 0
        state = json.loads(labvm.ssh(["cat", "%s/.disk.raw.snapchain.json" % mnt]).stdout)
        assert state["dirty"] is True
        assert sha256(labvm, "%s/disk.raw" % mnt) not in (second_sha, sha256(labvm, snap["path"]))  # half updated
        # no new point, and neither point changed
        names = labvm.ssh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", dataset]).stdout.split()
        assert names == ["%s@%s" % (dataset, first["snapshot"]), "%s@%s" % (dataset, second["snapshot"])]
        assert sha256(labvm, first["snapshot_path"]) == first_sha
        assert sha256(labvm, second["snapshot_path"]) == second_sha
    finally:
        labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=LV, name=snap["snapshot"], state="absent"))

    third, third_sha = run(labvm, dataset, keep_last=2)
    assert third["full"] and "interrupted" in third["full_reason"]
    assert sha256(labvm, third["snapshot_path"]) == third_sha
    assert third["snapshots"] == [second["snapshot"], third["snapshot"]]  # keep_last 2 pruned the first
    assert third["destroyed"] == ["%s@%s" % (dataset, first["snapshot"])]


def test_bad_input_is_refused_before_anything_changes(labvm, seed):
    dataset, mnt = seed
    for args, message in ((dict(file="a/b"), "plain file name"), (dict(file=".x"), "plain file name"),
                          (dict(dataset="labzpool/nope"), "does not exist"),
                          (dict(lvm_snapshot="%s/%s" % (labvm.vg, LV)), "is no snapshot")):
        full = dict(dataset=dataset, file="disk.raw", lvm_snapshot="%s/none" % labvm.vg)
        full.update(args)
        failed = labvm.module("zfs_mirror", full, expect_failed=True)
        assert message in failed["msg"], failed["msg"]
    labvm.ssh(["ln", "-s", "/etc/hostname", "%s/disk.raw" % mnt])  # a symbolic link at the mirror's name
    before = sha256(labvm, "/etc/hostname")
    failed = labvm.module("zfs_mirror", dict(dataset=dataset, file="disk.raw", source="/dev/%s/%s" % (labvm.vg, LV)),
                          expect_failed=True)
    assert "is not a regular file" in failed["msg"] and sha256(labvm, "/etc/hostname") == before
    labvm.ssh(["rm", "%s/disk.raw" % mnt])
    labvm.ssh(["zfs", "set", "mountpoint=none", dataset])
    failed = labvm.module("zfs_mirror", dict(dataset=dataset, file="disk.raw", source="/dev/%s/%s" % (labvm.vg, LV)),
                          expect_failed=True)
    assert "is not mounted" in failed["msg"]
    assert labvm.ssh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", dataset]).stdout.split() == []


def test_the_role_mirrors_each_lv_and_cleans_what_a_killed_run_left(labvm, seed):
    """Role zfs_mirror: check mode changes nothing; a managed LVM snapshot left by a killed run is removed; two runs,
    two points equal to the LV at their time, keep_last 1 pruning the first; no LVM snapshot of ours stays."""
    dataset, mnt = seed
    stale = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=LV, size="8m"))  # as a killed run leaves it
    tasks = [dict(name="mirror", **{"ansible.builtin.include_role": dict(name="snapchain.vmbackup.zfs_mirror")},
                  vars=dict(zfs_mirror_disks=[dict(lv="%s/%s" % (labvm.vg, LV), file="disk.raw")],
                            zfs_mirror_dataset=dataset, zfs_mirror_snapshot_size="16m",
                            zfs_mirror_prune_policy=dict(keep_last=1)))]
    rc, _results = labvm.playbook(tasks, check=True)
    assert rc == 0 and labvm.ssh(["ls", "-A", mnt]).stdout.split() == []
    assert stale["snapshot"] in labvm.lvs()
    shas = []
    for _run in range(2):
        rc, results = labvm.playbook(tasks)
        assert rc == 0, json.dumps(results)[-3000:]
        shas.append(sha256(labvm, "/dev/%s/%s" % (labvm.vg, LV)))
        assert [n for n, row in labvm.lvs().items() if row["origin"] == LV] == []  # ours removed, the stale one too
        labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{lv} bs=64K count=4 seek=100 oflag=direct status=none"
                 .format(vg=labvm.vg, lv=LV))
    points = labvm.ssh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", dataset]).stdout.split()
    assert len(points) == 1  # keep_last 1
    assert sha256(labvm, "%s/.zfs/snapshot/%s/disk.raw" % (mnt, points[0].split("@")[1])) == shas[1]
    summary = [json.dumps(r) for r in results if "MiB wrote" in json.dumps(r)]
    assert summary and "incr" in summary[0] and "%s/%s" % (labvm.vg, LV) in summary[0], summary
