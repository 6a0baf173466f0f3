"""The LVM thin backup source in the lab VM (issue 11): qcow2_chain_append lvm_snapshot=VG/NAME of a thin snapshot.

All real, in the VM's device-mapper thin pool ``labvg/pool`` (64 KiB chunks): thin snapshots taken
by lvm_snapshot (managed names), read by qcow2_chain_append; the incrementals' changed blocks come
from thin_delta on a reserved metadata snapshot of the pool, and each point restored by
qcow2_chain_restore is sha256-equal to its snapshot at backup time.  Writes are whole chunks
(``dd oflag=direct`` of 64 KiB blocks), so what an incremental must read is known to the byte.
Discards are real (``blkdiscard`` unmaps the chunks of the thin LV).

The one stand-in: a ``thin_delta`` first in the VM's PATH that kills the module (SIGKILL of its
parent) or fails, because a run killed, or a thin_delta failing, while the pool's metadata
snapshot is reserved cannot be timed for real (thin_delta takes milliseconds here).  The
reservation itself, the kill and what the next run does about them are real.
"""

import json

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming

MIB = 1 << 20
CHUNK = 64 << 10
SIZE = 64 * MIB
FAKE_THIN_DELTA = "/usr/local/sbin/thin_delta"


@pytest.fixture
def thin_disk(labvm, request):
    """A 64 MiB thin LV in labvg/pool full of random data, and its repository; removed after (with its snapshots)."""
    name = "tb-" + request.node.name.replace("test_", "")[:30].replace("_", "-")
    repo = "/var/lib/labvm/repo-" + name
    labvm.sh("rm -rf {r} {f} /var/lib/labvm/restore-*; lvcreate -q -V 64M -T {vg}/{pool} -n {n} && "
             "dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=64 oflag=direct status=none"
             .format(n=name, vg=labvm.vg, pool=labvm.pool, r=repo, f=FAKE_THIN_DELTA))
    yield name, repo
    labvm.sh("rm -f %s" % FAKE_THIN_DELTA)
    for lv in snapshots_of(labvm, name):
        labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, lv)])
    labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, name)])
    labvm.sh("rm -rf %s /var/lib/labvm/restore-*" % repo)


def snapshots_of(labvm, lv):
    return sorted(name for name, row in labvm.lvs().items() if row["origin"] == lv)


def held_root(labvm):
    """The held metadata root field of the pool's status: '-' when no metadata snapshot is reserved."""
    return labvm.ssh(["dmsetup", "status", "%s-%s-tpool" % (labvm.vg, labvm.pool)]).stdout.split()[6]


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def write_chunks(labvm, lv, first_chunk, count):
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{lv} bs=64k count={c} seek={s} oflag=direct status=none"
             .format(vg=labvm.vg, lv=lv, c=count, s=first_chunk))
    return count * CHUNK


def discard(labvm, lv, offset, length):
    labvm.ssh(["blkdiscard", "-o", str(offset), "-l", str(length), "/dev/%s/%s" % (labvm.vg, lv)])


def snapshot_and_append(labvm, lv, repo, expect_failed=False, inactive=False):
    """A managed thin snapshot (lvm_snapshot), its sha256, then qcow2_chain_append of it: (snapshot, sha, result).
    ``inactive``: the snapshot is deactivated first (as after a reboot: thin snapshots skip activation)."""
    snap = labvm.module("lvm_snapshot", dict(vg=labvm.vg, lv=lv))
    assert snap["created"] and snap["type"] == "thin" and naming.is_managed(snap["snapshot"])
    expected = sha256(labvm, snap["path"])
    if inactive:
        labvm.ssh(["lvchange", "-an", "%s/%s" % (labvm.vg, snap["snapshot"])])
    result = labvm.module("qcow2_chain_append", dict(chain=repo, lvm_snapshot="%s/%s" % (labvm.vg, snap["snapshot"])),
                          expect_failed=expect_failed)
    return snap["snapshot"], expected, result


def assert_restored(labvm, repo, taken):
    for point, expected in taken:
        target = "/var/lib/labvm/restore-%s.raw" % point
        assert labvm.module("qcow2_chain_restore", dict(chain=repo, point=point, file=target))["changed"]
        assert sha256(labvm, target) == expected, point
        labvm.ssh(["rm", "-f", target])


def points(labvm, repo):
    return json.loads(labvm.ssh(["cat", repo + "/manifest.json"]).stdout)["points"]


def test_three_backups_with_writes_and_discards_read_only_the_changed_chunks(labvm, thin_disk):
    lv, repo = thin_disk
    taken = []

    snap0, sha0, full = snapshot_and_append(labvm, lv, repo)
    assert full["full"] and full["changed_blocks"] == "full" and full["mode"] == "lvm" and full["lv"] == lv
    assert full["pool"] == labvm.pool and full["size"] == SIZE and full["bytes_read"] == SIZE
    assert full["kept_snapshot"] == snap0 and full["removed_snapshots"] == []
    assert snapshots_of(labvm, lv) == [snap0]
    taken.append((full["point"]["name"], sha0))
    source = full["point"]["source"]
    assert source["type"] == "lvm_thin" and source["lv"] == lv and source["pool"] == labvm.pool
    assert source["thin_id"] == int(labvm.lvs()[snap0]["thin_id"]) and source["snapshot"] == snap0

    # 1 MiB rewritten, 3 scattered chunks, 2 MiB discarded (unmapped: reads as zeroes)
    written = write_chunks(labvm, lv, 80, 16) + sum(write_chunks(labvm, lv, c, 1) for c in (3, 400, 1023))
    discard(labvm, lv, 20 * MIB, 2 * MIB)
    snap1, sha1, incr1 = snapshot_and_append(labvm, lv, repo)
    assert not incr1["full"] and incr1["changed_blocks"] == "thin_delta" and incr1["changed_blocks_reason"] is None
    assert incr1["bytes_read"] == written  # exactly the chunks written, nothing of the 62 MiB unchanged
    assert incr1["zero_bytes"] == 2 * MIB and incr1["bytes_written"] == written
    assert incr1["removed_snapshots"] == [snap0] and snapshots_of(labvm, lv) == [snap1]
    assert incr1["point"]["extra"]["lvm_thin"]["chunk_size"] == CHUNK
    assert incr1["point"]["extra"]["lvm_thin"]["base_thin_id"] == source["thin_id"]
    taken.append((incr1["point"]["name"], sha1))
    assert held_root(labvm) == "-"

    # Written again into part of the discarded range, part of the rewritten MiB discarded again.
    written = write_chunks(labvm, lv, 325, 4) + write_chunks(labvm, lv, 600, 8)
    discard(labvm, lv, 80 * CHUNK, 8 * CHUNK)
    snap2, sha2, incr2 = snapshot_and_append(labvm, lv, repo, inactive=True)
    assert labvm.lvs()[snap2]["lv_attr"][4] != "a"  # activated with -K for the backup, deactivated again
    assert incr2["changed_blocks"] == "thin_delta" and incr2["parent"] == incr1["point"]["name"]
    assert incr2["bytes_read"] == written and incr2["zero_bytes"] == 8 * CHUNK
    assert incr2["removed_snapshots"] == [snap1] and snapshots_of(labvm, lv) == [snap2]
    taken.append((incr2["point"]["name"], sha2))
    assert held_root(labvm) == "-"

    assert [p["name"] for p in points(labvm, repo)] == [t[0] for t in taken]
    assert_restored(labvm, repo, taken)


def test_base_removed_by_hand_falls_back_to_a_digest_scan(labvm, thin_disk):
    lv, repo = thin_disk
    snap0, sha0, full = snapshot_and_append(labvm, lv, repo)
    labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, snap0)])
    written = write_chunks(labvm, lv, 10, 4)
    discard(labvm, lv, 40 * MIB, 1 * MIB)
    snap1, sha1, scan = snapshot_and_append(labvm, lv, repo)
    assert not scan["full"] and scan["changed_blocks"] == "digest_scan"
    assert "no longer exists" in scan["changed_blocks_reason"] and snap0 in scan["changed_blocks_reason"]
    assert scan["bytes_read"] == SIZE and scan["bytes_written"] == written and scan["zero_bytes"] == 1 * MIB
    assert snapshots_of(labvm, lv) == [snap1]

    # The fallback's snapshot is the next base: thin_delta again.
    written = write_chunks(labvm, lv, 700, 2)
    snap2, sha2, incr = snapshot_and_append(labvm, lv, repo)
    assert incr["changed_blocks"] == "thin_delta" and incr["bytes_read"] == written
    assert snapshots_of(labvm, lv) == [snap2]
    assert_restored(labvm, repo, [(full["point"]["name"], sha0), (scan["point"]["name"], sha1),
                                  (incr["point"]["name"], sha2)])

    # The same snapshot again: the newest point already holds it, nothing is written or removed.
    again = labvm.module("qcow2_chain_append", dict(chain=repo, lvm_snapshot="%s/%s" % (labvm.vg, snap2)))
    assert not again["changed"] and again["already_backed_up"] and again["changed_blocks"] is None
    assert len(points(labvm, repo)) == 3 and snapshots_of(labvm, lv) == [snap2]


def test_a_killed_run_leaves_the_reservation_the_next_run_releases(labvm, thin_disk):
    lv, repo = thin_disk
    snap0, sha0, full = snapshot_and_append(labvm, lv, repo)
    assert held_root(labvm) == "-"

    # Killed while the metadata snapshot is reserved (the stand-in thin_delta SIGKILLs the module).
    labvm.ssh(["sh", "-c", "printf '#!/bin/sh\\nkill -9 $PPID\\nexit 1\\n' > %s && chmod +x %s"
               % (FAKE_THIN_DELTA, FAKE_THIN_DELTA)])
    write_chunks(labvm, lv, 100, 2)
    snap1, _sha1, _killed = snapshot_and_append(labvm, lv, repo, expect_failed=True)
    assert held_root(labvm) != "-"  # what a kill leaves: the reservation, pinning the old metadata
    assert [p["name"] for p in points(labvm, repo)] == [full["point"]["name"]]
    assert snapshots_of(labvm, lv) == sorted([snap0, snap1])
    labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, snap1)])  # the caller's cleanup (always:)

    # thin_delta failing inside the reservation: released, and the digest scan does the backup.
    labvm.ssh(["sh", "-c", "printf '#!/bin/sh\\necho broken metadata >&2\\nexit 1\\n' > %s" % FAKE_THIN_DELTA])
    snap2, sha2, scan = snapshot_and_append(labvm, lv, repo)
    assert scan["changed_blocks"] == "digest_scan" and "thin_delta failed" in scan["changed_blocks_reason"]
    assert any("left by a killed run" in w for w in scan.get("warnings", []))  # the killed run's reservation, released
    assert held_root(labvm) == "-"
    assert snapshots_of(labvm, lv) == [snap2]

    # The real thin_delta again: the next run is a thin_delta incremental, nothing left reserved.
    labvm.ssh(["rm", "-f", FAKE_THIN_DELTA])
    written = write_chunks(labvm, lv, 900, 3)
    snap3, sha3, incr = snapshot_and_append(labvm, lv, repo)
    assert incr["changed_blocks"] == "thin_delta" and incr["bytes_read"] == written
    assert not any("killed run" in w for w in incr.get("warnings", []))
    assert held_root(labvm) == "-" and snapshots_of(labvm, lv) == [snap3]
    assert_restored(labvm, repo, [(full["point"]["name"], sha0), (scan["point"]["name"], sha2),
                                  (incr["point"]["name"], sha3)])
