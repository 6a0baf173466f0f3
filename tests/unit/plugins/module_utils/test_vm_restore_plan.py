"""The whole-VM restore plan (_engine/vm_restore.py) on real repositories made by append_point."""

import os
import shutil

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.append import append_point
from ansible_collections.snapchain.vmbackup.plugins.module_utils._engine.vm_restore import plan

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
POINTS = ("20261101T010000Z", "20261102T010000Z")
DISK = """<disk type='network' device='disk'><driver name='qemu' type='raw'/>
<source protocol='rbd' name='rbd/%s'><host name='127.0.0.1' port='3300'/></source><target dev='%s' bus='virtio'/></disk>"""
CDROM = "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>"
FILE = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/scratch.qcow2'/><target dev='vdc'/></disk>"


def domain_xml(disks, extra=""):
    return ("<domain type='qemu'><name>web1</name><uuid>11111111-2222-4333-8444-555555555555</uuid><devices>%s%s"
            "</devices></domain>" % ("".join(DISK % d for d in disks), extra))


def backed_up(tmp_path, disks=(("web1-root", "vda"), ("web1-data", "vdb")), points=POINTS, extra=""):
    """Chains of web1's disks with ``points``, each point with its saved definition."""
    repo = tmp_path / "repo"
    for image, _target in disks:
        chain = repo / "ceph" / "rbd" / image
        raw = tmp_path / (image + ".raw")
        raw.write_bytes(os.urandom(MiB))
        for name in points:
            append_point(dict(chain=str(chain), source=str(raw), parallel=2, point_name=name))
            (chain / (name + ".domain.xml")).write_text(domain_xml(disks, extra))
    return str(repo)


def params(repo, **extra):
    out = dict(vm="web1", name="web1-r", repository=repo, cluster_label="ceph", point="latest")
    out.update(extra)
    return out


def test_every_disk_from_the_latest_point(tmp_path):
    got = plan(params(backed_up(tmp_path, extra=CDROM)))
    assert got["point"] == POINTS[-1] and [d["target"] for d in got["disks"]] == ["vda", "vdb"]
    assert got["disk_paths"] == {"vda": "rbd/web1-r-vda", "vdb": "rbd/web1-r-vdb"}
    assert got["chains"][1]["chain"].endswith("ceph/rbd/web1-data") and got["disks"][0]["size"] == MiB
    assert got["dropped"] == [dict(target="sda", reason=got["dropped"][0]["reason"])]
    assert got["domain_xml"].endswith("web1-root/%s.domain.xml" % POINTS[-1])


def test_point_by_name_time_and_uuid(tmp_path):
    repo = backed_up(tmp_path)
    assert plan(params(repo, point=POINTS[0]))["point"] == POINTS[0]
    assert plan(params(repo, before="2026-11-01T12:00Z"))["point"] == POINTS[0]
    assert plan(params(repo, vm="11111111-2222-4333-8444-555555555555"))["point"] == POINTS[-1]
    with pytest.raises(InputError):
        plan(params(repo, point=POINTS[0], before="2026-11-01T12:00Z"))


def test_a_disk_without_the_point_refuses_the_restore(tmp_path):
    repo = backed_up(tmp_path)
    os.unlink(os.path.join(repo, "ceph", "rbd", "web1-data", POINTS[-1] + ".domain.xml"))
    shutil.rmtree(os.path.join(repo, "ceph", "rbd", "web1-data"))
    backed_up(tmp_path, disks=(("web1-data", "vdb"),), points=POINTS[:1])  # vdb only has the older point
    with pytest.raises(NotFoundError, match="disk vdb has no point %s" % POINTS[-1]):
        plan(params(repo))
    assert plan(params(repo, point=POINTS[0]))["point"] == POINTS[0]


def test_other_backends_are_refused_unless_dropped(tmp_path):
    repo = backed_up(tmp_path, extra=FILE)
    with pytest.raises(ConflictError, match="vdc"):
        plan(params(repo))
    got = plan(params(repo, drop_other_disks=True))
    assert [d["target"] for d in got["dropped"]] == ["vdc"] and len(got["disks"]) == 2


def test_existing_images_and_domain_are_refused(tmp_path):
    repo = backed_up(tmp_path)
    with pytest.raises(ConflictError, match="rbd/web1-r-vdb"):
        plan(params(repo), rbd_images=lambda pool, ns: ["web1-r-vdb"], domain_exists=lambda name: False)
    assert plan(params(repo, force=True), rbd_images=lambda pool, ns: ["web1-r-vdb"], domain_exists=lambda n: False)
    with pytest.raises(ConflictError, match="a domain named web1-r exists"):
        plan(params(repo), rbd_images=lambda pool, ns: [], domain_exists=lambda name: name == "web1-r")
    got = plan(params(repo, images={"vda": "other"}, pool="restore"), rbd_images=lambda p, n: ["web1-r-vda"])
    assert got["disk_paths"] == {"vda": "restore/other", "vdb": "restore/web1-r-vdb"}
    with pytest.raises(InputError, match="vdz"):
        plan(params(repo, images={"vdz": "x"}))


def test_no_backup_of_the_vm(tmp_path):
    repo = backed_up(tmp_path)
    with pytest.raises(NotFoundError, match="no backup of VM db1"):
        plan(params(repo, vm="db1"))
