"""libvirt_disks_info / libvirt_domain_xml against the lab's real libvirtd.

Three domains are DEFINED (not started: defining is cheap and libvirt accepts block disks whose
device does not exist): one with an RBD disk in a namespace of the lab cluster, one with a qcow2
overlay on a backing file plus a raw file, one with a zvol and an LVM path.  One test starts a
tiny transient TCG guest (no OS, 32 MiB) to see a running and a paused domain.
"""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import uuid

import libvirt
import pytest

import module_runner
from ansible_runner import playbook

MiB = 1 << 20

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <devices>
{disks}
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>
"""


def file_disk(path, fmt, dev):
    return ("    <disk type='file' device='disk'><driver name='qemu' type='%s'/><source file='%s'/>"
            "<target dev='%s' bus='virtio'/></disk>" % (fmt, path, dev))


def block_disk(path, dev):
    return ("    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='%s'/>"
            "<target dev='%s' bus='virtio'/></disk>" % (path, dev))


def rbd_disk(name, host, port, secret, dev):
    return ("    <disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            "<source protocol='rbd' name='%s'><host name='%s' port='%s'/>"
            "<auth username='backup'><secret type='ceph' uuid='%s'/></auth></source>"
            "<target dev='%s' bus='virtio'/></disk>" % (name, host, port, secret, dev))


EMPTY_CDROM = ("    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
               "<target dev='sda' bus='sata'/><readonly/></disk>")


@pytest.fixture(scope="module")
def conn(lab):
    c = libvirt.open(lab.libvirt_uri)
    yield c
    c.close()


@pytest.fixture(scope="module")
def disco(lab, conn):
    """The three defined domains; undefined (and the RBD image and files removed) afterwards."""
    tag = uuid.uuid4().hex[:6]
    prefix = "snaptest-disco-%s-" % tag
    # QEMU runs as another user: the images of the started guest must be reachable by it,
    # which pytest's private tmp_path is not.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(tmp, 0o755)
    base, overlay, data = tmp / "base.qcow2", tmp / "overlay.qcow2", tmp / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(data), "8M"], check=True)
    namespace, image = "disco" + tag, "vm-disk0"
    lab.rbd("namespace", "create", "--pool", lab.pool, "--namespace", namespace)
    lab.rbd("create", "--size", "16M", "%s/%s/%s" % (lab.pool, namespace, image))
    host, port = lab.mon_addr.rsplit(":", 1)
    secret = str(uuid.uuid4())
    disks = {
        "rbd": [rbd_disk("%s/%s/%s" % (lab.pool, namespace, image), host, port, secret, "vda"), EMPTY_CDROM],
        "files": [file_disk(overlay, "qcow2", "vda"), file_disk(data, "raw", "vdb")],
        "blk": [block_disk("/dev/zvol/tank/disco/%sdisk0" % prefix, "vda"),
                block_disk("/dev/vg0/%slv" % prefix, "vdb")],
    }
    defined = []
    try:
        for kind, items in disks.items():
            defined.append(conn.defineXML(DOMAIN.format(name=prefix + kind, disks="\n".join(items))))
        yield dict(prefix=prefix, tmp=tmp, overlay=str(overlay), base=str(base), data=str(data),
                   namespace=namespace, image=image, host=host, port=int(port), secret=secret)
    finally:
        for dom in defined:
            dom.undefine()
        shutil.rmtree(tmp, ignore_errors=True)
        lab.rbd("rm", "--no-progress", "%s/%s/%s" % (lab.pool, namespace, image), check=False)
        lab.rbd("namespace", "remove", "--pool", lab.pool, "--namespace", namespace, check=False)


def disks_info(lab, tmp, expect_rc=0, **params):
    out = tmp / ("result-%s.json" % uuid.uuid4().hex[:8])
    extra = dict(lab_libvirt_uri=lab.libvirt_uri, disks_out=str(out))
    extra.update(("disks_" + k, v) for k, v in params.items())
    proc = playbook("disks_info.yml", extra, expect_rc=expect_rc)
    if expect_rc:
        return proc
    with open(out) as f:
        return json.load(f)


def by_name(result):
    return dict((d["name"], d) for d in result["domains"])


def test_classification(lab, disco):
    p = disco["prefix"]
    found = disks_info(lab, disco["tmp"], names=[p + "*"])
    doms = by_name(found)
    assert sorted(doms) == [p + "blk", p + "files", p + "rbd"]
    for dom in doms.values():
        assert dom["state"] == "shutoff" and dom["active"] is False and dom["persistent"] is True
        assert dom["xml_source"] == "inactive" and dom["agent_channel"] == "configured" and dom["agent"] is None
        assert len(dom["uuid"]) == 36 and dom["id"] is None

    vda, cdrom = doms[p + "rbd"]["disks"]
    assert vda["backend"] == "rbd" and vda["backup"] is True
    assert vda["rbd"]["pool"] == lab.pool and vda["rbd"]["namespace"] == disco["namespace"]
    assert vda["rbd"]["image"] == disco["image"]
    assert vda["rbd"]["hosts"] == [dict(name=disco["host"], port=disco["port"], transport=None)]
    assert vda["rbd"]["auth"] == dict(username="backup", secret_type="ceph", secret_uuid=disco["secret"],
                                      secret_usage=None)
    assert cdrom["device"] == "cdrom" and cdrom["backup"] is False and cdrom["backend"] == "none"

    overlay, data = doms[p + "files"]["disks"]
    assert overlay["backend"] == "file" and overlay["format"] == "qcow2" and overlay["exists"] is True
    assert overlay["file"]["backing_from"] == "qemu-img"
    assert overlay["file"]["backing_chain"] == [dict(path=disco["base"], format="qcow2")]
    assert data["backend"] == "file" and data["format"] == "raw" and data["file"]["backing_chain"] == []

    zvol, lvm = doms[p + "blk"]["disks"]
    assert zvol["backend"] == "zvol" and zvol["zvol"]["pool"] == "tank"
    assert zvol["zvol"]["dataset"] == "tank/disco/%sdisk0" % p
    assert lvm["backend"] == "lvm" and lvm["lvm"] == dict(vg="vg0", lv=p + "lv")
    for disk in (zvol, lvm):
        assert disk["exists"] is False and disk["confidence"] == "low" and disk["classified_by"] == "path"
        assert "does not exist" in disk["notes"][0]


def test_names_exclude_and_unmatched(lab, disco):
    p = disco["prefix"]
    found = disks_info(lab, disco["tmp"], names=[p + "*", p + "nope"], exclude=["*-blk"])
    assert sorted(by_name(found)) == [p + "files", p + "rbd"]
    assert found["unmatched"] == [p + "nope"]
    skipped = dict((s["name"], s["reason"]) for s in found["skipped"])
    assert skipped[p + "blk"] == "excluded by '*-blk'"
    # Every other domain of the shared libvirtd is skipped, never silently dropped.
    assert all(reason == "not matched by names" for name, reason in skipped.items() if name != p + "blk")


def test_query(lab, disco):
    p = disco["prefix"]
    found = disks_info(lab, disco["tmp"], names=[p + "*"], query="[?disks[?backend=='rbd']]")
    assert list(by_name(found)) == [p + "rbd"]
    skipped = dict((s["name"], s["reason"]) for s in found["skipped"])
    assert skipped[p + "files"] == skipped[p + "blk"] == "not selected by query"
    found = disks_info(lab, disco["tmp"], names=[p + "*"],
                       query="[?state=='shutoff' && disks[?backend=='file' && file.backing_chain[0]]]")
    assert list(by_name(found)) == [p + "files"]


def test_bad_query_fails_clearly(lab, disco):
    proc = disks_info(lab, disco["tmp"], expect_rc=2, names=[disco["prefix"] + "*"], query="[?state=='running'")
    assert "is not a valid JMESPath expression" in proc.stdout
    proc = disks_info(lab, disco["tmp"], expect_rc=2, query="[].name")
    assert "must return a list of domains" in proc.stdout


def test_domain_xml(lab, disco, conn):
    name = disco["prefix"] + "files"
    dest = disco["tmp"] / "domain.xml"
    playbook("disks_domain_xml.yml", dict(lab_libvirt_uri=lab.libvirt_uri, disks_domain=name, disks_dest=str(dest)))
    dom = conn.lookupByName(name)
    assert dest.read_text() == dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600

    # A changed definition: changed, with the XML diff; nothing else left in the directory.
    # (setMetadata, not defineXML: a define can cost a minute when libvirt re-probes QEMU.)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, "moved", None, None, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    args = dict(uri=lab.libvirt_uri, domain=name, dest=str(dest), _ansible_diff=True)
    result = module_runner.run("libvirt_domain_xml", args)
    assert result["changed"] is True and "<description>moved</description>" in result["diff"]["after"]
    assert "<description>" not in result["diff"]["before"]
    assert "<description>moved</description>" in dest.read_text()
    assert not [f for f in os.listdir(disco["tmp"]) if f.startswith(".domain.xml")]

    # Same content, wrong mode: fixed, and that is a change.
    os.chmod(dest, 0o644)
    assert module_runner.run("libvirt_domain_xml", args)["changed"] is True
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert module_runner.run("libvirt_domain_xml", args)["changed"] is False


def test_domain_xml_src_defines_the_saved_definition_again(lab, disco, conn):
    """libvirt_domain_xml src=: the definition saved earlier put back, unchanged (same UUID); check and diff mode
    first; then nothing to do.  A file of another domain, of another VM of the same name, and a UUID that another
    domain owns are refused, the definition untouched."""
    name = disco["prefix"] + "files"
    saved = disco["tmp"] / "saved.xml"
    module_runner.run("libvirt_domain_xml", dict(uri=lab.libvirt_uri, domain=name, dest=str(saved)))
    dom = conn.lookupByName(name)
    uuid_before = dom.UUIDString()
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, "changed since", None, None,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    args = dict(uri=lab.libvirt_uri, domain=name, src=str(saved))
    checked = module_runner.run("libvirt_domain_xml", dict(args, _ansible_check_mode=True, _ansible_diff=True))
    assert checked["changed"] is True and "changed since" in checked["diff"]["before"]
    assert "changed since" not in checked["diff"]["after"]
    assert "changed since" in conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    result = module_runner.run("libvirt_domain_xml", args)
    assert result["changed"] is True and result["created"] is False and result["uuid"] == uuid_before
    dom = conn.lookupByName(name)
    assert "changed since" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) and dom.UUIDString() == uuid_before
    assert module_runner.run("libvirt_domain_xml", args)["changed"] is False

    text = saved.read_text()
    other_uuid = disco["tmp"] / "other-uuid.xml"
    other_uuid.write_text(text.replace(uuid_before, str(uuid.uuid4())))
    renamed = disco["tmp"] / "renamed.xml"
    renamed.write_text(text.replace("<name>%s</name>" % name, "<name>%s-renamed</name>" % name))
    for domain, src, message in ((disco["prefix"] + "rbd", saved, "defines domain %s" % name),
                                 (name, other_uuid, "another VM of the same name"),
                                 (name + "-renamed", renamed, "belongs to domain %s" % name)):
        failed = module_runner.run("libvirt_domain_xml", dict(uri=lab.libvirt_uri, domain=domain, src=str(src)),
                                   expect_failed=True)
        assert message in failed["msg"], failed["msg"]
    assert conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).rstrip() == text.rstrip()
    assert name + "-renamed" not in conn.listDefinedDomains()


def test_domain_xml_errors(lab, disco):
    dest = str(disco["tmp"] / "x.xml")
    result = module_runner.run("libvirt_domain_xml", dict(uri=lab.libvirt_uri, domain=disco["prefix"] + "nope",
                                                          dest=dest), expect_failed=True)
    assert "no domain named" in result["msg"] and not os.path.exists(dest)
    result = module_runner.run("libvirt_domain_xml", dict(uri=lab.libvirt_uri, domain=disco["prefix"] + "rbd",
                                                          dest=str(disco["tmp"] / "no-dir" / "x.xml")),
                               expect_failed=True)
    assert "does not exist" in result["msg"]


def test_unreachable_libvirtd_is_a_clear_error(lab):
    result = module_runner.run("libvirt_disks_info", dict(uri="qemu+unix:///system?socket=/nonexistent/sock"),
                               expect_failed=True)
    assert "cannot connect to libvirt" in result["msg"] and "is libvirtd" in result["msg"]


def test_running_and_paused_transient_domain(lab, disco, conn):
    """A tiny TCG guest with no OS: live XML (backing chain from libvirt), states, agent not answering."""
    name = disco["prefix"] + "live"
    overlay = disco["tmp"] / "live.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay)],
                   check=True)
    try:
        dom = conn.createXML(DOMAIN.format(name=name, disks=file_disk(overlay, "qcow2", "vda")), 0)
    except libvirt.libvirtError as exc:
        pytest.skip("cannot start a tiny TCG guest here: %s" % exc)
    try:
        found = disks_info(lab, disco["tmp"], names=[name], probe_agent=True)
        live = by_name(found)[name]
        assert live["state"] == "running" and live["active"] is True and live["persistent"] is False
        assert live["xml_source"] == "live" and live["id"] == dom.ID()
        assert live["agent"] is False and "not connected" in live["agent_message"]
        assert live["agent_channel"] == "disconnected"
        disk = live["disks"][0]
        assert disk["file"]["backing_from"] == "xml"
        assert disk["file"]["backing_chain"] == [dict(path=disco["base"], format="qcow2")]

        dom.suspend()
        found = disks_info(lab, disco["tmp"], names=[disco["prefix"] + "*"], probe_agent=True,
                           query="[?state=='paused']")
        paused = by_name(found)
        assert list(paused) == [name]
        assert paused[name]["state_reason"] == "user"
        assert paused[name]["agent"] is None and "paused" in paused[name]["agent_message"]
    finally:
        dom.destroy()
