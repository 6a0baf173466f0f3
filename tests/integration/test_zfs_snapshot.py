"""zfs_snapshot and zfs_snapshot_info in the lab VM, against real OpenZFS 2.1 (issue 11).

Each module call goes through ansible-playbook over ssh into the VM (labvm_fixtures.py); every
assert on state reads `zfs list -t snapshot -H -p` and `zfs holds -H` in the VM itself. Nothing is
mocked: the clones, the foreign holds and the foreign snapshots are made with the zfs command.
"""

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming

TAG = "snapchain"


def _name(request, kind):
    return "%s/%s-%s" % ("labzpool", kind, request.node.name.replace("test_", "")[:40].replace("_", "-"))


@pytest.fixture
def vol(labvm, request):
    """A fresh 32 MiB zvol named after the test, with data; destroyed (with its snapshots) after."""
    name = _name(request, "v")
    labvm.ssh(["zfs", "create", "-V", "32M", name])
    labvm.sh("udevadm settle; dd if=/dev/urandom of=/dev/zvol/%s bs=1M count=4 oflag=direct status=none" % name)
    yield name
    _destroy(labvm, name)


@pytest.fixture
def fs(labvm, request):
    """A fresh filesystem dataset named after the test; destroyed (with its snapshots and clones) after."""
    name = _name(request, "f")
    labvm.ssh(["zfs", "create", name])
    yield name
    _destroy(labvm, name)


def _destroy(labvm, dataset):
    """Test tear-down only: every hold released, then ``zfs destroy -R`` (clones too)."""
    for snap in snapshots(labvm, dataset, recursive=True):
        for tag in holds(labvm, snap):
            labvm.ssh(["zfs", "release", tag, snap])
    labvm.ssh(["zfs", "destroy", "-R", dataset])


def snapshots(labvm, dataset, recursive=False):
    """Full names of the snapshots of ``dataset``, in createtxg order, straight from zfs list in the VM."""
    depth = ["-r"] if recursive else ["-d", "1"]
    out = labvm.ssh(["zfs", "list", "-t", "snapshot", "-H", "-p", "-o", "name,createtxg", "-s", "createtxg"]
                    + depth + [dataset]).stdout
    return [line.split("\t")[0] for line in out.splitlines() if line]


def holds(labvm, snapshot):
    """The hold tags on ``snapshot`` (zfs holds -H in the VM)."""
    out = labvm.ssh(["zfs", "holds", "-H", snapshot]).stdout
    return sorted(line.split("\t")[1] for line in out.splitlines() if line)


def createtxg(labvm, snapshot):
    return int(labvm.ssh(["zfs", "get", "-H", "-p", "-o", "value", "createtxg", snapshot]).stdout.strip())


def test_zvol_snapshot_held_check_real_idempotent_check_then_destroyed(labvm, vol):
    snap = vol + "@s1"
    args = dict(dataset=vol, name="s1", hold=True)
    checked = labvm.module("zfs_snapshot", args, check=True, diff=True)
    assert checked["changed"] and checked["created"] and checked["held"] == [snap]
    assert checked["diff"]["before"] == dict(snapshots=[], held=[])
    assert checked["diff"]["after"] == dict(snapshots=[snap], held=[snap])
    assert snapshots(labvm, vol) == []

    made = labvm.module("zfs_snapshot", args)
    assert made["changed"] and made["created"] and made["held"] == [snap] and made["type"] == "volume"
    assert snapshots(labvm, vol) == [snap] and holds(labvm, snap) == [TAG]
    info = made["info"]
    assert info["full_name"] == snap and info["createtxg"] == createtxg(labvm, snap)
    assert info["holds"] == [TAG] and info["held"] and info["userrefs"] == 1 and not info["managed"]
    assert info["referenced"] >= 4 << 20 and info["clones"] == [] and info["guid"].isdigit()

    again = labvm.module("zfs_snapshot", args)
    assert not again["changed"] and not again["created"] and again["held"] == []
    assert not labvm.module("zfs_snapshot", args, check=True)["changed"]
    assert snapshots(labvm, vol) == [snap] and holds(labvm, snap) == [TAG]

    # The point of the hold: nobody's plain zfs destroy can remove the base snapshot.
    plain = labvm.ssh(["zfs", "destroy", snap], check=False)
    assert plain.returncode != 0 and "dataset is busy" in plain.stderr
    assert snapshots(labvm, vol) == [snap]

    gone = dict(dataset=vol, name="s1", state="absent")
    would = labvm.module("zfs_snapshot", gone, check=True, diff=True)
    assert would["changed"] and would["destroyed"] == [snap] and would["released"] == [snap]
    assert would["diff"]["after"] == dict(snapshots=[], held=[])
    assert snapshots(labvm, vol) == [snap] and holds(labvm, snap) == [TAG]
    destroyed = labvm.module("zfs_snapshot", gone)
    assert destroyed["changed"] and destroyed["destroyed"] == [snap] and destroyed["released"] == [snap]
    assert snapshots(labvm, vol) == [] and destroyed["snapshots"] == []
    assert not labvm.module("zfs_snapshot", gone)["changed"]
    assert not labvm.module("zfs_snapshot", gone, check=True)["changed"]


def test_hold_and_release_of_an_existing_snapshot_leave_other_tags(labvm, fs):
    snap = fs + "@base"
    labvm.ssh(["zfs", "snapshot", snap])
    labvm.ssh(["zfs", "hold", "theirs", snap])
    args = dict(dataset=fs, name="base", hold=True)
    checked = labvm.module("zfs_snapshot", args, check=True)
    assert checked["changed"] and not checked["created"] and checked["held"] == [snap]
    assert holds(labvm, snap) == ["theirs"]
    held = labvm.module("zfs_snapshot", args)
    assert held["changed"] and held["held"] == [snap] and holds(labvm, snap) == sorted(["theirs", TAG])
    assert held["info"]["holds"] == sorted(["theirs", TAG]) and held["info"]["userrefs"] == 2
    assert not labvm.module("zfs_snapshot", args)["changed"]

    release = dict(args, hold=False)
    checked = labvm.module("zfs_snapshot", release, check=True, diff=True)
    assert checked["changed"] and checked["released"] == [snap] and checked["diff"]["after"]["held"] == []
    assert holds(labvm, snap) == sorted(["theirs", TAG])
    released = labvm.module("zfs_snapshot", release)
    assert released["changed"] and released["released"] == [snap] and holds(labvm, snap) == ["theirs"]
    assert not labvm.module("zfs_snapshot", release)["changed"]
    assert not labvm.module("zfs_snapshot", release, check=True)["changed"]
    assert snapshots(labvm, fs) == [snap]


def test_keep_managed_keeps_exactly_the_newest_of_ours_by_createtxg(labvm, fs):
    first = labvm.module("zfs_snapshot", dict(dataset=fs, hold=True))
    assert first["created"] and naming.is_managed(first["snapshot"]) and holds(labvm, first["full_name"]) == [TAG]
    labvm.ssh(["zfs", "snapshot", fs + "@manual"])  # someone else's, between ours
    second = labvm.module("zfs_snapshot", dict(dataset=fs, hold=True))
    assert second["created"] and second["snapshot"] > first["snapshot"]
    # A managed name with an OLDER stamp, made last: newest by createtxg, so kept before the others.
    late = labvm.module("zfs_snapshot", dict(dataset=fs, name="snapchain-20200101T000000Z", hold=True))
    assert late["created"] and late["info"]["managed"]
    labvm.ssh(["zfs", "snapshot", fs + "@other-20200101T000000Z"])  # another prefix: not ours
    ours = [first["full_name"], second["full_name"], late["full_name"]]
    assert snapshots(labvm, fs) == [ours[0], fs + "@manual", ours[1], ours[2], fs + "@other-20200101T000000Z"]

    prune = dict(dataset=fs, state="absent", keep_managed=2)
    checked = labvm.module("zfs_snapshot", prune, check=True, diff=True)
    assert checked["changed"] and checked["destroyed"] == [ours[0]] and checked["released"] == [ours[0]]
    assert checked["snapshot"] is None and not checked["created"]
    assert checked["diff"]["after"]["snapshots"] == [fs + "@manual", ours[1], ours[2], fs + "@other-20200101T000000Z"]
    assert len(snapshots(labvm, fs)) == 5 and holds(labvm, ours[0]) == [TAG]
    pruned = labvm.module("zfs_snapshot", prune)
    assert pruned["changed"] and pruned["destroyed"] == [ours[0]] and pruned["released"] == [ours[0]]
    assert snapshots(labvm, fs) == [fs + "@manual", ours[1], ours[2], fs + "@other-20200101T000000Z"]
    assert holds(labvm, ours[1]) == [TAG] and holds(labvm, ours[2]) == [TAG]
    assert not labvm.module("zfs_snapshot", prune)["changed"]
    assert not labvm.module("zfs_snapshot", prune, check=True)["changed"]

    # A new one with keep 2: the oldest of ours by createtxg goes (second), the late-named one stays.
    new = labvm.module("zfs_snapshot", dict(dataset=fs, hold=True, keep=2))
    assert new["created"] and new["destroyed"] == [ours[1]] and new["released"] == [ours[1]]
    assert snapshots(labvm, fs) == [fs + "@manual", ours[2], fs + "@other-20200101T000000Z", new["full_name"]]
    assert [s["full_name"] for s in new["snapshots"]] == snapshots(labvm, fs)
    assert holds(labvm, new["full_name"]) == [TAG] and holds(labvm, fs + "@manual") == []


def test_clones_and_foreign_holds_refuse_the_destroy_before_anything_changes(labvm, fs):
    made = labvm.module("zfs_snapshot", dict(dataset=fs, hold=True))
    snap = made["full_name"]
    labvm.ssh(["zfs", "hold", "theirs", snap])
    for args in (dict(dataset=fs, name=made["snapshot"], state="absent"),
                 dict(dataset=fs, keep_managed=1)):  # a prune that would reach it, with a new snapshot
        for check in (True, False):
            refused = labvm.module("zfs_snapshot", args, check=check, expect_failed=True)
            assert "refusing to destroy: %s is held by theirs" % snap in refused["msg"]
            assert snapshots(labvm, fs) == [snap] and holds(labvm, snap) == sorted(["theirs", TAG])
    labvm.ssh(["zfs", "release", "theirs", snap])

    clone = fs + "-clone"
    labvm.ssh(["zfs", "clone", snap, clone])
    try:
        refused = labvm.module("zfs_snapshot", dict(dataset=fs, name=made["snapshot"], state="absent"),
                               expect_failed=True)
        assert "%s has clones %s" % (snap, clone) in refused["msg"] and "-R is never run" in refused["msg"]
        assert snapshots(labvm, fs) == [snap] and holds(labvm, snap) == [TAG]
        listed = labvm.module("zfs_snapshot_info", dict(dataset=fs))
        assert listed["snapshots"][0]["clones"] == [clone] and listed["held"] == [snap]
    finally:
        labvm.ssh(["zfs", "destroy", clone])
    gone = labvm.module("zfs_snapshot", dict(dataset=fs, name=made["snapshot"], state="absent"))
    assert gone["destroyed"] == [snap] and snapshots(labvm, fs) == []


def test_recursive_snapshot_hold_and_destroy_of_a_tree(labvm, fs):
    labvm.ssh(["zfs", "create", fs + "/child"])
    labvm.ssh(["zfs", "create", "-V", "16M", fs + "/child/vol"])
    tree = [fs, fs + "/child", fs + "/child/vol"]
    args = dict(dataset=fs, name="r", recursive=True, hold=True)
    checked = labvm.module("zfs_snapshot", args, check=True)
    assert checked["changed"] and checked["held"] == sorted(d + "@r" for d in tree)
    assert snapshots(labvm, fs, recursive=True) == []
    made = labvm.module("zfs_snapshot", args)
    assert made["changed"] and made["created"]
    assert sorted(snapshots(labvm, fs, recursive=True)) == sorted(d + "@r" for d in tree)
    # zfs snapshot -r: one transaction group for the whole tree
    assert len(set(createtxg(labvm, d + "@r") for d in tree)) == 1
    assert all(holds(labvm, d + "@r") == [TAG] for d in tree)
    assert not labvm.module("zfs_snapshot", args)["changed"]
    assert not labvm.module("zfs_snapshot", args, check=True)["changed"]

    listed = labvm.module("zfs_snapshot_info", dict(dataset=fs, recursive=True))
    assert listed["datasets"] == sorted(tree) and sorted(listed["held"]) == sorted(d + "@r" for d in tree)
    assert not labvm.module("zfs_snapshot_info", dict(dataset=fs))["snapshots"][0]["managed"]

    gone = dict(dataset=fs, name="r", recursive=True, state="absent")
    would = labvm.module("zfs_snapshot", gone, check=True)
    assert would["changed"] and sorted(would["destroyed"]) == sorted(d + "@r" for d in tree)
    assert len(snapshots(labvm, fs, recursive=True)) == 3
    destroyed = labvm.module("zfs_snapshot", gone)
    assert destroyed["changed"] and sorted(destroyed["released"]) == sorted(d + "@r" for d in tree)
    assert snapshots(labvm, fs, recursive=True) == []
    assert not labvm.module("zfs_snapshot", gone)["changed"]


def test_bad_input_fails_clearly_before_anything_changes(labvm, fs):
    labvm.ssh(["zfs", "snapshot", fs + "@keep"])
    before = snapshots(labvm, "labzpool", recursive=True)
    cases = [
        (dict(dataset=fs + "@keep"), "is not a valid ZFS dataset name"),
        (dict(dataset="-o/x"), "is not a valid ZFS dataset name"),
        (dict(dataset="labzpool//x"), "is not a valid ZFS dataset name"),
        (dict(dataset=fs, name="a/b"), "is not a valid ZFS snapshot name"),
        (dict(dataset=fs, hold=True, hold_tag="-r"), "hold tag '-r'"),
        (dict(dataset=fs, state="absent"), "state=absent needs name"),
        (dict(dataset=fs, keep_managed=0), "keep_managed must be >= 1"),
        (dict(dataset=fs, name="keep", state="absent", hold=True), "hold=true makes no sense"),
        (dict(dataset="labzpool/nope", hold=True), "labzpool/nope': dataset does not exist"),
    ]
    for args, msg in cases:
        failed = labvm.module("zfs_snapshot", args, expect_failed=True)
        assert msg in failed["msg"], (args, failed["msg"])
    missing = labvm.module("zfs_snapshot_info", dict(dataset="nopool/x"), expect_failed=True)
    assert "dataset does not exist" in missing["msg"]
    assert snapshots(labvm, "labzpool", recursive=True) == before
