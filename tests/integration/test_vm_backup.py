"""Role vm_backup against a real TCG guest whose two disks are RBD images of the lab cluster.

One freeze for both disks: both snapshots carry the same name and were created inside the
freeze window reported by virsh_freeze; the guest is thawed afterwards; each chain's point
restores (plain `qemu-img convert`) to exactly `rbd export` of its snapshot; the domain XML
is saved beside each point.
"""

import datetime
import json
import os
import subprocess
import uuid

import libvirt
import libvirt_qemu
import pytest

import guest as guestlib
from ansible_runner import ROOT, playbook
from guest_fixtures import BOOT_TIMEOUT, two_rbd_disks
from shas import sha256_file


@pytest.fixture(scope="module")
def two_disk_guest(lab, libvirt_conn, guest_image, tmp_path_factory):
    name = "snaptest-vm-" + uuid.uuid4().hex[:6]
    work = tmp_path_factory.mktemp("vm")
    images = two_rbd_disks(lab, name, work)
    secret = guestlib.define_ceph_secret(libvirt_conn, lab.backup_client,
                                         guestlib.read_keyring_key(lab.backup_keyring, lab.backup_client))
    disks = [guestlib.rbd_disk("%s/%s" % (lab.pool, image), lab.mon_addr, user=lab.backup_client,
                               secret_uuid=secret, dev=dev) for image, dev in zip(images, ("vda", "vdb"))]
    try:
        info = guestlib.boot(libvirt_conn, name, guest_image["kernel"], guest_image["initrd"], disks=disks,
                             agent=True, timeout=BOOT_TIMEOUT)
        yield dict(name=name, images=images, dom=libvirt_conn.lookupByName(name), info=info)
    finally:
        guestlib.destroy(libvirt_conn, name, quiet=True)
        for image in images:
            lab.rbd("snap", "purge", "%s/%s" % (lab.pool, image), check=False)
            lab.rbd("rm", "%s/%s" % (lab.pool, image), check=False)


def agent(dom, command):
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command}), 10, 0))["return"]


def run_role(lab, tmp_path, guest, **extra):
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("hypervisors:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    report = tmp_path / "report.json"
    variables = dict(
        vm_backup_domains=[guest["name"]], vm_backup_repository=str(tmp_path / "repo"),
        vm_backup_ceph_conf=lab.ceph_conf, vm_backup_ceph_client=lab.backup_client,
        vm_backup_keyring=lab.backup_keyring, vm_backup_freeze_mode="agent", vm_backup_on_freeze_failure="fail",
        vm_backup_max_frozen_seconds=120, vm_backup_freeze_state_dir=str(tmp_path / "run"),
        vm_backup_report=str(report), vm_backup_progress_dir=str(tmp_path / "progress"),
        vm_backup_progress_interval=1, vm_backup_poll_interval=1)
    variables.update(extra)
    proc = playbook(os.path.join(ROOT, "playbooks", "vm_backup.yml"), variables, inventory=str(inventory))
    return proc, json.loads(report.read_text())


def parse_utc(text):
    return datetime.datetime.strptime(text.replace("Z", "+0000").split(".")[0] + "+0000"
                                      if "." in text else text.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z")


def test_one_freeze_for_all_disks_and_chains_restore(lab, two_disk_guest, tmp_path):
    guest = two_disk_guest
    proc, report = run_role(lab, tmp_path, guest)
    (vm,) = report
    assert vm["vm"] == guest["name"] and vm["error"] == ""
    assert vm["consistency"] == "application", vm
    assert len(vm["points"]) == 2 and sorted(vm["disks"]) == ["vda", "vdb"]
    assert "frozen" in proc.stdout and vm["frozen_ms"] is not None and vm["frozen_ms"] < 120000
    # both snapshots inside the one freeze window (Ceph timestamps have one-second resolution)
    start = parse_utc(vm["frozen_at"]).replace(microsecond=0)
    end = start + datetime.timedelta(milliseconds=vm["frozen_ms"], seconds=1)
    assert len(vm["snapshot_times"]) == 2
    for stamp in vm["snapshot_times"]:
        assert start <= parse_utc(stamp) <= end, (stamp, vm["frozen_at"], vm["frozen_ms"])
    # the guest was thawed
    assert agent(guest["dom"], "guest-fsfreeze-status") == "thawed"
    # each chain restores to its snapshot
    for image in guest["images"]:
        chain = tmp_path / "repo" / "ceph" / lab.pool / image
        manifest = json.loads((chain / "manifest.json").read_text())
        (point,) = manifest["points"]
        assert point["snapshot"] == vm["snapshot"]
        out = tmp_path / (image + ".raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(chain / point["layer"]), str(out)], check=True)
        exported = tmp_path / (image + ".export")
        lab.rbd("export", "%s/%s@%s" % (lab.pool, image, vm["snapshot"]), str(exported))
        assert sha256_file(out) == sha256_file(exported), image
        xml = (chain / (point["name"] + ".domain.xml")).read_text()
        assert "<name>%s</name>" % guest["name"] in xml and oct(os.stat(chain / (point["name"] + ".domain.xml")).st_mode & 0o777) == "0o600"
        # the run summary of the disk says how consistent the point is and how long the guest was frozen
        (run,) = [json.loads(p.read_text()) for p in (chain / "runs").iterdir()]
        assert run["state"] == "ok" and run["point"] == point["name"] and run["vm"] == guest["name"]
        assert run["consistency"] == "application" and run["freeze_seconds"] == vm["frozen_ms"] / 1000.0
    # the transfers were polled as async jobs without `until`
    assert "FAILED - RETRYING" not in proc.stdout and "Wait for the transfers of" in proc.stdout


def test_paused_guest_stays_paused_and_is_not_frozen(lab, two_disk_guest, tmp_path):
    dom = two_disk_guest["dom"]
    dom.suspend()
    try:
        _proc, report = run_role(lab, tmp_path, two_disk_guest)
        (vm,) = report
        assert vm["state"] == "paused" and vm["error"] == "" and len(vm["points"]) == 2
        assert vm["frozen_at"] is None
        assert dom.info()[0] == 3  # VIR_DOMAIN_PAUSED
    finally:
        dom.resume()


def restore_vm(lab, tmp_path, guest, expect_rc=0, **extra):
    inventory = tmp_path / "inventory-restore.yml"
    inventory.write_text("rbd_backup:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    variables = dict(restore_vm=guest["name"], restore_repository=str(tmp_path / "repo"),
                     restore_ceph_conf=lab.ceph_conf, restore_ceph_client=lab.backup_client,
                     restore_keyring=lab.backup_keyring)
    variables.update(extra)
    return playbook(os.path.join(ROOT, "playbooks", "restore.yml"), variables, inventory=str(inventory),
                    expect_rc=expect_rc)


def test_whole_vm_restore_every_disk_from_one_point_and_the_definition(lab, libvirt_conn, two_disk_guest, tmp_path):
    """restore.yml with restore_vm: both disks from the point of the one freeze into new images, byte-equal to
    the snapshots, and the saved definition defined under a new name on them.  A missing disk and existing
    images are refused before anything is written."""
    guest = two_disk_guest
    _proc, report = run_role(lab, tmp_path, guest)
    (vm,) = report
    new = guest["name"] + "-r"
    targets = ["%s-%s" % (new, dev) for dev in ("vda", "vdb")]

    def images():
        return set(lab.rbd("ls", lab.pool).stdout.split())

    # a disk without the point (its chain moved away): refused, nothing written
    vdb_chain = tmp_path / "repo" / "ceph" / lab.pool / guest["images"][1]
    vdb_chain.rename(str(vdb_chain) + ".away")
    proc = restore_vm(lab, tmp_path, guest, expect_rc=2, restore_vm_name=new)
    assert "disk vdb has no point %s" % vm["points"][0] in proc.stdout, proc.stdout
    assert not images() & set(targets) and libvirt_conn.listDefinedDomains().count(new) == 0
    os.rename(str(vdb_chain) + ".away", str(vdb_chain))

    try:
        proc = restore_vm(lab, tmp_path, guest, restore_vm_name=new)
        assert "Restored VM %s at point %s as %s" % (guest["name"], vm["points"][0], new) in proc.stdout
        for image, target in zip(guest["images"], targets):
            restored, exported = tmp_path / (target + ".raw"), tmp_path / (image + ".export")
            lab.rbd("export", "%s/%s" % (lab.pool, target), str(restored))
            lab.rbd("export", "%s/%s@%s" % (lab.pool, image, vm["snapshot"]), str(exported))
            assert sha256_file(restored) == sha256_file(exported), target
        dom = libvirt_conn.lookupByName(new)
        assert not dom.isActive() and dom.isPersistent() and dom.UUIDString() != guest["dom"].UUIDString()
        xml = dom.XMLDesc(0)
        assert all("%s/%s" % (lab.pool, t) in xml for t in targets)
        assert not any("%s/%s'" % (lab.pool, image) in xml or '%s/%s"' % (lab.pool, image) in xml
                       for image in guest["images"])
        # again: the images exist now, refused before anything is written
        proc = restore_vm(lab, tmp_path, guest, expect_rc=2, restore_vm_name=new + "2",
                          restore_vm_images=dict(vda=targets[0], vdb=targets[1]))
        assert "exist already" in proc.stdout and libvirt_conn.listDefinedDomains().count(new + "2") == 0
    finally:
        dom = libvirt_conn.lookupByName(new) if new in libvirt_conn.listDefinedDomains() else None
        if dom is not None:
            dom.undefine()
        for target in targets:
            lab.rbd("rm", "%s/%s" % (lab.pool, target), check=False)


def test_check_and_diff_mode_write_nothing_and_leave_the_guest_running(lab, two_disk_guest, tmp_path):
    guest = two_disk_guest
    snaps = dict((i, lab.rbd("snap", "ls", "%s/%s" % (lab.pool, i)).stdout) for i in guest["images"])
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("hypervisors:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    variables = dict(
        vm_backup_domains=[guest["name"]], vm_backup_repository=str(tmp_path / "repo"),
        vm_backup_ceph_conf=lab.ceph_conf, vm_backup_ceph_client=lab.backup_client,
        vm_backup_keyring=lab.backup_keyring, vm_backup_freeze_mode="agent", vm_backup_on_freeze_failure="fail",
        vm_backup_freeze_state_dir=str(tmp_path / "run"), vm_backup_report=str(tmp_path / "report.json"))
    proc = playbook(os.path.join(ROOT, "playbooks", "vm_backup.yml"), variables, inventory=str(inventory),
                    check=True, diff=True)
    assert "FAILED - RETRYING" not in proc.stdout
    assert not (tmp_path / "report.json").exists()
    assert not any(os.path.exists(os.path.join(d, "manifest.json")) for d, _s, _f in os.walk(str(tmp_path / "repo")))
    assert dict((i, lab.rbd("snap", "ls", "%s/%s" % (lab.pool, i)).stdout) for i in guest["images"]) == snaps
    assert guest["dom"].isActive() and agent(guest["dom"], "guest-fsfreeze-status") == "thawed"


def test_shut_off_guest_is_backed_up_without_freezing(lab, two_disk_guest, tmp_path):
    """Last in this module: it powers the guest off (the fixture only tears it down afterwards)."""
    dom = two_disk_guest["dom"]
    dom.destroy()
    _proc, report = run_role(lab, tmp_path, two_disk_guest)
    (vm,) = report
    assert vm["state"] == "shutoff" and vm["error"] == "" and len(vm["points"]) == 2
    assert vm["frozen_at"] is None and vm["consistency"] == "stopped"
    assert not dom.isActive()


def test_whole_vm_restore_in_place_rolls_the_vm_itself_back(lab, libvirt_conn, two_disk_guest, tmp_path):
    """restore.yml with restore_vm + restore_in_place: both disks of the (shut-off) VM rolled back into their own
    images, byte-equal to the point's snapshots, a safety snapshot of each kept, and the saved definition defined
    again (same UUID, the change made since gone).  A running domain is refused before anything is written.
    After test_shut_off_guest_is_backed_up_without_freezing: the guest is shut off."""
    guest = two_disk_guest
    dom = guest["dom"]
    if dom.isActive():
        dom.destroy()
    uuid_before = dom.UUIDString()
    _proc, report = run_role(lab, tmp_path, guest)
    (vm,) = report
    point = vm["points"][0]
    exported = {}
    for image in guest["images"]:
        exported[image] = tmp_path / (image + ".export")
        lab.rbd("export", "%s/%s@%s" % (lab.pool, image, vm["snapshot"]), str(exported[image]))
        # the disks change after the point...
        lab.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "4M", "--io-pattern", "rand",
                "%s/%s" % (lab.pool, image))
    # ... and so does the definition
    changed_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("</name>", "</name><description>changed since</description>", 1)
    libvirt_conn.defineXML(changed_xml)

    def snapshots(image):
        return json.loads(lab.rbd("snap", "ls", "--format", "json", "%s/%s" % (lab.pool, image)).stdout)

    before = dict((image, snapshots(image)) for image in guest["images"])
    dom.create()  # running: refused before anything is written
    try:
        proc = restore_vm(lab, tmp_path, guest, expect_rc=2, restore_in_place=True, restore_force=True)
        assert "is running: shut it down" in proc.stdout, proc.stdout[-3000:]
    finally:
        dom.destroy()
    assert dict((image, snapshots(image)) for image in guest["images"]) == before
    # without restore_force: refused by the role's own checks
    proc = restore_vm(lab, tmp_path, guest, expect_rc=2, restore_in_place=True)
    assert "set restore_force: true" in proc.stdout

    proc = restore_vm(lab, tmp_path, guest, restore_in_place=True, restore_force=True)
    assert "Rolled VM %s back in place to point %s" % (guest["name"], point) in proc.stdout, proc.stdout[-3000:]
    for image in guest["images"]:
        restored = tmp_path / (image + ".restored")
        lab.rbd("export", "%s/%s" % (lab.pool, image), str(restored))
        assert sha256_file(restored) == sha256_file(exported[image]), image
        safety = [s["name"] for s in snapshots(image) if s["name"] not in [b["name"] for b in before[image]]]
        assert len(safety) == 1 and safety[0].startswith("snapchain-safety-"), snapshots(image)
        assert "%s: state before the rollback kept in snapshot %s" % (
            dict(zip(guest["images"], ("vda", "vdb")))[image], safety[0]) in proc.stdout
    dom = libvirt_conn.lookupByName(guest["name"])
    assert dom.UUIDString() == uuid_before and not dom.isActive() and dom.isPersistent()
    assert "changed since" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    # again: the same rollback, the definition now unchanged
    proc = restore_vm(lab, tmp_path, guest, restore_in_place=True, restore_force=True)
    assert "definition unchanged" in proc.stdout
