"""rbd_snapshot / rbd_snapshot_info through ansible-playbook against the lab's real Ceph."""

import uuid

import pytest
import rbd

from ansible_runner import lab_vars, playbook, pool_ioctx

MiB = 1 << 20


@pytest.fixture
def image(lab):
    name = "snaptest-" + uuid.uuid4().hex[:8]
    with pool_ioctx(lab) as ioctx:
        rbd.RBD().create(ioctx, name, 64 * MiB)
        with rbd.Image(ioctx, name) as img:
            img.write(b"x" * MiB, 0)
    yield name
    with pool_ioctx(lab) as ioctx:
        with rbd.Image(ioctx, name) as img:
            for snap in list(img.list_snaps()):
                if img.is_protected_snap(snap["name"]):
                    img.unprotect_snap(snap["name"])
                img.remove_snap(snap["name"])
        rbd.RBD().remove(ioctx, name)


def snapshots(lab, name):
    with pool_ioctx(lab) as ioctx:
        with rbd.Image(ioctx, name, read_only=True) as img:
            return [s["name"] for s in img.list_snaps()]


def test_playbook_lifecycle(lab, image):
    playbook("rbd_snapshot.yml", lab_vars(lab, lab_image=image))
    names = snapshots(lab, image)
    assert "before-upgrade" not in names
    managed = [n for n in names if n.startswith("snapchain-")]
    assert len(managed) == 2, names


def test_check_mode_changes_nothing(lab, image):
    proc = playbook("rbd_snapshot_check.yml", lab_vars(lab, lab_image=image), check=True)
    assert "changed=1" in proc.stdout
    assert snapshots(lab, image) == []


def test_refuses_to_remove_snapshot_with_clones(lab, image):
    with pool_ioctx(lab) as ioctx:
        with rbd.Image(ioctx, image) as img:
            img.create_snap("base")
            img.protect_snap("base")
        rbd.RBD().clone(ioctx, image, "base", ioctx, image + "-clone")
    try:
        proc = playbook("rbd_snapshot_remove.yml", lab_vars(lab, lab_image=image, lab_snapshot="base"), expect_rc=2)
        assert "has clones" in proc.stdout and image + "-clone" in proc.stdout
        assert snapshots(lab, image) == ["base"]
    finally:
        with pool_ioctx(lab) as ioctx:
            rbd.RBD().remove(ioctx, image + "-clone")


def test_bad_input_is_refused(lab, image):
    proc = playbook("rbd_snapshot_remove.yml", lab_vars(lab, lab_image=image, lab_snapshot="a/b"), expect_rc=2)
    assert "is not valid" in proc.stdout
    proc = playbook("rbd_snapshot_remove.yml", lab_vars(lab, lab_image="no-such-image", lab_snapshot="x"), expect_rc=2)
    assert "does not exist" in proc.stdout
