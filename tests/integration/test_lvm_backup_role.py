"""Role lvm_backup in the lab VM (issue 11): classic and thin LVs into per-LV qcow2 chains, all real.

Two 32 MiB LVs of ``labvg`` found by discovery (lvm_backup_vgs with an include glob): a linear one
(classic snapshots, digest scan) and a thin one in ``labvg/pool`` (thin snapshots, thin_delta
incrementals).  Check mode first writes nothing; then three role runs with writes (and a discard on the
thin LV) between, a managed snapshot of each kind "left by a killed run" before the runs (the thin one
newer than the base); after every run the state is read back with ``lvs``: no classic snapshot, exactly
one thin snapshot (the latest point's), and every point restored by qcow2_chain_restore is sha256-equal to
the LV when it was backed up.  A second test makes one LV fail for real (its chain path is a plain file)
and names an LV that does not exist: the other LV is backed up, no snapshot of ours is left, the host fails.
"""

import json
import time

import pytest

MIB = 1 << 20
CLASSIC, THIN = "lbr-classic", "lbr-thin"
REPO = "/var/lib/labvm/repo-lbr"
LABEL = "labvm"


@pytest.fixture
def lvs(labvm):
    labvm.sh("rm -rf {r}; mkdir -p {r}; lvcreate -q -y -L 32M -n {c} {vg} && lvcreate -q -V 32M -T {vg}/{pool} -n {t} "
             "&& for lv in {c} {t}; do dd if=/dev/urandom of=/dev/{vg}/$lv bs=1M count=32 oflag=direct status=none; done"
             .format(r=REPO, c=CLASSIC, t=THIN, vg=labvm.vg, pool=labvm.pool))
    yield
    labvm.sh("for lv in {c} {t}; do for s in $(lvs --noheadings -o lv_name -S origin=$lv {vg}); do lvremove -q -y {vg}/$s; "
             "done; lvremove -q -y {vg}/$lv; done; rm -rf {r} /var/lib/labvm/restore-lbr-*"
             .format(r=REPO, c=CLASSIC, t=THIN, vg=labvm.vg), check=False)


def snapshots_of(labvm, lv):
    return sorted(name for name, row in labvm.lvs().items() if row["origin"] == lv)


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def chain(lv):
    return "%s/%s/lvm/labvg/%s" % (REPO, LABEL, lv)


def manifest_points(labvm, lv):
    return json.loads(labvm.ssh(["cat", chain(lv) + "/manifest.json"]).stdout)["points"]


def role(labvm, check=False, **extra):
    role_vars = dict(lvm_backup_vgs=[labvm.vg], lvm_backup_include=["lbr-*"], lvm_backup_repository=REPO,
                     lvm_backup_host_label=LABEL, lvm_backup_snapshot_size="16m", lvm_backup_parallel_reads=2)
    role_vars.update(extra)
    tasks = [{"name": "backup", "ansible.builtin.include_role": dict(name="snapchain.vmbackup.lvm_backup"),
              "vars": role_vars}]
    return labvm.playbook(tasks, check=check)


def task_name(result):
    """A task's name without the ``<role> : `` the callback puts before the tasks of a role."""
    return result["_task"].split(" : ", 1)[-1]


def task_result(results, prefix, lv):
    found = [r for r in results if task_name(r).startswith(prefix) and task_name(r).endswith("labvg/" + lv)]
    assert len(found) == 1, [r["_task"] for r in results]
    return found[0]


def stamp(seconds_ago):
    return time.strftime("snapchain-%Y%m%dT%H%M%SZ", time.gmtime(time.time() - seconds_ago))


def restore_all(labvm, taken):
    """Every (lv, point, sha256) restored to a file in one playbook, each compared."""
    tasks = [{"snapchain.vmbackup.qcow2_chain_restore": dict(chain=chain(lv), point=point,
                                                             file="/var/lib/labvm/restore-lbr-%s-%s.raw" % (lv, point))}
             for lv, point, _sha in taken]
    rc, results = labvm.playbook(tasks)
    assert rc == 0, json.dumps(results)[-3000:]
    for lv, point, expected in taken:
        assert sha256(labvm, "/var/lib/labvm/restore-lbr-%s-%s.raw" % (lv, point)) == expected, (lv, point)
    labvm.sh("rm -f /var/lib/labvm/restore-lbr-*")


def test_classic_and_thin_lvs_three_runs_every_point_restores(labvm, lvs):
    # What a killed run leaves: a managed classic snapshot of ours.
    stale_classic = stamp(3600)
    labvm.ssh(["lvcreate", "-q", "-s", "-L", "8m", "-n", stale_classic, "%s/%s" % (labvm.vg, CLASSIC)])

    rc, results = role(labvm, check=True)
    assert rc == 0, json.dumps(results)[-3000:]
    assert labvm.ssh(["ls", "-A", REPO]).stdout.split() == []  # check mode wrote nothing
    assert snapshots_of(labvm, CLASSIC) == [stale_classic] and snapshots_of(labvm, THIN) == []

    taken = []
    for run in range(3):
        expected = dict((lv, sha256(labvm, "/dev/%s/%s" % (labvm.vg, lv))) for lv in (CLASSIC, THIN))
        rc, results = role(labvm)
        assert rc == 0, json.dumps(results)[-4000:]
        for lv in (CLASSIC, THIN):
            appended = task_result(results, "Copy the changed blocks of", lv)
            points = manifest_points(labvm, lv)
            assert len(points) == run + 1 and points[-1]["name"] == appended["point"]["name"]
            assert appended["full"] == (run == 0)
            taken.append((lv, points[-1]["name"], expected[lv]))
        thin = task_result(results, "Copy the changed blocks of", THIN)
        assert thin["changed_blocks"] == ("full" if run == 0 else "thin_delta")
        assert snapshots_of(labvm, CLASSIC) == []  # ours removed, the killed run's too
        assert snapshots_of(labvm, THIN) == [manifest_points(labvm, THIN)[-1]["snapshot"]]  # only the next base
        if run == 1:
            # 1 MiB rewritten: the thin incremental read exactly that, the classic one read the whole LV
            assert thin["bytes_read"] == MIB and thin["zero_bytes"] == 2 * MIB
            assert task_result(results, "Copy the changed blocks of", CLASSIC)["bytes_read"] == 32 * MIB
            summary = json.dumps([r for r in results if task_name(r) == "Summary"])
            assert "2 of 2 LV backup(s) done" in summary and "by thin_delta" in summary, summary
        if run == 0:
            labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{c} bs=64k count=16 seek=100 oflag=direct status=none && "
                     "dd if=/dev/urandom of=/dev/{vg}/{t} bs=64k count=16 seek=100 oflag=direct status=none && "
                     "blkdiscard -o {o} -l {n} /dev/{vg}/{t}"
                     .format(vg=labvm.vg, c=CLASSIC, t=THIN, o=20 * MIB, n=2 * MIB))
            # A newer thin snapshot of ours that a killed run left: removed, the base kept (thin_delta next).
            labvm.ssh(["lvcreate", "-q", "-s", "-n", stamp(30), "%s/%s" % (labvm.vg, THIN)])
            assert len(snapshots_of(labvm, THIN)) == 2
        if run == 1:
            labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{c} bs=64k count=4 seek=7 oflag=direct status=none && "
                     "dd if=/dev/urandom of=/dev/{vg}/{t} bs=64k count=4 seek=300 oflag=direct status=none"
                     .format(vg=labvm.vg, c=CLASSIC, t=THIN))
    restore_all(labvm, taken)


def test_one_lv_failing_does_not_stop_the_others_and_leaves_no_snapshot(labvm, lvs):
    # A real fault after the snapshot is taken: the thin LV's chain path is a plain file, not a directory.
    labvm.sh("mkdir -p {d} && echo not-a-chain > {d}/{t}".format(d="%s/%s/lvm/labvg" % (REPO, LABEL), t=THIN))
    expected = sha256(labvm, "/dev/%s/%s" % (labvm.vg, CLASSIC))
    rc, results = role(labvm, lvm_backup_vgs=[], lvm_backup_lvs=["labvg/lbr-missing", "labvg/" + THIN, "labvg/" + CLASSIC])
    assert rc != 0
    failed = [r for r in results if task_name(r) == "Fail if any backup failed"]
    assert failed and failed[0]["failed"] and "2 LV backup(s) failed" in failed[0]["msg"], failed
    assert "labvg/lbr-missing" in failed[0]["msg"] and "labvg/" + THIN in failed[0]["msg"]
    assert snapshots_of(labvm, THIN) == [] and snapshots_of(labvm, CLASSIC) == []  # nothing of ours left
    assert labvm.ssh(["cat", "%s/%s/lvm/labvg/%s" % (REPO, LABEL, THIN)]).stdout == "not-a-chain\n"
    points = manifest_points(labvm, CLASSIC)  # the LV after the failed one was backed up
    assert len(points) == 1
    restore_all(labvm, [(CLASSIC, points[0]["name"], expected)])
