# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_libvirt: domain XML → disks, backend classification, host probes, domain selection."""

from __future__ import annotations

import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains as lv
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "libvirt")


def fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def by_target(xml_name):
    return dict((d["target"], d) for d in lv.disks(fixture(xml_name)))


# --- XML parsing and classification ---------------------------------------------------------

def test_rbd_with_namespace_hosts_and_auth_in_source():
    vda = by_target("rbd.xml")["vda"]
    assert vda["backend"] == "rbd" and vda["backup"] is True
    assert vda["type"] == "network" and vda["format"] == "raw" and vda["bus"] == "virtio"
    assert vda["source"] == "rbd:vms/tenant-a/web1-disk0"
    assert vda["path"] is None and vda["serial"] == "web1-root"
    assert vda["rbd"] == dict(
        pool="vms", namespace="tenant-a", image="web1-disk0", snapshot=None, config_file=None,
        hosts=[dict(name="10.0.0.1", port=6789, transport=None), dict(name="10.0.0.2", port=6789, transport=None),
               dict(name="ceph-mon-3.example.com", port=None, transport=None)],
        auth=dict(username="libvirt", secret_type="ceph", secret_uuid="3d5a5fe8-af8a-8739-f90f-ac54f21e1711",
                  secret_usage=None))
    assert vda["confidence"] == "high" and vda["classified_by"] == "xml"
    assert all(vda[k] is None for k in ("lvm", "zvol", "file", "ploop", "network"))


def test_rbd_old_style_auth_shareable_config_and_snapshot():
    disks = by_target("rbd.xml")
    vdb = disks["vdb"]
    assert vdb["rbd"]["namespace"] is None and vdb["rbd"]["pool"] == "volumes"
    assert vdb["rbd"]["image"] == "volume-99ed8dd7-646e-4364-97a1-8cf5f11f5629"
    assert vdb["rbd"]["auth"] == dict(username="volumes", secret_type="ceph", secret_uuid=None,
                                      secret_usage="client.volumes secret")
    assert vdb["rbd"]["config_file"] == "/etc/ceph/other.conf"
    assert vdb["shareable"] is True and vdb["readonly"] is False
    vdc = disks["vdc"]
    assert (vdc["rbd"]["pool"], vdc["rbd"]["image"], vdc["rbd"]["snapshot"]) == ("golden", "centos9", "base")
    assert vdc["readonly"] is True and vdc["rbd"]["auth"] is None and vdc["notes"]


def test_cdrom_with_iso_is_flagged_not_dropped():
    sda = by_target("rbd.xml")["sda"]
    assert sda["device"] == "cdrom" and sda["backend"] == "file"
    assert sda["backup"] is False and sda["skip_reason"] == "cdrom"


def test_lvm_by_path():
    disks = by_target("lvm.xml")
    assert disks["vda"]["backend"] == "lvm" and disks["vda"]["lvm"] == dict(vg="vg0", lv="db2-root")
    assert disks["vda"]["classified_by"] == "path" and disks["vda"]["confidence"] == "low"
    # /dev/mapper names double the dashes inside VG and LV names.
    assert disks["vdb"]["backend"] == "lvm" and disks["vdb"]["lvm"] == dict(vg="vg-data", lv="db2-data")
    assert disks["sdb"]["backend"] == "block" and disks["sdb"]["lvm"] is None
    assert disks["sdc"]["backend"] == "block" and disks["sdc"]["device"] == "lun" and disks["sdc"]["backup"]


def test_zvol():
    disks = by_target("zvol.xml")
    assert disks["vda"]["backend"] == "zvol"
    assert disks["vda"]["zvol"] == dict(pool="tank", dataset="tank/vms/db1-disk0", device="/dev/zvol/tank/vms/db1-disk0")
    assert disks["vdb"]["backend"] == "zvol" and disks["vdb"]["zvol"]["device"] == "/dev/zd16"
    assert disks["vdb"]["zvol"]["dataset"] is None


def test_qcow2_with_backing_chain_raw_file_and_empty_drives():
    disks = by_target("qcow2_file.xml")
    vda = disks["vda"]
    assert vda["backend"] == "file" and vda["format"] == "qcow2" and vda["path"] == "/var/lib/libvirt/images/app1.qcow2"
    assert vda["file"]["backing_from"] == "xml"
    assert vda["file"]["backing_chain"] == [
        dict(path="/var/lib/libvirt/images/templates/debian12.qcow2", format="qcow2"),
        dict(path="/var/lib/libvirt/images/templates/debian12-base.raw", format="raw")]
    vdb = disks["vdb"]
    assert vdb["backend"] == "file" and vdb["format"] == "raw" and vdb["file"]["backing_chain"] == []
    assert vdb["file"]["backing_from"] is None
    assert disks["sda"]["backend"] == "none" and disks["sda"]["backup"] is False
    assert disks["sda"]["skip_reason"] == "cdrom (empty)" and disks["sda"]["source"] is None
    assert disks["fda"]["backup"] is False and disks["fda"]["skip_reason"] == "floppy"
    assert disks["vdc"]["backend"] == "none" and disks["vdc"]["skip_reason"] == "no source (empty drive)"


def test_ploop_layouts():
    disks = by_target("ploop.xml")
    assert [disks[t]["backend"] for t in ("sda", "sdb", "sdc")] == ["ploop"] * 3
    assert disks["sda"]["ploop"] == dict(
        image="/vz/vmprivate/5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716/harddisk.hdd",
        descriptor="/vz/vmprivate/5e4d3c2b-1a09-4f8e-9d7c-6b5a49382716/harddisk.hdd/DiskDescriptor.xml")
    assert disks["sda"]["classified_by"] == "xml"
    assert disks["sdb"]["ploop"]["descriptor"] == "/vz/private/101/root.hdd/DiskDescriptor.xml"
    assert disks["sdb"]["classified_by"] == "path"
    assert disks["sdc"]["ploop"] == dict(image="/dev/ploop12345p1", descriptor=None)


def test_unsupported_sources_are_flagged():
    disks = by_target("other.xml")
    assert disks["vda"]["backend"] == "network-other" and disks["vda"]["backup"] is False
    assert disks["vda"]["network"]["protocol"] == "iscsi" and disks["vda"]["network"]["hosts"][0]["port"] == 3260
    assert disks["vdb"]["backend"] == "other" and disks["vdb"]["source"] == "default/misc.qcow2"
    assert "storage pool volume" in disks["vdb"]["notes"][0] and disks["vdb"]["backup"] is False
    assert disks["hdb"]["backend"] == "other" and disks["hdb"]["backup"] is False
    assert disks["sdb"]["backend"] == "none" and disks["sdb"]["skip_reason"] == "cdrom (empty)"
    # An RBD name without a pool is not something we can back up.
    assert disks["vdc"]["backend"] == "network-other" and "pool/[namespace/]image" in disks["vdc"]["notes"][0]


def test_every_disk_has_every_key():
    keys = None
    for name in sorted(os.listdir(FIXTURES)):
        for disk in lv.disks(fixture(name)):
            assert disk["backend"] in lv.BACKENDS
            keys = keys or set(disk)
            assert set(disk) == keys, name


def test_agent_channel():
    assert lv.agent_channel(fixture("rbd.xml")) == "connected"
    assert lv.agent_channel(fixture("qcow2_file.xml")) == "disconnected"
    assert lv.agent_channel(fixture("lvm.xml")) == "configured"
    assert lv.agent_channel(fixture("zvol.xml")) is None


def test_malformed_xml():
    with pytest.raises(InputError, match="not well-formed"):
        lv.disks("<domain><devices>")


@pytest.mark.parametrize("name, expected", [
    ("rbd/img", ("rbd", None, "img", None)),
    ("rbd/ns/img", ("rbd", "ns", "img", None)),
    ("rbd/img@snap", ("rbd", None, "img", "snap")),
    ("rbd/ns/img@s@x", ("rbd", "ns", "img", "s@x")),
])
def test_parse_rbd_name(name, expected):
    assert lv.parse_rbd_name(name) == expected


@pytest.mark.parametrize("name", ["img", "/img", "rbd/", "rbd//img", "a/b/c/d", ""])
def test_parse_rbd_name_rejects(name):
    with pytest.raises(InputError):
        lv.parse_rbd_name(name)


@pytest.mark.parametrize("name, expected", [
    ("vg0-root", ("vg0", "root")),
    ("vg--data-db2--data", ("vg-data", "db2-data")),
    ("nodash", None),
    ("luks-0b6f0c37", ("luks", "0b6f0c37")),  # looks like LVM by name: only probes tell
])
def test_split_dm_name(name, expected):
    assert lv.split_dm_name(name) == expected


@pytest.mark.parametrize("state, reason, expected", [
    (1, 1, ("running", "booted")), (3, 1, ("paused", "user")), (3, 5, ("paused", "ioerror")),
    (3, 9, ("paused", "snapshot")), (5, 2, ("shutoff", "destroyed")), (7, 0, ("pmsuspended", "unknown")),
    (3, 99, ("paused", "reason-99")), (42, 0, ("state-42", "unknown")),
])
def test_state_name(state, reason, expected):
    assert lv.state_name(state, reason) == expected


# --- host probes (with canned data) ---------------------------------------------------------

LVS_REPORT = {"report": [{"lv": [
    {"vg_name": "vg0", "lv_name": "db2-root", "lv_path": "/dev/vg0/db2-root", "lv_dm_path": "/dev/mapper/vg0-db2--root",
     "lv_attr": "-wi-ao----", "lv_size": "10737418240", "pool_lv": "", "origin": ""},
    {"vg_name": "vg0", "lv_name": "thinpool", "lv_path": "", "lv_dm_path": "/dev/mapper/vg0-thinpool",
     "lv_attr": "twi-aotz--", "lv_size": "107374182400", "pool_lv": "", "origin": ""},
]}]}


def test_lvm_index_from_report():
    index = lv.lvm_index_from_report(LVS_REPORT, realpath=lambda p: {"/dev/vg0/db2-root": "/dev/dm-3"}.get(p, p))
    root = index["/dev/vg0/db2-root"]
    assert root == dict(vg="vg0", lv="db2-root", attr="-wi-ao----", size=10737418240, pool_lv=None, origin=None)
    assert index["/dev/mapper/vg0-db2--root"] is root and index["/dev/dm-3"] is root
    assert "/dev/mapper/vg0-thinpool" in index and "" not in index


def test_dm_info_reads_sysfs(tmp_path, monkeypatch):
    (tmp_path / "block" / "dm-3" / "dm").mkdir(parents=True)
    (tmp_path / "block" / "dm-3" / "dm" / "name").write_text("vg0-db2--root\n")
    (tmp_path / "block" / "dm-3" / "dm" / "uuid").write_text("LVM-abcdef\n")
    monkeypatch.setattr(lv.os.path, "realpath", lambda p: "/dev/dm-3" if p == "/dev/vg0/db2-root" else p)
    assert lv.dm_info("/dev/vg0/db2-root", sys_root=str(tmp_path)) == ("vg0-db2--root", "LVM-abcdef")
    assert lv.dm_info("/dev/sda", sys_root=str(tmp_path)) is None


def _block_disk(path):
    return lv.classify_path(dict(path=path, type="block", format="raw", zvol=None, lvm=None, notes=[], exists=True,
                                 backend=None, classified_by=None, confidence=None))


def test_refine_confirms_lvm_from_lvs(monkeypatch):
    monkeypatch.setattr(lv.os.path, "realpath", lambda p: p)
    disk = _block_disk("/dev/vg0/db2-root")
    lv._refine_block(disk, lv.lvm_index_from_report(LVS_REPORT, realpath=lambda p: p), None)
    assert (disk["backend"], disk["classified_by"], disk["confidence"]) == ("lvm", "lvs", "high")
    assert disk["lvm"]["size"] == 10737418240


def test_refine_corrects_a_dm_crypt_path(monkeypatch):
    monkeypatch.setattr(lv.os.path, "realpath", lambda p: p)
    monkeypatch.setattr(lv, "dm_info", lambda p: ("luks-0b6f", "CRYPT-LUKS2-0b6f"))
    disk = _block_disk("/dev/mapper/luks-0b6f")
    assert disk["backend"] == "lvm"
    lv._refine_block(disk, None, "lvs is not installed")
    assert disk["backend"] == "block" and disk["lvm"] is None and "not an LVM logical volume" in disk["notes"][0]


def test_refine_lvm_from_sysfs_without_lvs(monkeypatch):
    monkeypatch.setattr(lv.os.path, "realpath", lambda p: "/dev/dm-0")
    monkeypatch.setattr(lv, "dm_info", lambda p: ("vg--x-lv1", "LVM-123"))
    disk = _block_disk("/dev/disk/by-id/dm-name-vg--x-lv1")
    lv._refine_block(disk, None, "lvs is not installed: LVM classified by path only")
    assert disk["backend"] == "lvm" and disk["lvm"] == dict(vg="vg-x", lv="lv1") and disk["classified_by"] == "sysfs"


def test_refine_zvol_behind_a_symlink(monkeypatch):
    monkeypatch.setattr(lv.os.path, "realpath", lambda p: "/dev/zd32")
    monkeypatch.setattr(lv, "dm_info", lambda p: None)
    disk = _block_disk("/dev/zvol/tank/vm1")
    lv._refine_block(disk, {}, None)
    assert disk["backend"] == "zvol" and disk["zvol"] == dict(pool="tank", dataset="tank/vm1", device="/dev/zd32")


def test_refine_keeps_path_classification_when_missing():
    disk = _block_disk("/dev/vg0/gone")
    disk["exists"] = False
    lv._refine_block(disk, {}, None)
    assert disk["backend"] == "lvm" and disk["confidence"] == "low" and "does not exist" in disk["notes"][0]


# --- selection -----------------------------------------------------------------------------

def domains():
    out = []
    for i, (name, xml_name, state) in enumerate([("web1", "rbd.xml", "running"), ("web2", "lvm.xml", "shutoff"),
                                                 ("db1", "zvol.xml", "running"), ("test-1", "rbd.xml", "running"),
                                                 ("app1", "qcow2_file.xml", "paused")]):
        out.append(dict(name=name, uuid="00000000-0000-4000-8000-%012d" % i, state=state,
                        disks=lv.disks(fixture(xml_name))))
    return out


def names_of(doms):
    return [d["name"] for d in doms]


def test_select_everything_by_default():
    selected, skipped, unmatched = lv.select(domains())
    assert names_of(selected) == ["web1", "web2", "db1", "test-1", "app1"] and skipped == [] and unmatched == []


def test_select_names_globs_uuid_and_unmatched():
    selected, skipped, unmatched = lv.select(domains(), names=["web*", "00000000-0000-4000-8000-000000000002", "nope",
                                                               "x?"])
    assert names_of(selected) == ["web1", "web2", "db1"]
    assert unmatched == ["nope", "x?"]
    reasons = dict((s["name"], s["reason"]) for s in skipped)
    assert reasons == {"test-1": "not matched by names", "app1": "not matched by names"}


def test_select_exclude_wins_over_names():
    selected, skipped, unmatched = lv.select(domains(), names=["*"], exclude=["test-*", "web2"])
    assert names_of(selected) == ["web1", "db1", "app1"] and unmatched == []
    reasons = dict((s["name"], s["reason"]) for s in skipped)
    assert reasons == {"test-1": "excluded by 'test-*'", "web2": "excluded by 'web2'"}


def test_select_globs_are_case_sensitive_and_whole_name():
    selected, unmatched = lv.select(domains(), names=["WEB*", "eb1"])[::2]
    assert selected == [] and unmatched == ["WEB*", "eb1"]


def test_select_query_running_with_rbd():
    selected, skipped = lv.select(domains(), exclude=["test-*"],
                                  query="[?state=='running' && disks[?backend=='rbd']]")[:2]
    assert names_of(selected) == ["web1"]
    reasons = dict((s["name"], s["reason"]) for s in skipped)
    assert reasons == {"test-1": "excluded by 'test-*'", "web2": "not selected by query",
                       "db1": "not selected by query", "app1": "not selected by query"}


def test_select_query_on_disk_details():
    selected = lv.select(domains(), query="[?disks[?backend=='file' && file.backing_chain[0]]]")[0]
    assert names_of(selected) == ["app1"]
    selected = lv.select(domains(), query="[?length(disks[?backend=='lvm']) > `0`] | [0]")[0]
    assert names_of(selected) == ["web2"]


def test_select_bad_query_is_a_clear_input_error():
    with pytest.raises(InputError, match="not a valid JMESPath expression"):
        lv.select(domains(), query="[?state=='running'")
    with pytest.raises(InputError, match="not a valid JMESPath expression"):
        lv.compile_query("disks[?backend=='rbd'")


def test_select_query_that_does_not_return_domains():
    with pytest.raises(InputError, match="must return a list of domains"):
        lv.select(domains(), query="[].name")
    with pytest.raises(InputError, match="must return a list of domains"):
        lv.select(domains(), query="length(@)")
    with pytest.raises(InputError, match="not in its input"):
        lv.select(domains(), query="[].{name: name, uuid: 'made-up'}")


def test_select_query_runtime_error_is_an_input_error():
    with pytest.raises(InputError, match="failed"):
        lv.select(domains(), query="[?nosuchfunction(name)]")
    with pytest.raises(InputError, match="failed"):
        lv.select(domains(), query="[?length(state) > name]")


# --- the domain XML file ------------------------------------------------------------------

def test_write_atomic(tmp_path):
    dest = tmp_path / "domain.xml"
    lv.write_atomic(str(dest), b"<domain/>\n", 0o600)
    assert dest.read_bytes() == b"<domain/>\n" and (dest.stat().st_mode & 0o777) == 0o600
    lv.write_atomic(str(dest), b"<domain>2</domain>\n", 0o600)
    assert dest.read_bytes() == b"<domain>2</domain>\n"
    assert os.listdir(str(tmp_path)) == ["domain.xml"]


def test_read_existing_refuses_a_directory(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        lv._read_existing(str(tmp_path))
    assert lv._read_existing(str(tmp_path / "absent")) == (None, None)
