"""lvm_snapshot and lvm_snapshot_info in the lab VM, against real device-mapper (issue 11).

Each module call goes through ansible-playbook over ssh into the VM (labvm_fixtures.py); every
assert on state reads `lvs --reportformat json` in the VM itself. Nothing is mocked: the overflowed
snapshot is overflowed by writing past its copy-on-write area, the pool's fullness is real data.
"""

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming

MIB = 1 << 20


@pytest.fixture
def origin(labvm, request):
    """A fresh 64 MiB linear LV named after the test, with data; removed (with its snapshots) after."""
    name = "o-" + request.node.name.replace("test_", "")[:40].replace("_", "-")
    labvm.sh("lvcreate -q -y -L 64M -n {n} {vg} && dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=4 "
             "oflag=direct status=none".format(n=name, vg=labvm.vg))
    yield name
    _remove_with_snapshots(labvm, name)


@pytest.fixture
def thin_origin(labvm, request):
    """A fresh 256 MiB thin LV in labvg/pool named after the test; removed (with its snapshots) after."""
    name = "t-" + request.node.name.replace("test_", "")[:40].replace("_", "-")
    labvm.sh("lvcreate -q -V 256M -T {vg}/{pool} -n {n} && dd if=/dev/urandom of=/dev/{vg}/{n} bs=1M count=4 "
             "oflag=direct status=none".format(n=name, vg=labvm.vg, pool=labvm.pool))
    yield name
    _remove_with_snapshots(labvm, name)


def _remove_with_snapshots(labvm, name):
    for lv, row in labvm.lvs().items():
        if row["origin"] == name:
            labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, lv)])
    labvm.ssh(["lvremove", "-q", "-y", "%s/%s" % (labvm.vg, name)])


def snap_args(labvm, lv, **kw):
    args = dict(vg=labvm.vg, lv=lv)
    args.update(kw)
    return args


def test_classic_snapshot_check_real_idempotent_check_then_removed(labvm, origin):
    args = snap_args(labvm, origin, name=origin + "-s", size="16m", chunk_size="64k")
    checked = labvm.module("lvm_snapshot", args, check=True, diff=True)
    assert checked["changed"] and checked["created"] and checked["snapshot"] == origin + "-s"
    assert checked["diff"]["after"]["snapshots"] == [origin + "-s"] and checked["diff"]["before"]["snapshots"] == []
    assert origin + "-s" not in labvm.lvs()

    made = labvm.module("lvm_snapshot", args)
    assert made["changed"] and made["created"] and made["type"] == "classic"
    row = labvm.lvs()[origin + "-s"]
    assert row["origin"] == origin and row["lv_attr"][0] == "s" and row["lv_attr"][4] == "a"
    assert int(row["lv_size"]) == 16 * MIB and int(row["chunk_size"]) == 64 * 1024
    assert made["path"] == "/dev/%s/%s-s" % (labvm.vg, origin)
    assert made["data_percent"] == float(row["data_percent"]) and 0 <= made["data_percent"] < 100

    again = labvm.module("lvm_snapshot", args)
    assert not again["changed"] and not again["created"] and again["snapshot"] == origin + "-s"
    checked_again = labvm.module("lvm_snapshot", args, check=True)
    assert not checked_again["changed"]
    assert [lv for lv, r in labvm.lvs().items() if r["origin"] == origin] == [origin + "-s"]

    gone_args = snap_args(labvm, origin, name=origin + "-s", state="absent")
    would = labvm.module("lvm_snapshot", gone_args, check=True, diff=True)
    assert would["changed"] and would["removed"] and would["diff"]["after"]["snapshots"] == []
    assert origin + "-s" in labvm.lvs()
    removed = labvm.module("lvm_snapshot", gone_args)
    assert removed["changed"] and removed["removed"] and origin + "-s" not in labvm.lvs()
    assert not labvm.module("lvm_snapshot", gone_args)["changed"]
    assert not labvm.module("lvm_snapshot", gone_args, check=True)["changed"]
    assert origin in labvm.lvs()


def test_thin_snapshot_activated_with_k_idempotent(labvm, thin_origin):
    args = snap_args(labvm, thin_origin, name=thin_origin + "-s")
    checked = labvm.module("lvm_snapshot", args, check=True)
    assert checked["changed"] and checked["created"] and checked["activated"]
    assert thin_origin + "-s" not in labvm.lvs()

    made = labvm.module("lvm_snapshot", args)
    assert made["changed"] and made["type"] == "thin" and made["activated"]
    row = labvm.lvs()[thin_origin + "-s"]
    # thin volume, active, with lvm's activation-skip flag: it was activated with -K
    assert row["lv_attr"][0] == "V" and row["lv_attr"][4] == "a" and row["lv_attr"][9] == "k"
    assert row["origin"] == thin_origin and row["pool_lv"] == labvm.pool and row["thin_id"]
    assert made["data_percent"] == float(row["data_percent"])

    assert not labvm.module("lvm_snapshot", args)["changed"]
    assert not labvm.module("lvm_snapshot", args, check=True)["changed"]

    # Deactivated (as after a reboot: the skip flag keeps it off): present activates it again.
    labvm.ssh(["lvchange", "-an", "%s/%s-s" % (labvm.vg, thin_origin)])
    assert labvm.lvs()[thin_origin + "-s"]["lv_attr"][4] != "a"
    again = labvm.module("lvm_snapshot", args)
    assert again["changed"] and again["activated"] and not again["created"]
    assert labvm.lvs()[thin_origin + "-s"]["lv_attr"][4] == "a"

    refused = labvm.module("lvm_snapshot", dict(args, name=thin_origin + "-x", size="8m"), expect_failed=True)
    assert "thin LV" in refused["msg"] and thin_origin + "-x" not in labvm.lvs()


def test_managed_name_percent_of_origin_and_foreign_names_refused(labvm, origin):
    made = labvm.module("lvm_snapshot", snap_args(labvm, origin, size="25%ORIGIN"))
    assert made["created"] and naming.is_managed(made["snapshot"])
    row = labvm.lvs()[made["snapshot"]]
    # 25% of 64 MiB, plus what lvm adds for the exception store, rounded up to whole 4 MiB extents
    assert row["origin"] == origin and 16 * MIB <= int(row["lv_size"]) <= 24 * MIB
    # A second run without a name is a new managed snapshot, newer than the first.
    second = labvm.module("lvm_snapshot", snap_args(labvm, origin, size="25%ORIGIN"))
    assert second["created"] and second["snapshot"] > made["snapshot"]
    assert [s["name"] for s in second["snapshots"]] == [made["snapshot"], second["snapshot"]]

    # Another LV's snapshot under the name asked for: refused, for present and absent alike.
    labvm.sh("lvcreate -q -y -L 8M -n {o}-other {vg} && lvcreate -q -s -L 4M -n {o}-foreign {vg}/{o}-other"
             .format(o=origin, vg=labvm.vg))
    try:
        before = labvm.lvs()
        refused = labvm.module("lvm_snapshot", snap_args(labvm, origin, name=origin + "-foreign", size="8m"),
                               expect_failed=True)
        assert "not a snapshot of %s" % origin in refused["msg"]
        refused = labvm.module("lvm_snapshot", snap_args(labvm, origin, name=origin + "-foreign", state="absent"),
                               expect_failed=True)
        assert "not removed" in refused["msg"]
        # The origin itself under state=absent is refused too (only snapshots of lv are ever removed).
        refused = labvm.module("lvm_snapshot", snap_args(labvm, origin + "-other", name=origin, state="absent"),
                               expect_failed=True)
        assert "not a snapshot" in refused["msg"]
        assert labvm.lvs() == before
    finally:
        _remove_with_snapshots(labvm, origin + "-other")


def test_overflowed_classic_snapshot_is_a_clear_failure(labvm, origin):
    args = snap_args(labvm, origin, name=origin + "-small", size="4m")
    assert labvm.module("lvm_snapshot", args)["created"]
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{o} bs=1M count=16 oflag=direct status=none; sync"
             .format(vg=labvm.vg, o=origin))
    row = labvm.lvs()[origin + "-small"]
    assert row["lv_attr"][4] == "I", row  # really overflowed

    failed = labvm.module("lvm_snapshot", args, expect_failed=True)
    assert failed["overflowed"] and "overflowed" in failed["msg"] and "never backed up" in failed["msg"]
    listed = labvm.module("lvm_snapshot_info", dict(vg=labvm.vg, lv=origin))
    assert listed["overflowed"] == [origin + "-small"] and not listed["changed"]
    snap = listed["snapshots"][0]
    assert snap["overflowed"] and snap["type"] == "classic" and snap["data_percent"] == 100.0

    removed = labvm.module("lvm_snapshot", dict(args, state="absent"))
    assert removed["removed"] and origin + "-small" not in labvm.lvs()


def test_thin_pool_above_the_limit_is_refused_before_snapshotting(labvm, thin_origin):
    labvm.sh("dd if=/dev/urandom of=/dev/{vg}/{t} bs=1M count=64 oflag=direct status=none; sync"
             .format(vg=labvm.vg, t=thin_origin))
    pool = labvm.lvs()[labvm.pool]
    full = float(pool["data_percent"])
    assert full > 10, pool
    before = set(labvm.lvs())
    args = snap_args(labvm, thin_origin, name=thin_origin + "-s", thin_pool_max_percent=full - 5)
    for check in (True, False):
        refused = labvm.module("lvm_snapshot", args, check=check, expect_failed=True)
        assert "thin pool %s/%s" % (labvm.vg, labvm.pool) in refused["msg"]
        assert refused["data_percent"] == full and refused["thin_pool_max_percent"] == full - 5
        assert set(labvm.lvs()) == before
    made = labvm.module("lvm_snapshot", dict(args, thin_pool_max_percent=min(100.0, full + 5)))
    assert made["created"] and thin_origin + "-s" in labvm.lvs()


def test_info_lists_snapshots_pools_and_origin(labvm, origin, thin_origin):
    labvm.sh("lvcreate -q -s -L 8M -n {o}-c {vg}/{o} && lvcreate -q -s -n {t}-t {vg}/{t}"
             .format(o=origin, t=thin_origin, vg=labvm.vg))
    listed = labvm.module("lvm_snapshot_info", dict(vg=labvm.vg))
    by_name = dict((s["name"], s) for s in listed["snapshots"])
    assert by_name[origin + "-c"]["type"] == "classic" and by_name[origin + "-c"]["origin"] == origin
    thin = by_name[thin_origin + "-t"]
    assert thin["type"] == "thin" and thin["pool"] == labvm.pool and thin["activation_skip"] and not thin["active"]
    assert [p["name"] for p in listed["thin_pools"]] == [labvm.pool]
    assert listed["thin_pools"][0]["data_percent"] == float(labvm.lvs()[labvm.pool]["data_percent"])
    one = labvm.module("lvm_snapshot_info", dict(vg=labvm.vg, lv=thin_origin))
    assert [s["name"] for s in one["snapshots"]] == [thin_origin + "-t"] and one["origin"]["type"] is None
    missing = labvm.module("lvm_snapshot_info", dict(vg=labvm.vg, lv="nope"), expect_failed=True)
    assert "not found" in missing["msg"]
    missing = labvm.module("lvm_snapshot_info", dict(vg="novg"), expect_failed=True)
    assert "volume group novg not found" in missing["msg"]
