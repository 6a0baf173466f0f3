"""Many hypervisors against one cluster, for real: transfer slots (RADOS lock leases), bwlimit, and a
simulated fleet of 16 inventory hosts running playbooks/backup.yml with forks.

The fleet's hosts are distinct inventory names with local connections, each with its own disks
(RBD images of the lab) and its own repository. The peak number of concurrent transfers is computed
from the slot each backup reports holding (acquired_at .. released_at), and must never exceed the cap.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import rbd

import module_runner
from ansible_runner import ROOT, playbook, pool_ioctx

from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.slots import LEASE, TransferSlot

MiB = 1 << 20


def make_image(lab, name, size=4 * MiB, data=MiB):
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, size)
        with rbd.Image(ioctx, name) as img:
            img.write(os.urandom(data), 0)


def remove_images(lab, names):
    for name in names:
        lab.rbd("snap", "purge", "%s/%s" % (lab.pool, name), check=False)
        lab.rbd("rm", "%s/%s" % (lab.pool, name), check=False)


def backup_args(lab, image, chain, **extra):
    args = dict(pool=lab.pool, image=image, chain=str(chain), ceph_conf=lab.ceph_conf,
                ceph_client=lab.backup_client, keyring=lab.backup_keyring, parallel=4)
    args.update(extra)
    return args


@pytest.fixture
def image(lab):
    name = "fleet-" + uuid.uuid4().hex[:8]
    make_image(lab, name, size=16 * MiB, data=16 * MiB)
    yield name
    remove_images(lab, [name])


def test_bwlimit_paces_the_reads(lab, image, tmp_path):
    result = module_runner.run("rbd_export_diff", backup_args(lab, image, tmp_path / "chain", bwlimit=4))
    assert result["bytes_read"] == 16 * MiB
    assert result["seconds"] >= 16 / 4 * 0.9, result["seconds"]  # 16 MiB at 4 MiB/s: 4 s, whatever the threads


def test_all_slots_busy_fails_before_anything_is_written_then_a_free_slot_is_taken(lab, image, tmp_path):
    group = "t" + uuid.uuid4().hex[:8]
    cluster = lab.rados("backup")
    try:
        with cluster.open_ioctx(lab.pool) as ioctx:
            with TransferSlot(ioctx, group, 1, what="the test holds it") as held:
                assert held.index == 0
                failed = module_runner.run("rbd_export_diff", backup_args(
                    lab, image, tmp_path / "chain", transfer_slots=1, transfer_slot_group=group,
                    transfer_slot_wait=2), expect_failed=True)
                assert "all 1 transfer slots of group %r are busy" % group in failed["msg"]
                assert not (tmp_path / "chain" / "manifest.json").exists()
                assert lab.rbd("snap", "ls", "%s/%s" % (lab.pool, image)).stdout.strip() == ""
    finally:
        cluster.shutdown()
    done = module_runner.run("rbd_export_diff", backup_args(lab, image, tmp_path / "chain", transfer_slots=1,
                                                            transfer_slot_group=group, transfer_slot_wait=10))
    slot = done["transfer_slot"]
    assert slot["index"] == 0 and slot["slots"] == 1 and slot["acquired_at"] < slot["released_at"]


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %(collections)r)
    import rados
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.slots import TransferSlot
    cluster = rados.Rados(conffile=%(conf)r, name="client.backup", conf={"keyring": %(keyring)r})
    cluster.connect(timeout=30)
    ioctx = cluster.open_ioctx(%(pool)r)
    TransferSlot(ioctx, %(group)r, 1, what="killed holder").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_holder_frees_its_slot_when_its_lease_ends(lab, image, tmp_path):
    """SIGKILL of a run holding the only slot: no clean-up step, the lease (LEASE s) runs out."""
    group = "k" + uuid.uuid4().hex[:8]
    code = HOLDER % dict(collections=os.path.join(ROOT, "build", "collections"), conf=lab.ceph_conf,
                         keyring=lab.backup_keyring, pool=lab.pool, group=group)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed_at = time.time()
    done = module_runner.run("rbd_export_diff", backup_args(lab, image, tmp_path / "chain", transfer_slots=1,
                                                            transfer_slot_group=group, transfer_slot_wait=LEASE * 3))
    waited = done["transfer_slot"]["acquired_at"] - killed_at
    assert 0 < waited <= LEASE + 10, waited
    print("slot of a killed holder free again after %.1f s (lease %d s)" % (waited, LEASE))


def peak(intervals):
    events = sorted([(start, 1) for start, _end in intervals] + [(end, -1) for _start, end in intervals])
    now = best = 0
    for _when, step in events:  # at equal times -1 sorts first: a slot handed over is not an overlap
        now += step
        best = max(best, now)
    return best


def run_fleet(lab, tmp_path, disks, hosts=16, cap=3):
    """Each disk holds 2 MiB of data read at 1 MiB/s (bwlimit): a transfer lasts 2 s at least, so the
    hosts' transfers do overlap and the cap is what holds them back."""
    tag = uuid.uuid4().hex[:6]
    images = ["fl%s-%02d" % (tag, i) for i in range(disks)]
    for name in images:
        make_image(lab, name, data=2 * MiB)
    group = "fleet" + tag
    inventory = {"rbd_backup": {"vars": dict(
        ansible_connection="local", ansible_python_interpreter="/usr/bin/python3",
        rbd_backup_ceph_conf=lab.ceph_conf, rbd_backup_ceph_client=lab.backup_client,
        rbd_backup_keyring=lab.backup_keyring, rbd_backup_cluster_label="lab", rbd_backup_parallel_images=2,
        rbd_backup_parallel_reads=2, rbd_backup_poll_interval=1, rbd_backup_transfer_slots=cap, rbd_backup_bwlimit=1,
        rbd_backup_transfer_slot_group=group), "hosts": {}}}
    for h in range(hosts):
        mine = images[h::hosts]
        if not mine:
            continue
        name = "hv%02d.fleet.test" % h
        repo = tmp_path / ("repo-%02d" % h)
        repo.mkdir()
        inventory["rbd_backup"]["hosts"][name] = dict(
            rbd_backup_images=[dict(pool=lab.pool, image=i) for i in mine], rbd_backup_repository=str(repo),
            rbd_backup_report=str(tmp_path / ("report-%02d.json" % h)))
    path = tmp_path / "fleet.yml"
    path.write_text(json.dumps(inventory))
    started = time.monotonic()
    try:
        proc = playbook(os.path.join(ROOT, "playbooks", "backup.yml"), inventory=str(path),
                        env={"ANSIBLE_FORKS": str(hosts)}, timeout=1800)
        wall = time.monotonic() - started
        records = []
        for name in os.listdir(tmp_path):
            if name.startswith("report-"):
                records += json.loads((tmp_path / name).read_text())
    finally:
        remove_images(lab, images)
    assert "FAILED - RETRYING" not in proc.stdout
    assert len(records) == disks and all(r["ok"] for r in records), [r["line"] for r in records if not r["ok"]]
    intervals = [(r["transfer_slot"]["acquired_at"], r["transfer_slot"]["released_at"]) for r in records]
    bound = sum(end - start for start, end in intervals) / cap  # the slots alone, end to end
    return wall, peak(intervals), len(inventory["rbd_backup"]["hosts"]), bound


def test_a_fleet_of_16_hosts_never_exceeds_the_transfer_cap(lab, tmp_path_factory):
    cap = 3
    lines = []
    for disks in (8, 32, 64):
        wall, top, hosts, bound = run_fleet(lab, tmp_path_factory.mktemp("fleet%d" % disks), disks, cap=cap)
        lines.append("%2d disks on %d hosts: %6.1f s wall (the %d slots busy end to end: %5.1f s), peak %d "
                     "concurrent transfers (cap %d)" % (disks, hosts, wall, cap, bound, top, cap))
        assert 1 <= top <= cap, lines[-1]
        if disks == 64:  # 32 transfers of 2 s at least wanting 3 slots: the cap is reached, not just respected
            assert top == cap, lines[-1]
    print("\n" + "\n".join(lines))
