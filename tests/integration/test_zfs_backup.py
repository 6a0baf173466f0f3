"""The ZFS zvol backup source in the lab VM (issue 11): qcow2_chain_append zfs_snapshot=POOL/VOL@SNAP.

All real, in the VM (OpenZFS 2.1): snapshots taken by our zfs_snapshot module, a full (digest scan of
the snapshot's device, made visible for the run) then incrementals whose changed blocks come from
``zfs send -i`` of the last point's snapshot (only those read), with writes and discards
(blkdiscard on the zvol) between; every point restored by qcow2_chain_restore to a file whose sha256
equals the zvol's content when its snapshot was taken.  Then the parent snapshot destroyed: the
digest-scan fallback, still exact.  After every run nothing of ours is left: snapdev as it was, no
device node of a snapshot, no clone.
"""

import json
import threading
import time

import pytest

MIB = 1 << 20
KIB = 1 << 10


@pytest.fixture
def zvol(labvm):
    name = "%s/zb-disk" % labvm.zpool
    repo = "/var/lib/labvm/repo-zb-disk"
    labvm.sh("rm -rf {r} /var/lib/labvm/restore-*; zfs destroy -r {n} 2>/dev/null; zfs create -V 64M {n} && "
             "udevadm settle && dd if=/dev/urandom of=/dev/zvol/{n} bs=1M count=48 oflag=direct status=none"
             .format(n=name, r=repo))
    yield name, repo
    labvm.sh("zfs destroy -r %s; rm -rf %s /var/lib/labvm/restore-*" % (name, repo))


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def snapdev(labvm, name):
    return tuple(labvm.ssh(["zfs", "get", "-H", "-o", "value,source", "snapdev", name]).stdout.strip().split("\t"))


def assert_nothing_left(labvm, name, expected_snapdev=("hidden", "default")):
    assert snapdev(labvm, name) == expected_snapdev
    datasets = labvm.ssh(["zfs", "list", "-H", "-o", "name", "-t", "filesystem,volume", "-r", labvm.zpool]).stdout.split()
    assert datasets == [labvm.zpool, name]  # no clone
    if expected_snapdev[0] == "hidden":
        labvm.sh("udevadm settle")
        assert [d for d in labvm.ssh(["ls", "/dev/zvol/" + labvm.zpool]).stdout.split() if "@" in d] == []


def dd(labvm, name, offset, length):
    labvm.sh("dd if=/dev/urandom of=/dev/zvol/{n} bs=64K seek={s} count={c} oflag=direct status=none"
             .format(n=name, s=offset // (64 * KIB), c=length // (64 * KIB)))


def discard(labvm, name, offset, length):
    labvm.ssh(["blkdiscard", "-o", str(offset), "-l", str(length), "/dev/zvol/" + name])


def take(labvm, name):
    """A snapshot by our module (keeping the newest two of ours: the new one and the base), and the sha256 of
    the zvol at that moment (nothing writes to it meanwhile)."""
    labvm.ssh(["sync"])
    snap = labvm.module("zfs_snapshot", dict(dataset=name, keep_managed=2))
    assert snap["changed"] and snap["created"]
    return snap["snapshot"], sha256(labvm, "/dev/zvol/" + name)


def test_full_then_exact_incrementals_from_zfs_send_then_digest_scan_fallback(labvm, zvol):
    name, repo = zvol
    # Between runs: (written, discarded) ranges.  After run 1 the end of the data (44-48 MiB) is discarded,
    # after run 2 a range past it (60 MiB) is written: the object's highest block moves down, then up.
    changes = [
        ([(5 * MIB, MIB), (40 * MIB, 256 * KIB)], [(20 * MIB, 2 * MIB), (44 * MIB, 4 * MIB)]),
        ([(60 * MIB, 512 * KIB), (21 * MIB, 128 * KIB)], [(5 * MIB, MIB)]),
    ]
    taken = []
    for run in range(3):
        snap, expected = take(labvm, name)
        appended = labvm.module("qcow2_chain_append", dict(chain=repo, zfs_snapshot="%s@%s" % (name, snap)))
        assert appended["changed"] and appended["mode"] == "zfs" and appended["zvol"] == name
        assert appended["size"] == 64 * MIB and appended["full"] == (run == 0) and appended["snapshot"] == snap
        assert_nothing_left(labvm, name)
        taken.append((appended, expected))
        if run < len(changes):
            for offset, length in changes[run][0]:
                dd(labvm, name, offset, length)
            for offset, length in changes[run][1]:
                discard(labvm, name, offset, length)
    full, incr1, incr2 = [t[0] for t in taken]
    assert full["changed_blocks"] == "digest_scan" and full["bytes_read"] == 64 * MIB
    # The incrementals read exactly the blocks written since (64 KiB-aligned writes here), nothing else:
    # the discarded ranges become zero clusters without a read.
    assert incr1["changed_blocks"] == "zfs_send" and incr1["bytes_read"] == MIB + 256 * KIB
    assert incr2["changed_blocks"] == "zfs_send" and incr2["bytes_read"] == 512 * KIB + 128 * KIB
    assert incr1["point"]["extra"]["zfs"]["from_snapshot"] == "%s@%s" % (name, full["snapshot"])
    assert incr1["zero_bytes"] >= 6 * MIB and incr2["zero_bytes"] >= MIB

    # The parent snapshot destroyed (by our module, as a prune would): the fallback digest-scans the device
    # against the last point's digests.  And a snapdev the user set stays as it is.
    labvm.module("zfs_snapshot", dict(dataset=name, name=incr2["snapshot"], state="absent"))
    dd(labvm, name, 30 * MIB, 64 * KIB)
    labvm.ssh(["zfs", "set", "snapdev=visible", name])
    snap, expected = take(labvm, name)
    fallback = labvm.module("qcow2_chain_append", dict(chain=repo, zfs_snapshot="%s@%s" % (name, snap)))
    assert not fallback["full"] and fallback["changed_blocks"] == "digest_scan"
    assert fallback["bytes_read"] == 64 * MIB and fallback["bytes_written"] == 64 * KIB
    assert_nothing_left(labvm, name, expected_snapdev=("visible", "local"))
    labvm.ssh(["zfs", "inherit", "snapdev", name])
    taken.append((fallback, expected))

    # The same snapshot again: nothing written.
    again = labvm.module("qcow2_chain_append", dict(chain=repo, zfs_snapshot="%s@%s" % (name, snap)))
    assert not again["changed"] and again["already_backed_up"]

    points = json.loads(labvm.ssh(["cat", repo + "/manifest.json"]).stdout)["points"]
    assert [p["name"] for p in points] == [t[0]["point"]["name"] for t in taken]
    for appended, expected in taken:
        point = appended["point"]["name"]
        target = "/var/lib/labvm/restore-%s.raw" % point
        restored = labvm.module("qcow2_chain_restore", dict(chain=repo, point=point, file=target))
        assert restored["changed"]
        assert sha256(labvm, target) == expected, "point %s (%s)" % (point, appended["changed_blocks"])
        labvm.ssh(["rm", "-f", target])


KILL_READER = r"""
import os, signal, subprocess, sys
# In the VM: if snapdev of the zvol is visible and a process holds our zvol lock, kill -9 that process.
if subprocess.run(["zfs", "get", "-H", "-o", "value", "snapdev", sys.argv[1]], capture_output=True,
                  text=True).stdout.strip() != "visible":
    sys.exit(0)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = [os.readlink("/proc/%s/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%s/fd" % pid)]
    except OSError:
        continue
    if any("/snapchain-zvol-" in target for target in fds):
        os.kill(int(pid), signal.SIGKILL)
        print("killed")
"""


def test_a_killed_run_leaves_snapdev_visible_and_the_next_run_puts_it_back(labvm, zvol):
    name, repo = zvol
    # 256 MiB (sparse) with 64 MiB of data: a full long enough (~40 s under TCG) to be killed during its copy.
    labvm.sh("zfs set refreservation=none {n} && zfs set volsize=256M {n} && dd if=/dev/urandom of=/dev/zvol/{n} "
             "bs=1M count=64 seek=64 oflag=direct status=none".format(n=name))
    snap, expected = take(labvm, name)
    box = {}

    def run():
        try:
            box["result"] = labvm.module("qcow2_chain_append", dict(chain=repo, zfs_snapshot="%s@%s" % (name, snap)),
                                         expect_failed=True)
        except BaseException as exc:  # re-raised below, in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = False
    while thread.is_alive() and not killed:
        killed = "killed" in labvm.ssh(["python3", "-c", KILL_READER, name], check=False).stdout
        time.sleep(0.2)
    thread.join()
    if "error" in box:
        raise box["error"]
    assert killed, box
    assert snapdev(labvm, name) == ("visible", "local")  # what the killed run left
    again = labvm.module("qcow2_chain_append", dict(chain=repo, zfs_snapshot="%s@%s" % (name, snap)))
    assert any("snapdev of %s put back to hidden" % name in c for c in again["cleaned_orphans"]), again
    assert again["full"] and again["changed_blocks"] == "digest_scan"
    assert_nothing_left(labvm, name)
    target = "/var/lib/labvm/restore-killed.raw"
    labvm.module("qcow2_chain_restore", dict(chain=repo, point=again["point"]["name"], file=target))
    assert sha256(labvm, target) == expected
