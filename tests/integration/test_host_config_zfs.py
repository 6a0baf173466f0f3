"""host_config_backup with dataset= (the zfs_mirror hook) in the lab VM, against real OpenZFS: the archive lands
below the dataset's mountpoint, so the next ZFS snapshot of the dataset holds it (seed 004's flow); an unmounted
dataset is refused before anything is written."""

import pytest


@pytest.fixture
def dataset(labvm):
    name, mnt = "labzpool/hostcfg", "/var/lib/labvm/hostcfg"
    labvm.sh("zfs create -o mountpoint=%s %s" % (mnt, name))
    yield name, mnt
    labvm.sh("zfs destroy -r %s" % name, check=False)


def test_archive_in_the_dataset_is_held_by_its_snapshot(labvm, dataset):
    name, mnt = dataset
    result = labvm.module("host_config_backup", dict(dataset=name, host_label="hv1", paths=["/etc/lvm", "/etc/zfs"],
                                                     domains=False))
    assert result["changed"] and result["archive"].startswith(mnt + "/hv1/host-config/")
    assert result["missing"] == [] and result["files"] > 0
    labvm.sh("zfs snapshot %s@snapchain-20261207T000000Z" % name)
    relative = result["archive"][len(mnt) + 1:]
    held = "%s/.zfs/snapshot/snapchain-20261207T000000Z/%s" % (mnt, relative)
    sums = labvm.ssh(["sha256sum", result["archive"], held]).stdout.split()
    assert sums[0] == sums[2]
    assert "etc/lvm/lvm.conf" in labvm.ssh(["tar", "-tzf", held]).stdout.split()
    labvm.sh("zfs set mountpoint=none %s" % name)
    refused = labvm.module("host_config_backup", dict(dataset=name, host_label="hv1", paths=["/etc/lvm"],
                                                      domains=False), expect_failed=True)
    assert "not mounted" in refused["msg"]
