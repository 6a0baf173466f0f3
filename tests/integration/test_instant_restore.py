"""instant_restore against a real TCG guest backed up by the vm_backup role.

ONE guest boot: the original VM (two RBD disks, vda ext4, vdb random data with a marker) is only
DEFINED, and backed up shut off by playbooks/vm_backup.yml; the clone booted from the backup chains
(playbooks/instant_restore.yml) is the only guest that runs.  Checked: the clone reaches its agent and
prints SNAPCHAIN-GUEST-READY into its own console log, its disks are overlays backed by the point's
layers and read as the backed-up data, every repository file is byte-identical after boot and
teardown, absent removes domain and overlays and is idempotent.  Then define_only: a point restored
to a raw file by qcow2_chain_restore, defined under a new name with an RBD disk beside it.
"""

import base64
import json
import os
import subprocess
import time
import uuid

import libvirt
import pytest

import guest as guestlib
import module_runner
from ansible_runner import ROOT, playbook
from guest_fixtures import BOOT_TIMEOUT, two_rbd_disks
from shas import sha256_file

MARKER = b"SNAPCHAIN-INSTANT-MARKER-0123456789"
MARKER_OFFSET = 20 << 20


def tree_digests(directories):
    out = {}
    for directory in directories:
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if os.path.isfile(path):
                st = os.stat(path)
                out[path] = (sha256_file(path), st.st_size, st.st_mtime_ns)
    return out


def own_ceph_secret(conn, client, key):
    """An ephemeral ceph secret of this test only (the shared "snaptest client.*" one may belong to
    another lab using the same libvirtd)."""
    usage = "snaptest-ir %s" % uuid.uuid4().hex[:8]
    secret = conn.secretDefineXML("<secret ephemeral='yes' private='yes'><usage type='ceph'><name>%s</name></usage>"
                                  "</secret>" % usage)
    secret.setValue(base64.b64decode(key))
    return secret


@pytest.fixture(scope="module")
def backed_up_vm(lab, libvirt_conn, guest_image, tmp_path_factory):
    """A defined (never started) two-RBD-disk VM, backed up once by the vm_backup role."""
    name = "snaptest-irsrc-" + uuid.uuid4().hex[:6]
    work = tmp_path_factory.mktemp("ir")
    images = two_rbd_disks(lab, name, work, marker=(MARKER_OFFSET, MARKER))
    secret = own_ceph_secret(libvirt_conn, lab.backup_client,
                             guestlib.read_keyring_key(lab.backup_keyring, lab.backup_client))
    disks = [guestlib.rbd_disk("%s/%s" % (lab.pool, image), lab.mon_addr, user=lab.backup_client,
                               secret_uuid=secret.UUIDString(), dev=dev) for image, dev in zip(images, ("vda", "vdb"))]
    xml = guestlib.domain_xml(name, guest_image["kernel"], guest_image["initrd"], disks=disks, agent=True,
                              serial_log=str(work / "original.serial.log"))
    started = time.monotonic()
    libvirt_conn.defineXML(xml)
    define_seconds = time.monotonic() - started
    try:
        inventory = work / "inventory.yml"
        inventory.write_text("hypervisors:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
        report = work / "report.json"
        variables = dict(
            vm_backup_domains=[name], vm_backup_repository=str(work / "repo"), vm_backup_uri=lab.libvirt_uri,
            vm_backup_ceph_conf=lab.ceph_conf, vm_backup_ceph_client=lab.backup_client,
            vm_backup_keyring=lab.backup_keyring, vm_backup_freeze_state_dir=str(work / "run"),
            vm_backup_report=str(report))
        started = time.monotonic()
        playbook(os.path.join(ROOT, "playbooks", "vm_backup.yml"), variables, inventory=str(inventory))
        backup_seconds = time.monotonic() - started
        (vm,) = json.loads(report.read_text())
        assert vm["error"] == "" and len(vm["points"]) == 2, vm
        chains = dict((dev, str(work / "repo" / "ceph" / lab.pool / image))
                      for dev, image in zip(("vda", "vdb"), images))
        print("\n%s: define %.1fs, vm_backup (shut off) %.1fs" % (name, define_seconds, backup_seconds))
        yield dict(name=name, images=images, chains=chains, work=work, inventory=inventory, snapshot=vm["snapshot"])
    finally:
        guestlib.destroy(libvirt_conn, name, quiet=True)
        try:
            libvirt_conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass
        try:
            secret.undefine()
        except libvirt.libvirtError:
            pass
        for image in images:
            lab.rbd("snap", "purge", "%s/%s" % (lab.pool, image), check=False)
            lab.rbd("rm", "%s/%s" % (lab.pool, image), check=False)


def run_instant(lab, vm, result, **variables):
    variables = dict(variables, instant_restore_uri=lab.libvirt_uri, instant_restore_result=str(result))
    playbook(os.path.join(ROOT, "playbooks", "instant_restore.yml"), variables, inventory=str(vm["inventory"]))
    return json.loads(result.read_text())


def wait_ready(conn, name, console_log, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dom = conn.lookupByName(name)
        try:
            with open(console_log, errors="replace") as fh:
                ready = guestlib.READY_LINE in fh.read()
        except OSError:
            ready = False
        if ready and guestlib.agent_ping(dom, timeout=5):
            return
        time.sleep(2)
    raise AssertionError("clone %s not ready within %ss; console:\n%s" % (name, timeout, open(console_log).read()))


def test_boot_from_backup_and_tear_down(lab, libvirt_conn, backed_up_vm, tmp_path):
    vm = backed_up_vm
    chains = vm["chains"]
    before = tree_digests(chains.values())
    manifest = json.loads(open(os.path.join(chains["vda"], "manifest.json")).read())
    (point,) = manifest["points"]
    name = "snaptest-ir-" + uuid.uuid4().hex[:6]
    scratch = tmp_path / "scratch"
    try:
        started = time.monotonic()
        out = run_instant(lab, vm, tmp_path / "present.json", instant_restore_name=name,
                          instant_restore_disks=[dict(target=t, chain=c) for t, c in sorted(chains.items())],
                          instant_restore_scratch_dir=str(scratch), instant_restore_network="none")
        assert out["changed"] and out["point"] == point["name"] and out["started"] and not out["persistent"]
        assert out["dropped_disks"] == [] and out["original_name"] == vm["name"]
        wait_ready(libvirt_conn, name, out["console_log"], BOOT_TIMEOUT)
        boot_seconds = time.monotonic() - started
        dom = libvirt_conn.lookupByName(name)
        assert dom.UUIDString() == out["uuid"] and not dom.isPersistent()
        assert dom.UUIDString() != libvirt_conn.lookupByName(vm["name"]).UUIDString()
        # the clone's disks are the overlays, each backed by its point's layer in the repository
        live = dict((d["target"], d) for d in guestlib_disks(dom))
        for target, chain in chains.items():
            overlay = str(scratch / ("%s.%s.overlay.qcow2" % (name, target)))
            assert live[target]["path"] == overlay and live[target]["format"] == "qcow2"
            assert out["overlays"][target] == overlay
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay], check=True,
                                             capture_output=True, text=True).stdout)
            assert info["backing-filename"] == os.path.join(chain, point["name"] + ".qcow2")
            assert info["backing-filename-format"] == "qcow2"
        # the data disk reads, through the overlay, as the backed-up image (marker included)
        data = tmp_path / "vdb.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", out["overlays"]["vdb"], str(data)], check=True)
        with open(data, "rb") as fh:
            fh.seek(MARKER_OFFSET)
            assert fh.read(len(MARKER)) == MARKER
        exported = tmp_path / "vdb.export"
        lab.rbd("export", "%s/%s@%s" % (lab.pool, vm["images"][1], vm["snapshot"]), str(exported))
        assert sha256_file(data) == sha256_file(exported)
        # the guest mounted vda (ext4) read-write: its writes went into the overlay
        assert "cannot mount /dev/vda" not in open(out["console_log"], errors="replace").read()
        print("\n%s: instant_restore to guest agent %.1fs" % (name, boot_seconds))
    finally:
        started = time.monotonic()
        gone = run_instant(lab, vm, tmp_path / "absent.json", instant_restore_name=name,
                           instant_restore_state="absent", instant_restore_scratch_dir=str(scratch))
        print("absent %.1fs" % (time.monotonic() - started))
    assert gone["changed"] and gone["destroyed"]
    assert sorted(gone["removed_files"]) == sorted(list(out["overlays"].values()) + [out["console_log"]])
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
    assert os.listdir(scratch) == []
    again = run_instant(lab, vm, tmp_path / "absent2.json", instant_restore_name=name,
                        instant_restore_state="absent", instant_restore_scratch_dir=str(scratch))
    assert not again["changed"] and again["removed_files"] == []
    # not one byte of the repository changed (content, size, mtime)
    assert tree_digests(chains.values()) == before


def guestlib_disks(dom):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
    return _libvirt.disks(dom.XMLDesc(0))


def test_refusals(lab, backed_up_vm, tmp_path):
    vm = backed_up_vm
    base = dict(name=vm["name"], uri=lab.libvirt_uri, scratch_dir=str(tmp_path),
                disks=[dict(target="vda", chain=vm["chains"]["vda"])])
    res = module_runner.run("instant_restore", base, expect_failed=True)
    assert "not made by instant_restore" in res["msg"]
    res = module_runner.run("instant_restore", dict(base, name="snaptest-ir-x", point="20200101T000000Z"),
                            expect_failed=True)
    assert "no point" in res["msg"]
    res = module_runner.run("instant_restore", dict(base, name="snaptest-ir-x", scratch_dir=vm["chains"]["vda"]),
                            expect_failed=True)
    assert "inside the repository" in res["msg"]
    res = module_runner.run("instant_restore", dict(base, name="snaptest-ir-x"), check_mode=True)
    assert res["changed"] and "snaptest-ir-x.vda.overlay.qcow2" in res["xml"] and os.listdir(tmp_path) == []
    res = module_runner.run("instant_restore", dict(base, name="snaptest-ir-x", state="absent"))
    assert not res["changed"]


def test_instant_restore_playbook_under_check_and_diff_boots_nothing(lab, libvirt_conn, backed_up_vm, tmp_path):
    vm = backed_up_vm
    name = "snaptest-ir-" + uuid.uuid4().hex[:6]
    before = tree_digests(vm["chains"].values())
    proc = playbook(os.path.join(ROOT, "playbooks", "instant_restore.yml"), dict(
        instant_restore_uri=lab.libvirt_uri, instant_restore_name=name,
        instant_restore_disks=[dict(target=t, chain=c) for t, c in sorted(vm["chains"].items())],
        instant_restore_scratch_dir=str(tmp_path / "scratch"), instant_restore_network="none"),
        inventory=str(vm["inventory"]), check=True, diff=True)
    assert "changed: [" in proc.stdout  # it says it would boot the clone
    assert name not in [d.name() for d in libvirt_conn.listAllDomains()]
    assert not (tmp_path / "scratch").exists() and tree_digests(vm["chains"].values()) == before


def test_define_only_on_restored_disks(lab, libvirt_conn, backed_up_vm, tmp_path):
    vm = backed_up_vm
    restored = tmp_path / "vda.raw"
    res = module_runner.run("qcow2_chain_restore", dict(chain=vm["chains"]["vda"], point="latest",
                                                        file=str(restored), format="raw"))
    assert res.get("changed"), res
    name = "snaptest-ir-def-" + uuid.uuid4().hex[:6]
    result = tmp_path / "define.json"
    rbd_target = "%s/%s" % (lab.pool, vm["images"][1])
    playbook("instant_define.yml", dict(
        ir_name=name, ir_uri=lab.libvirt_uri, ir_result=str(result),
        ir_disks=[dict(target="vda", chain=vm["chains"]["vda"])],
        ir_disk_paths=dict(vda=str(restored), vdb=rbd_target)))
    out = json.loads(result.read_text())
    assert out["defined"]["changed"] and out["defined"]["persistent"] and not out["defined"]["started"]
    assert not out["again"]["changed"]
    assert out["removed"]["changed"] and out["removed"]["undefined"]
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as _libvirt
    import xml.etree.ElementTree as ET
    root = ET.fromstring(out["xml"])
    assert root.findtext("name") == name
    assert root.findtext("uuid") != libvirt_conn.lookupByName(vm["name"]).UUIDString()
    disks = dict((d["target"], d) for d in _libvirt.disks(out["xml"]))
    assert disks["vda"]["type"] == "file" and disks["vda"]["path"] == str(restored) and disks["vda"]["format"] == "raw"
    assert disks["vdb"]["rbd"]["image"] == vm["images"][1]
    assert disks["vdb"]["rbd"]["auth"]["username"] == lab.backup_client
    assert [h["name"] for h in disks["vdb"]["rbd"]["hosts"]] == [lab.mon_addr.rsplit(":", 1)[0]]
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
