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


UUID = "11111111-2222-4333-8444-555555555555"


def no_domains(name, uuid):
    return None, None


def shut_off(state="shutoff", uuid=UUID, disks=(("web1-root", "vda"), ("web1-data", "vdb")), managed_save=False):
    return dict(state=state, uuid=uuid, xml=domain_xml(disks), managed_save=managed_save)


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
        plan(params(repo), rbd_images=lambda pool, ns: ["web1-r-vdb"], domains=no_domains)
    assert plan(params(repo, force=True), rbd_images=lambda pool, ns: ["web1-r-vdb"], domains=no_domains)
    with pytest.raises(ConflictError, match="a domain named web1-r exists"):
        plan(params(repo), rbd_images=lambda pool, ns: [], domains=lambda name, uuid: (shut_off(), None))
    got = plan(params(repo, images={"vda": "other"}, pool="restore"), rbd_images=lambda p, n: ["web1-r-vda"])
    assert got["disk_paths"] == {"vda": "restore/other", "vdb": "restore/web1-r-vdb"}
    with pytest.raises(InputError, match="vdz"):
        plan(params(repo, images={"vdz": "x"}))


def test_no_backup_of_the_vm(tmp_path):
    repo = backed_up(tmp_path)
    with pytest.raises(NotFoundError, match="no backup of VM db1"):
        plan(params(repo, vm="db1"))


def own_images(pool, namespace):
    return ["web1-root", "web1-data", "unrelated"]


def test_in_place_rolls_back_the_vms_own_images_under_its_own_name(tmp_path):
    repo = backed_up(tmp_path)
    asked = []

    def domains(name, uuid):
        asked.append((name, uuid))
        return shut_off(disks=(("web1-root", "vda"), ("web1-data", "vdb"), ("web1-new", "vdc"))), name

    got = plan(params(repo, name=None, in_place=True, force=True), rbd_images=own_images, domains=domains)
    assert asked == [("web1", UUID)]
    assert got["in_place"] and got["name"] == "web1" and got["domain_state"] == "shutoff"
    assert got["disk_paths"] == {"vda": "rbd/web1-root", "vdb": "rbd/web1-data"}
    assert [d["restore_to"] for d in got["disks"]] == [d["source"] for d in got["disks"]]
    assert got["detached"] == [dict(target="vdc", source="rbd:rbd/web1-new")]  # attached since the point: left alone
    # undefined since the backup: defined again from the saved definition
    got = plan(params(repo, name=None, in_place=True), rbd_images=own_images, domains=no_domains)
    assert got["domain_state"] is None and got["detached"] == []


@pytest.mark.parametrize("domain, owner, error, match", [
    (dict(state="running"), "web1", ConflictError, "domain web1 is running: shut it down"),
    (dict(state="paused"), "web1", ConflictError, "domain web1 is paused"),
    (dict(managed_save=True), "web1", ConflictError, "saved memory state"),
    (dict(uuid="99999999-2222-4333-8444-555555555555"), None, ConflictError, "another VM of the same name"),
    (None, "web1-renamed", ConflictError, "belongs to domain web1-renamed"),
])
def test_in_place_refuses_a_domain_that_does_not_allow_it(tmp_path, domain, owner, error, match):
    repo = backed_up(tmp_path)
    current = shut_off(**domain) if domain is not None else None
    with pytest.raises(error, match=match):
        plan(params(repo, name=None, in_place=True), rbd_images=own_images, domains=lambda n, u: (current, owner))


def test_in_place_refuses_missing_images_and_options_that_do_not_apply(tmp_path):
    repo = backed_up(tmp_path)
    with pytest.raises(NotFoundError, match="rbd/web1-data do"):
        plan(params(repo, name=None, in_place=True), rbd_images=lambda p, n: ["web1-root"], domains=no_domains)
    for extra in (dict(images={"vda": "x"}), dict(pool="other")):
        with pytest.raises(InputError, match="does not apply"):
            plan(params(repo, name=None, in_place=True, **extra))
    with pytest.raises(InputError, match="name web1-r does not apply"):
        plan(params(repo, in_place=True))
    assert plan(params(repo, name="web1", in_place=True))["name"] == "web1"
    with pytest.raises(InputError, match="name is required"):
        plan(params(repo, name=None))
