"""Restoring the points of a zfs_mirror mirror (seed 004, issue 11) with the restore role, in the lab VM (real
device-mapper, LVM and OpenZFS 2.1).

Two mirror runs of an LV with a write between them make two points (ZFS snapshots of the dataset); the role
(restore_mirror) restores the first by name into a file and the latest into a new LV, each sha256-equal to the
LVM snapshot it was made from.  A hold that a killed restore left is released; no hold of ours stays after a
restore, a failed one included.  Check mode, a point that does not exist and a dataset that is not a mirror
write nothing.
"""

import json

import pytest

from test_zfs_mirror import LV, MIB, run, sha256

DATASET = "labzpool/mrestore"
MNT = "/var/lib/labvm/mrestore"
OUT = "/var/lib/labvm/restore-out"
DEST_LV = "mrestore-dest"


@pytest.fixture(scope="module")
def points(labvm):
    """Two points of the mirror of LV (a write between them): [(snapshot name, sha256 of its LVM snapshot)]."""
    labvm.sh("lvcreate -q -y -L 32M -n {lv} {vg} && blkdiscard -z /dev/{vg}/{lv} && "
             "dd if=/dev/urandom of=/dev/{vg}/{lv} bs=1M count=24 oflag=direct status=none && "
             "zfs create -o mountpoint={mnt} {ds} && mkdir -p {out}"
             .format(lv=LV, vg=labvm.vg, mnt=MNT, ds=DATASET, out=OUT))
    try:
        first, first_sha = run(labvm, DATASET)
        labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{lv} bs=1M count=2 seek=5 oflag=direct status=none"
                 .format(vg=labvm.vg, lv=LV))
        second, second_sha = run(labvm, DATASET)
        assert first_sha != second_sha
        yield [(first["snapshot"], first_sha), (second["snapshot"], second_sha)]
    finally:
        labvm.sh("zfs destroy -r {ds}; zfs destroy -r labzpool/notmirror; lvremove -q -y {vg}/{lv}; "
                 "lvremove -q -y {vg}/{dest}; rm -rf {out}".format(ds=DATASET, vg=labvm.vg, lv=LV, dest=DEST_LV,
                                                                   out=OUT), check=False)


def restore_task(**variables):
    base = dict(restore_mirror=dict(dataset=DATASET, file="disk.raw"), restore_poll_interval=2)
    base.update(variables)
    return dict(name="restore", **{"ansible.builtin.include_role": dict(name="snapchain.vmbackup.restore")}, vars=base)


def holds(labvm, snapshots):
    """Every hold on the dataset's ``snapshots`` (zfs holds -H): [(snapshot, tag)]."""
    out = labvm.ssh(["zfs", "holds", "-H"] + ["%s@%s" % (DATASET, s) for s in snapshots]).stdout
    return [tuple(line.split("\t")[:2]) for line in out.splitlines() if line.strip()]


def test_points_restore_by_name_to_a_file_and_latest_to_a_new_lv(labvm, points):
    (first, first_sha), (second, second_sha) = points
    labvm.sh("lvcreate -q -y -L 40M -n {dest} {vg} && dd if=/dev/urandom of=/dev/{vg}/{dest} bs=1M count=40 "
             "oflag=direct status=none".format(dest=DEST_LV, vg=labvm.vg))
    # the hold a killed restore leaves (its process, pid 999999, is gone): the next restore releases it
    labvm.ssh(["zfs", "hold", "snapchain-restore.999999.1", "%s@%s" % (DATASET, first)])
    rc, results = labvm.playbook([
        restore_task(restore_point=first, restore_to_file=OUT + "/first.raw"),
        restore_task(restore_to_device="/dev/%s/%s" % (labvm.vg, DEST_LV), restore_force=True),
    ])
    assert rc == 0, json.dumps(results)[-4000:]
    assert sha256(labvm, OUT + "/first.raw") == first_sha
    restored = labvm.ssh(["sh", "-c", "head -c %d /dev/%s/%s | sha256sum" % (32 * MIB, labvm.vg, DEST_LV)]).stdout
    assert restored.split()[0] == second_sha
    summaries = [json.dumps(r) for r in results if "Restored point" in json.dumps(r)]
    assert len(summaries) == 2 and first in summaries[0] and second in summaries[1], summaries
    assert "ZFS snapshot %s@%s" % (DATASET, first) in summaries[0]
    warned = json.dumps([r for r in results if "snapchain-restore.999999.1" in json.dumps(r)])
    assert "left by a restore that was killed" in warned, json.dumps(results)[-3000:]
    assert holds(labvm, [first, second]) == []
    # the file's holes stayed holes: 24 MiB of data of 32 (the mirror's zeroes are holes, not read)
    assert int(labvm.ssh(["stat", "-c", "%b", OUT + "/first.raw"]).stdout) * 512 <= 25 * MIB


def test_check_mode_a_missing_point_and_a_dataset_that_is_no_mirror_write_nothing(labvm, points):
    (first, _sha), (second, _sha2) = points
    labvm.sh("zfs create -o mountpoint=/var/lib/labvm/notmirror labzpool/notmirror && "
             "zfs snapshot labzpool/notmirror@snapchain-20261207T000000Z && "
             "zfs snapshot labzpool/notmirror@theirs")
    rc, results = labvm.playbook([restore_task(restore_to_file=OUT + "/checked.raw")], check=True)
    assert rc == 0, json.dumps(results)[-3000:]
    assert "CHECK MODE, nothing written" in json.dumps(results)
    failures = []
    for task in (restore_task(restore_point="snapchain-20200101T000000Z", restore_to_file=OUT + "/missing.raw"),
                 restore_task(restore_mirror=dict(dataset="labzpool/notmirror", file="disk.raw"),
                              restore_to_file=OUT + "/notmirror.raw"),
                 restore_task(restore_mirror=dict(dataset="labzpool/nope", file="disk.raw"),
                              restore_to_file=OUT + "/x.raw")):
        rc, results = labvm.playbook([task])
        assert rc != 0
        failures.append(results[-1].get("msg", ""))  # the role's RESTORE FAILED report
    text = json.dumps(failures)
    assert "no point 'snapchain-20200101T000000Z'" in failures[0] and second in failures[0], failures[0]
    assert "holds no mirror disk.raw" in failures[1], failures[1]
    assert "does not exist" in failures[2], failures[2]
    assert "RESTORE FAILED" in text
    assert labvm.ssh(["ls", "-A", OUT]).stdout.split() in ([], ["first.raw"])  # nothing new, no .partial
    assert holds(labvm, [first, second]) == []
    assert labvm.ssh(["zfs", "holds", "-H", "labzpool/notmirror@snapchain-20261207T000000Z"]).stdout.strip() == ""
