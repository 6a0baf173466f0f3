# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_instant: rewriting a saved domain XML into a clone (pure), disk_paths specs, metadata."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import instant as _instant
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as lv
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError, NotFoundError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "libvirt")

NET_XML = """<domain type='kvm' id='3'>
  <name>db1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os><type arch='x86_64'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/db1'/>
      <backingStore/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source bridge='br0'/>
      <target dev='vnet4'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source network='default'/>
      <alias name='ua-backend'/>
    </interface>
    <serial type='file'><source path='/var/log/db1.serial.log'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/db1.serial.log'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/3-db1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


def fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def overlay(path):
    return dict(kind="file", path=path, format="qcow2")


def disks_of(xml_text):
    return dict((d["target"], d) for d in lv.disks(xml_text))


def test_rbd_disk_onto_overlay_and_the_rest_dropped():
    text, info = _instant.rewrite_xml(fixture("rbd.xml"), "web1-ir", {"vda": overlay("/scratch/web1-ir.vda.overlay.qcow2")})
    root = ET.fromstring(text)
    assert root.findtext("name") == "web1-ir" and root.find("uuid") is None and "id" not in root.attrib
    disks = disks_of(text)
    assert list(disks) == ["vda"]
    vda = disks["vda"]
    assert vda["type"] == "file" and vda["path"] == "/scratch/web1-ir.vda.overlay.qcow2" and vda["format"] == "qcow2"
    elem = root.find("./devices/disk")
    assert elem.find("auth") is None and elem.find("source/host") is None and elem.find("source/auth") is None
    assert elem.find("driver").get("cache") == "none"  # other driver attributes are kept
    assert elem.findtext("serial") == "web1-root"
    assert elem.find("alias") is None  # libvirt-made aliases go
    assert info["original_name"] == "web1" and info["replaced_disks"] == ["vda"]
    assert [(d["target"], d["device"], d["source"]) for d in info["dropped_disks"]] == [
        ("vdb", "disk", "rbd:volumes/volume-99ed8dd7-646e-4364-97a1-8cf5f11f5629"),
        ("vdc", "disk", "rbd:golden/centos9@base"),
        ("sda", "cdrom", "/var/lib/libvirt/images/debian-12.iso")]
    # the live channel socket path is not copied (libvirt makes one per domain)
    assert root.find("./devices/channel/source") is None


def test_disk_level_auth_and_shareable_removed_keep_other_disks():
    text, info = _instant.rewrite_xml(fixture("rbd.xml"), "c", {"vdb": overlay("/s/c.vdb.overlay.qcow2")},
                                      keep_other_disks=True)
    assert info["dropped_disks"] == []
    root = ET.fromstring(text)
    vdb = [d for d in root.findall("./devices/disk") if d.find("target").get("dev") == "vdb"][0]
    assert vdb.find("auth") is None and vdb.find("shareable") is None and vdb.find("source/config") is None
    assert disks_of(text)["vda"]["rbd"]["image"] == "web1-disk0"  # kept as it was


def test_block_disk_interfaces_consoles_nvram_metadata():
    meta = dict(mode="overlay", point="20261122T031500Z", scratch_dir="/s", files=["/s/x.sda.overlay.qcow2"])
    text, info = _instant.rewrite_xml(NET_XML, "x", {"sda": overlay("/s/x.sda.overlay.qcow2")},
                                      console_log="/s/x.console.log", metadata=meta)
    root = ET.fromstring(text)
    sda = root.find("./devices/disk")
    assert sda.get("type") == "file" and sda.find("source").attrib == {"file": "/s/x.sda.overlay.qcow2"}
    assert sda.find("driver").get("type") == "qcow2" and sda.find("backingStore") is None
    ifaces = root.findall("./devices/interface")
    assert len(ifaces) == 2 and all(i.find("mac") is None for i in ifaces) and info["dropped_macs"] == 2
    assert ifaces[0].find("target") is None and ifaces[0].find("alias") is None
    assert ifaces[1].find("alias").get("name") == "ua-backend"  # user aliases stay
    assert [s.get("path") for s in root.findall("./devices/*/source[@path]")] == ["/s/x.console.log"] * 2
    assert info["redirected_logs"] == ["/var/log/db1.serial.log"] * 2
    nvram = root.find("./os/nvram")
    assert not (nvram.text or "").strip() and nvram.get("template") == "/usr/share/OVMF/OVMF_VARS.fd"
    assert _instant.read_metadata(text) == meta
    assert _instant.read_metadata(NET_XML) is None


def test_network_none_drops_interfaces():
    text, info = _instant.rewrite_xml(NET_XML, "x", {"sda": overlay("/o")}, network="none")
    assert ET.fromstring(text).find("./devices/interface") is None and info["dropped_interfaces"] == 2


def test_unknown_target_and_bad_network_refused():
    with pytest.raises(InputError, match="no disk with target vdz"):
        _instant.rewrite_xml(fixture("rbd.xml"), "c", {"vdz": overlay("/o")})
    with pytest.raises(InputError, match="network"):
        _instant.rewrite_xml(NET_XML, "c", {}, network="bridge")
    with pytest.raises(InputError, match="not well-formed"):
        _instant.rewrite_xml("<domain>", "c", {})


def test_define_onto_rbd_copies_hosts_and_auth():
    spec = _instant.disk_spec("rbd:vms/tenant-a/web1-restored")
    assert spec == dict(kind="rbd", name="vms/tenant-a/web1-restored", format="raw")
    text, _info = _instant.rewrite_xml(fixture("rbd.xml"), "web1-r", {"vda": spec})
    vda = disks_of(text)["vda"]
    assert vda["rbd"]["image"] == "web1-restored" and vda["rbd"]["namespace"] == "tenant-a"
    assert [h["name"] for h in vda["rbd"]["hosts"]] == ["10.0.0.1", "10.0.0.2", "ceph-mon-3.example.com"]
    assert vda["rbd"]["auth"]["secret_uuid"] == "3d5a5fe8-af8a-8739-f90f-ac54f21e1711"


def test_rbd_target_for_a_non_rbd_disk_borrows_the_first_rbd_disk():
    xml_text = fixture("rbd.xml")
    text, _info = _instant.rewrite_xml(xml_text, "w", {"sda": _instant.disk_spec("pool/img"),
                                                       "vda": overlay("/o")})
    sda = disks_of(text)["sda"]
    assert sda["rbd"]["pool"] == "pool" and sda["rbd"]["auth"]["username"] == "libvirt"
    with pytest.raises(InputError, match="no RBD disk"):
        _instant.rewrite_xml(NET_XML, "w", {"sda": _instant.disk_spec("pool/img")})


def test_disk_spec_paths(tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 1024)
    q = tmp_path / "d.qcow2"
    q.write_bytes(b"QFI\xfb" + b"\0" * 100)
    assert _instant.disk_spec(str(raw)) == dict(kind="file", path=str(raw), format="raw")
    assert _instant.disk_spec(str(q))["format"] == "qcow2"
    with pytest.raises(NotFoundError):
        _instant.disk_spec(str(tmp_path / "missing"))
    with pytest.raises(InputError):
        _instant.disk_spec(str(tmp_path))
    with pytest.raises(InputError):
        _instant.disk_spec("relative/path/too/deep/x")
    if os.path.exists("/dev/loop0"):
        assert _instant.disk_spec("/dev/loop0")["kind"] == "block"


def test_names():
    assert _instant.check_name("snaptest-ir-1.a_b") == "snaptest-ir-1.a_b"
    for bad in ("", "../x", "a/b", ".hidden", "x y"):
        with pytest.raises(InputError):
            _instant.check_name(bad)
    assert _instant.overlay_path("/s", "n", "vda") == "/s/n.vda.overlay.qcow2"


def test_present_refuses_scratch_inside_repository_and_transient_without_start(tmp_path):
    base = dict(name="c", disks=[dict(target="vda", chain=str(tmp_path))], point="latest")
    with pytest.raises(InputError, match="inside the repository"):
        _instant.present(dict(base, scratch_dir=str(tmp_path / "scratch")))
    with pytest.raises(InputError, match="transient"):
        _instant.present(dict(base, scratch_dir="/elsewhere", start=False, persistent=False))
    with pytest.raises(InputError, match="scratch_dir is required"):
        _instant.present(base)
    with pytest.raises(InputError, match="disk_paths"):
        _instant.present(dict(base, define_only=True))
