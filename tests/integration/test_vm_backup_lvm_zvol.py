"""Role vm_backup with a VM's LVM and zvol disks, in the lab VM (issue 11): all real.

Inside the lab VM, libvirtd runs a tiny TCG domain (32 MiB, no OS: it sits in SeaBIOS, which is
"running" and never writes its disks) with three disks: a thin LV of labvg/pool, a classic LV of
labvg and a zvol of labzpool, each full of random data.  No guest agent: vm_backup_freeze_mode is
suspend.  Two runs with writes (by the lab VM, dd) between them: one suspend per run, every snapshot
created inside the window the role reports, the domain running again after, each point restored by
qcow2_chain_restore sha256-equal to the disk at backup time, the second run incremental (thin_delta,
zfs send records; the classic one by digest scan), and of ours only the thin and zvol bases left.
Then a real fault: the zvol's chain directory made immutable (chattr +i), its transfer fails: the
domain is resumed, the new snapshots are gone, the bases and the existing points are intact.
"""

import datetime
import json
import uuid

import pytest

MIB = 1 << 20
SIZE = 16 * MIB
DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disks}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""
DISK_XML = ("<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            "<source dev='{dev}'/><target dev='{target}' bus='virtio'/></disk>")


@pytest.fixture(scope="module")
def guest(labvm):
    tag = uuid.uuid4().hex[:6]
    name = "vmf-" + tag
    thin, classic, zvol = "vmf-thin-" + tag, "vmf-classic-" + tag, "%s/vmf-%s" % (labvm.zpool, tag)
    devs = dict(vda="/dev/%s/%s" % (labvm.vg, thin), vdb="/dev/%s/%s" % (labvm.vg, classic),
                vdc="/dev/zvol/" + zvol)
    labvm.sh("lvcreate -q -V 16M -T {vg}/{pool} -n {t} && lvcreate -q -L 16M -n {c} {vg} && zfs create -V 16M {z} "
             "&& udevadm settle && for d in {devs}; do dd if=/dev/urandom of=$d bs=1M count=16 oflag=direct "
             "status=none; done".format(vg=labvm.vg, pool=labvm.pool, t=thin, c=classic, z=zvol,
                                        devs=" ".join(devs.values())))
    xml = DOMAIN_XML.format(name=name, disks="\n    ".join(DISK_XML.format(dev=d, target=t) for t, d in devs.items()))
    labvm.ssh(["sh", "-c", "cat > /var/lib/labvm/%s.xml" % name], input_=xml)
    labvm.ssh(["virsh", "define", "/var/lib/labvm/%s.xml" % name], timeout=600)
    labvm.ssh(["virsh", "start", name], timeout=600)
    try:
        yield dict(name=name, thin=thin, classic=classic, zvol=zvol, devs=devs, repo="/var/lib/labvm/repo-" + name)
    finally:
        labvm.ssh(["virsh", "destroy", name], check=False)
        labvm.ssh(["virsh", "undefine", name], check=False)
        labvm.sh("chattr -R -i /var/lib/labvm/repo-{n} 2>/dev/null; rm -rf /var/lib/labvm/repo-{n}; "
                 "for lv in $(lvs --noheadings -o lv_name -S 'origin={t} || origin={c}' {vg}); do "
                 "lvremove -q -y {vg}/$lv; done; lvremove -q -y {vg}/{t} {vg}/{c}; zfs destroy -r {z}"
                 .format(n=name, vg=labvm.vg, t=thin, c=classic, z=zvol), check=False)


def sha256(labvm, path):
    return labvm.ssh(["sha256sum", path]).stdout.split()[0]


def run_role(labvm, guest, expect_rc=0):
    report = "/var/lib/labvm/report-%s.json" % guest["name"]
    labvm.ssh(["rm", "-f", report])
    task = {"name": "Back up the guest", "ansible.builtin.include_role": {"name": "snapchain.vmbackup.vm_backup"},
            "vars": dict(vm_backup_domains=[guest["name"]], vm_backup_repository=guest["repo"],
                         vm_backup_freeze_mode="suspend", vm_backup_on_freeze_failure="fail",
                         vm_backup_max_frozen_seconds=600, vm_backup_report=report, vm_backup_progress_interval=2,
                         vm_backup_poll_interval=1)}
    rc, results = labvm.playbook([task], timeout=1800)
    assert rc == expect_rc, json.dumps([r for r in results if r.get("failed")], indent=1)[:4000]
    (vm,) = json.loads(labvm.ssh(["cat", report]).stdout)
    return vm, results


def snapshots(labvm, guest):
    lvs = sorted("%s/%s" % (labvm.vg, n) for n, row in labvm.lvs().items()
                 if row["origin"] in (guest["thin"], guest["classic"]))
    zfs = labvm.ssh(["zfs", "list", "-H", "-p", "-o", "name", "-t", "snapshot", guest["zvol"]]).stdout.split()
    return sorted(lvs + zfs)


def chain(guest, target):
    disk = dict(vda="lvm/labvm/labvg/" + guest["thin"], vdb="lvm/labvm/labvg/" + guest["classic"],
                vdc="zvol/labvm/" + guest["zvol"])[target]
    return "%s/ceph/%s" % (guest["repo"], disk)


def manifest(labvm, guest, target):
    return json.loads(labvm.ssh(["cat", chain(guest, target) + "/manifest.json"]).stdout)


def assert_one_suspend_and_window(vm, results, guest):
    freezes = [r for r in results if r["_task"].endswith("Freeze " + guest["name"]) and r["_status"] == "ok"]
    thaws = [r for r in results if r["_task"].endswith("Thaw " + guest["name"]) and r["_status"] == "ok"]
    assert len(freezes) == 1 and len(thaws) == 1, [r["_task"] for r in results]
    assert freezes[0]["mode"] == "suspend" and vm["frozen_ms"] is not None, freezes[0]
    start = datetime.datetime.strptime(vm["frozen_at"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    end = start + datetime.timedelta(milliseconds=vm["frozen_ms"], seconds=1)
    times = [datetime.datetime.strptime(s["time"], "%Y-%m-%d %H:%M:%S %z") for s in vm["lvm_snapshots"]]
    times += [datetime.datetime.fromtimestamp(s["creation"], datetime.timezone.utc) for s in vm["zvol_snapshots"]]
    assert len(times) == 3
    for when in times:
        assert start <= when <= end, (when, vm["frozen_at"], vm["frozen_ms"])


def test_lvm_and_zvol_disks_in_one_suspend_incremental_and_restored(labvm, guest):
    name = guest["name"]
    taken = []
    for run in (1, 2):
        if run == 2:  # the lab VM writes to every disk between the runs (the guest itself never does)
            labvm.sh("for d in %s; do dd if=/dev/urandom of=$d bs=64k count=4 seek=37 oflag=direct status=none; done"
                     % " ".join(guest["devs"].values()))
        expected = dict((t, sha256(labvm, d)) for t, d in guest["devs"].items())
        vm, results = run_role(labvm, guest)
        assert vm["error"] == "" and vm["consistency"] == "crash" and sorted(vm["disks"]) == ["vda", "vdb", "vdc"]
        assert vm["skipped_disks"] == [] and len(set(vm["points"])) == 1, vm
        assert_one_suspend_and_window(vm, results, guest)
        assert labvm.ssh(["virsh", "domstate", name]).stdout.strip() == "running"
        point = vm["points"][0]
        assert point == vm["snapshot"][len("snapchain-"):]
        taken.append((point, expected))
        # of ours only the bases: the thin LV's and the zvol's snapshot of this run
        bases = ["%s/%s" % (labvm.vg, vm["snapshot"]), "%s@%s" % (guest["zvol"], vm["snapshot"])]
        assert snapshots(labvm, guest) == sorted(bases) and sorted(vm["kept_snapshots"]) == sorted(bases)
        assert any(r.startswith("%s/snapchain-" % labvm.vg) for r in vm["removed_snapshots"]), vm
        for target in ("vda", "vdb", "vdc"):
            doc = manifest(labvm, guest, target)
            assert [p["name"] for p in doc["points"]][-1] == point
            assert labvm.ssh(["test", "-s", "%s/%s.domain.xml" % (chain(guest, target), point)]).returncode == 0
    # the second run was incremental: a point on the first, little written (4 blocks of 64 KiB changed)
    for target in ("vda", "vdb", "vdc"):
        first, second = manifest(labvm, guest, target)["points"]
        assert second["parent"] == first["name"], second
        assert 0 < second["bytes_written"] <= 2 * MIB, (target, second)
    # every point restored by qcow2_chain_restore equals its disk at backup time
    tasks = []
    for point, _expected in taken:
        for target in ("vda", "vdb", "vdc"):
            tasks.append({"snapchain.vmbackup.qcow2_chain_restore": dict(
                chain=chain(guest, target), point=point, file="/var/lib/labvm/restore-%s-%s.raw" % (point, target))})
    rc, results = labvm.playbook(tasks)
    assert rc == 0, json.dumps([r for r in results if r.get("failed")], indent=1)[:3000]
    for point, expected in taken:
        for target in ("vda", "vdb", "vdc"):
            assert sha256(labvm, "/var/lib/labvm/restore-%s-%s.raw" % (point, target)) == expected[target], (point, target)
    labvm.sh("rm -f /var/lib/labvm/restore-*")

    # a real fault: the zvol's chain directory is immutable, its transfer fails
    before = snapshots(labvm, guest)
    points = dict((t, manifest(labvm, guest, t)["points"]) for t in ("vda", "vdb", "vdc"))
    labvm.ssh(["chattr", "+i", chain(guest, "vdc")])
    try:
        vm, results = run_role(labvm, guest, expect_rc=2)
    finally:
        labvm.ssh(["chattr", "-i", chain(guest, "vdc")])
    assert vm["error"] and labvm.ssh(["virsh", "domstate", name]).stdout.strip() == "running", vm
    assert len([r for r in results if r["_task"].endswith("Thaw " + name) and r["_status"] == "ok"]) == 1
    assert manifest(labvm, guest, "vdc")["points"] == points["vdc"]
    # the zvol's new snapshot destroyed (its old base kept); the LVs got their points, the thin one is the new base
    new_thin = "%s/%s" % (labvm.vg, vm["snapshot"])
    assert "%s@%s" % (guest["zvol"], vm["snapshot"]) in vm["removed_snapshots"], vm
    assert snapshots(labvm, guest) == sorted([new_thin] + [s for s in before if "@" in s]), vm
