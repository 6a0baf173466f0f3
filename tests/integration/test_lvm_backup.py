"""The LVM classic backup source in the lab VM (issue 11): qcow2_chain_append lvm_snapshot=VG/NAME.

All real, in the VM: a classic snapshot taken by lvm_snapshot, read by qcow2_chain_append (digest
scan of the snapshot's device), a full then an incremental, each point restored by
qcow2_chain_restore to a file whose sha256 equals the snapshot's at backup time; and an overflowed
snapshot refused with no point written.
"""

import json

import pytest

MIB = 1 << 20


@pytest.fixture
def disk(labvm):
    name = "bk-disk"
    repo = "/var/lib/labvm/repo-" + name
    labvm.sh("rm -rf {r} /var/lib/labvm/restore-*; lvcreate -q -y -L 32M -n {n} {vg} && "
             "dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=32 oflag=direct status=none"
             .format(n=name, vg=labvm.vg, r=repo))
    yield name, repo
    for lv, row in labvm.lvs().items():
        if row["origin"] == name:
            labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, lv)])
    labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, name)])
    labvm.sh("rm -rf %s /var/lib/labvm/restore-*" % repo)


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def points(labvm, repo):
    return json.loads(labvm.ssh(["cat", repo + "/manifest.json"]).stdout)["points"]


def test_full_and_incremental_restored_sha256_equal(labvm, disk):
    name, repo = disk
    taken = []
    for run in range(2):
        snap = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=name, size="16m"))
        path = snap["path"]
        expected = sha256(labvm, path)
        appended = labvm.module("qcow2_chain_append", dict(chain=repo, lvm_snapshot="%s/%s" % (labvm.vg, snap["snapshot"])))
        assert appended["changed"] and appended["mode"] == "lvm" and appended["lv"] == name
        assert appended["size"] == 32 * MIB and appended["full"] == (run == 0)
        taken.append((appended["point"]["name"], expected, appended))
        labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=name, name=snap["snapshot"], state="absent"))
        # Between runs: 1 MiB rewritten, 2 MiB discarded (zeroed: a linear LV reads zeroes there after blkdiscard -z).
        labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=1 seek=5 oflag=direct status=none && "
                 "blkdiscard -z -o $((20 << 20)) -l $((2 << 20)) /dev/{vg}/{n}".format(vg=labvm.vg, n=name))
    full, incr = taken[0][2], taken[1][2]
    assert full["bytes_read"] == 32 * MIB and incr["bytes_read"] == 32 * MIB  # digest scan: read whole
    assert incr["bytes_written"] < full["bytes_written"] and incr["bytes_written"] <= 4 * MIB
    assert [p["name"] for p in points(labvm, repo)] == [taken[0][0], taken[1][0]]
    for point, expected, _result in taken:
        target = "/var/lib/labvm/restore-%s.raw" % point
        restored = labvm.module("qcow2_chain_restore", dict(chain=repo, point=point, file=target))
        assert restored["changed"]
        assert sha256(labvm, target) == expected


def test_overflowed_snapshot_writes_no_point(labvm, disk):
    name, repo = disk
    snap = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=name, name=name + "-small", size="4m"))
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=8 oflag=direct status=none; sync"
             .format(vg=labvm.vg, n=name))
    assert labvm.lvs()[snap["snapshot"]]["lv_attr"][4] == "I"
    failed = labvm.module("qcow2_chain_append", dict(chain=repo, lvm_snapshot="%s/%s" % (labvm.vg, snap["snapshot"])),
                          expect_failed=True)
    assert failed["overflowed"] and "not backed up" in failed["msg"]
    leftovers = labvm.ssh(["sh", "-c", "ls -A %s 2>/dev/null | grep -v -e '^manifest.json$' -e '^\\.lock$' || true"
                           % repo]).stdout.split()
    assert not labvm.ssh(["test", "-e", repo + "/manifest.json"], check=False).returncode == 0 or \
        points(labvm, repo) == []
    assert [f for f in leftovers if f.endswith(".qcow2")] == []
