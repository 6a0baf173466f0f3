"""Role zfs_backup in the lab VM (issue 11): a zvol and a raw image file in a ZFS filesystem into qcow2 chains.

All real, OpenZFS 2.1 in the VM: a 32 MiB zvol (zfs send -i incrementals from the base snapshot the role
keeps, held with our tag), a 32 MiB raw file and a 32 MiB qcow2 image (format: qcow2, read through QEMU as the
guest's disk) in a mounted dataset, read from ``<mountpoint>/.zfs/snapshot/<snap>/`` (digest scan; the dataset
snapshot destroyed after each run).
Check mode first writes nothing; then three runs with writes (and a discard on the zvol) between, with
snapshots of ours "left by a killed run" before the second and a snapshot that is not ours (a zfs_mirror-style
``snapchain-`` point on the dataset) that must stay.  After each run ``zfs list -t snapshot`` and
``zfs holds`` say exactly what is left, and every point restored by qcow2_chain_restore is sha256-equal to the
disk when it was backed up.  A second test: real faults (a chain path that is a plain file, a missing file, a
missing zvol) fail alone, leave no snapshot of ours, and fail the host at the end; a .qcow2 file is refused
in preflight before anything is taken.
"""

import json
import time

import pytest

MIB = 1 << 20
ZVOL = "labzpool/zbr-vol"
FS = "labzpool/zbr-fs"
MNT = "/var/lib/labvm/zbr-fs"
REPO = "/var/lib/labvm/repo-zbr"
LABEL = "labvm"


@pytest.fixture
def disks(labvm):
    labvm.sh("rm -rf {r}; mkdir -p {r}; zfs destroy -r {z} 2>/dev/null; zfs destroy -r {fs} 2>/dev/null; "
             "zfs create -V 32M {z} && zfs create -o mountpoint={m} {fs} && udevadm settle && "
             "dd if=/dev/urandom of=/dev/zvol/{z} bs=1M count=24 oflag=direct status=none && "
             "dd if=/dev/urandom of={m}/vm1.raw bs=1M count=32 status=none && "
             "qemu-img create -q -f qcow2 {m}/vm2.qcow2 32M && "
             "qemu-io -f qcow2 -c 'write -P 0x33 0 20M' -c 'write -z 4M 1M' {m}/vm2.qcow2 >/dev/null && sync"
             .format(r=REPO, z=ZVOL, fs=FS, m=MNT))
    yield
    labvm.sh("for s in $(zfs list -H -o name -t snapshot -r labzpool | grep zbr-); do "
             "zfs release snapchain $s 2>/dev/null; done; zfs destroy -r {z}; zfs destroy -r {fs}; "
             "rm -rf {r} /var/lib/labvm/restore-zbr-*".format(r=REPO, z=ZVOL, fs=FS), check=False)


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def snapshots(labvm, dataset):
    out = labvm.ssh(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset]).stdout.split()
    return sorted(name.split("@")[1] for name in out)


def holds(labvm, dataset, snap):
    out = labvm.ssh(["zfs", "holds", "-H", "%s@%s" % (dataset, snap)]).stdout
    return sorted(line.split("\t")[1] for line in out.splitlines() if line.strip())


def guest_sha256(labvm, path):
    """sha256 of the guest disk a qcow2 image holds (converted to raw by QEMU)."""
    raw = "/var/lib/labvm/zbr-guest.raw"
    out = labvm.sh("qemu-img convert -U -f qcow2 -O raw {p} {r} && sha256sum {r} && rm -f {r}".format(p=path, r=raw))
    return out.stdout.split()[0]


def chain(disk):
    return "%s/%s/zfs/%s" % (REPO, LABEL, disk)


def manifest_points(labvm, disk):
    return json.loads(labvm.ssh(["cat", chain(disk) + "/manifest.json"]).stdout)["points"]


def role(labvm, check=False, **extra):
    role_vars = dict(zfs_backup_zvols=[ZVOL], zfs_backup_files=[dict(dataset=FS, file="vm1.raw"),
                                                                dict(dataset=FS, file="vm2.qcow2", format="qcow2")],
                     zfs_backup_repository=REPO, zfs_backup_host_label=LABEL, zfs_backup_parallel_reads=2)
    role_vars.update(extra)
    tasks = [{"name": "backup", "ansible.builtin.include_role": dict(name="snapchain.vmbackup.zfs_backup"),
              "vars": role_vars}]
    return labvm.playbook(tasks, check=check)


def task_result(results, name):
    """The one result of the task ``name`` (without the ``<role> : `` the callback puts before a role's tasks)."""
    found = [r for r in results if r["_task"].split(" : ", 1)[-1] == name]
    assert len(found) == 1, [r["_task"] for r in results]
    return found[0]


def stamp(prefix, seconds_ago):
    return prefix + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - seconds_ago))


def restore_all(labvm, taken):
    tasks = [{"snapchain.vmbackup.qcow2_chain_restore": dict(chain=chain(disk), point=point,
                                                             file="/var/lib/labvm/restore-zbr-%d.raw" % i)}
             for i, (disk, point, _sha) in enumerate(taken)]
    rc, results = labvm.playbook(tasks)
    assert rc == 0, json.dumps(results)[-3000:]
    for i, (disk, point, expected) in enumerate(taken):
        assert sha256(labvm, "/var/lib/labvm/restore-zbr-%d.raw" % i) == expected, (disk, point)
    labvm.sh("rm -f /var/lib/labvm/restore-zbr-*")


def test_zvol_and_file_three_runs_every_point_restores(labvm, disks):
    foreign = stamp("snapchain-", 7200)  # a zfs_mirror-style point on the dataset: not this role's
    labvm.ssh(["zfs", "snapshot", "%s@%s" % (FS, foreign)])
    rc, results = role(labvm, check=True)
    assert rc == 0, json.dumps(results)[-3000:]
    assert labvm.ssh(["ls", "-A", REPO]).stdout.split() == []
    assert snapshots(labvm, ZVOL) == [] and snapshots(labvm, FS) == [foreign]

    taken = []
    for run in range(3):
        labvm.ssh(["sync"])
        expected = {ZVOL: sha256(labvm, "/dev/zvol/" + ZVOL), FS + "/vm1.raw": sha256(labvm, MNT + "/vm1.raw"),
                    FS + "/vm2.qcow2": guest_sha256(labvm, MNT + "/vm2.qcow2")}
        rc, results = role(labvm)
        assert rc == 0, json.dumps(results)[-4000:]
        zvol_run = task_result(results, "Copy the changed blocks of zvol " + ZVOL)
        file_run = task_result(results, "Copy the changed blocks of %s/vm1.raw" % FS)
        image_run = task_result(results, "Copy the changed blocks of %s/vm2.qcow2" % FS)
        assert zvol_run["full"] == file_run["full"] == image_run["full"] == (run == 0)
        assert image_run["source_format"] == "qcow2" and file_run["source_format"] == "raw"
        assert zvol_run["changed_blocks"] == ("digest_scan" if run == 0 else "zfs_send"), zvol_run
        for disk in expected:
            points = manifest_points(labvm, disk)
            assert len(points) == run + 1
            taken.append((disk, points[-1]["name"], expected[disk]))
        base = manifest_points(labvm, ZVOL)[-1]["snapshot"]
        assert snapshots(labvm, ZVOL) == [base] and holds(labvm, ZVOL, base) == ["snapchain"]
        assert snapshots(labvm, FS) == [foreign]  # ours destroyed (a stale one too), the foreign one kept
        if run == 1:
            assert zvol_run["bytes_read"] == MIB and file_run["bytes_written"] == MIB // 2
            assert image_run["bytes_written"] == MIB // 2, image_run
            summary = json.dumps(task_result(results, "Summary"))
            assert "3 of 3 disk backup(s) done" in summary and "by zfs_send" in summary, summary
        # writes and a discard; then, before run 2, what a killed run leaves (newer than the base)
        labvm.sh("dd if=/dev/urandom of=/dev/zvol/{z} bs=64K seek={s} count=16 oflag=direct status=none && "
                 "dd if=/dev/urandom of={m}/vm1.raw bs=64K seek={s} count=8 conv=notrunc status=none && "
                 "qemu-io -f qcow2 -c 'write -P {p} {q} 512k' {m}/vm2.qcow2 >/dev/null && "
                 "blkdiscard -o {o} -l {n} /dev/zvol/{z} && sync"
                 .format(z=ZVOL, m=MNT, s=40 + 100 * run, o=(10 + run) * MIB, n=MIB, p=0x41 + run,
                         q=(40 + 100 * run) * 65536))
        if run == 0:
            labvm.ssh(["zfs", "snapshot", "%s@%s" % (ZVOL, stamp("snapchain-", 20))])
            labvm.ssh(["zfs", "snapshot", "%s@%s" % (FS, stamp("snapchain-file-", 20))])
    restore_all(labvm, taken)


def test_real_faults_fail_alone_leave_no_snapshot_and_fail_the_host(labvm, disks):
    # preflight: a qcow2 file is refused before anything is taken
    rc, results = role(labvm, zfs_backup_files=[dict(dataset=FS, file="vm1.qcow2")])
    assert rc != 0 and any("look like qcow2" in (r.get("msg") or "") for r in results), json.dumps(results)[-2000:]
    assert snapshots(labvm, ZVOL) == [] and snapshots(labvm, FS) == []

    labvm.sh("mkdir -p {d} && echo not-a-chain > {d}/zbr-vol".format(d="%s/%s/zfs/labzpool" % (REPO, LABEL)))
    expected = sha256(labvm, MNT + "/vm1.raw")
    rc, results = role(labvm, zfs_backup_zvols=["labzpool/zbr-missing", ZVOL],
                       zfs_backup_files=[dict(dataset=FS, file="missing.raw"), dict(dataset=FS, file="vm1.raw")])
    assert rc != 0
    failed = task_result(results, "Fail if any backup failed")
    assert failed["failed"] and "3 disk backup(s) failed" in failed["msg"], failed
    for disk in ("labzpool/zbr-missing", ZVOL, FS + "/missing.raw"):
        assert disk + " (" in failed["msg"], failed["msg"]
    assert snapshots(labvm, ZVOL) == [] and snapshots(labvm, FS) == []  # nothing of ours left
    points = manifest_points(labvm, FS + "/vm1.raw")
    assert len(points) == 1
    restore_all(labvm, [(FS + "/vm1.raw", points[0]["name"], expected)])
