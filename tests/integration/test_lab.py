"""The lab itself: a healthy cluster, a usable but restricted backup client, libvirt."""

import errno
import os

import libvirt
import rbd

MIB = 1 << 20


def test_cluster_is_healthy(lab):
    status = lab.ceph_json("status")
    health = status["health"]
    only_size_warnings = set(health["checks"]) <= {"POOL_NO_REDUNDANCY"}
    assert health["status"] == "HEALTH_OK" or only_size_warnings, health
    pgmap = status["pgmap"]
    # Every PG active+clean; +snaptrim(_wait) is healthy background work after other tests removed snapshots.
    states = pgmap["pgs_by_state"]
    assert all({"active", "clean"} <= set(s["state_name"].split("+")) for s in states), states
    assert sum(s["count"] for s in states) == pgmap["num_pgs"]


def test_backup_client_can_write_and_read_an_image(lab):
    name = f"snaplab-test-{os.getpid()}"
    data = os.urandom(MIB)
    cluster = lab.rados(lab.backup_client)
    try:
        with cluster.open_ioctx(lab.pool) as ioctx:
            rbd.RBD().create(ioctx, name, 8 * MIB)
            try:
                with rbd.Image(ioctx, name) as image:
                    image.write(data, 3 * MIB + 512)
                    assert image.read(3 * MIB + 512, MIB) == data
                    assert image.read(0, 4096) == bytes(4096)
                assert name in lab.rbd("ls", lab.pool).stdout.split()  # admin sees it too
            finally:
                rbd.RBD().remove(ioctx, name)
            assert name not in rbd.RBD().list(ioctx)
    finally:
        cluster.shutdown()


def test_backup_client_cannot_administer_the_cluster(lab):
    proc = lab.ceph("osd", "pool", "create", "snaplab-forbidden", "8",
                    client=lab.backup_client, check=False)
    assert proc.returncode == errno.EACCES, proc.stderr
    assert "access denied" in proc.stderr
    assert "snaplab-forbidden" not in lab.ceph_json("osd", "pool", "ls")


def test_libvirt_answers(lab):
    conn = libvirt.open(lab.libvirt_uri)
    try:
        assert conn.getLibVersion() > 0
    finally:
        conn.close()
