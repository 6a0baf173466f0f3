# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.zfs and _zfs.snapshots: the exact argv, outputs recorded from OpenZFS 2.1.11, and the plan.

``fixtures/cli/zfs-*.json`` were recorded in the lab VM (tests/lab/labvm.py, zfs-2.1.11-1+deb12u1):
filesystem ``labzpool/unit`` with a zvol ``labzpool/unit/vol``, a snapshot ``@manual`` cloned to
``labzpool/unit-clone``, and ``-r @snapchain-20261207T031500Z`` held on the filesystem by tags
``snapchain`` and ``theirs``; then a plain destroy of the held one and a second hold of the same tag
(both refused by zfs), and a list of a dataset that does not exist.  The behaviour against the real
tools is tested in tests/integration/test_zfs_snapshot.py.
"""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs import snapshots as snaps

Z = "/usr/sbin/zfs"
OURS = "snapchain-20261207T031500Z"


def params(**kw):
    out = dict(dataset="labzpool/unit", name=None, prefix="snapchain-", state="present", recursive=False, hold=None,
               hold_tag="snapchain", keep_managed=None)
    out.update(kw)
    return out


def test_list_snapshots_argv_and_typed_rows(recorded):
    recorded.answer("zfs-list-snapshots")
    rows = zfs.snapshots("labzpool/unit", recursive=True)
    assert recorded.argv == [Z, "list", "-H", "-p", "-o", ",".join(zfs.LIST_FIELDS), "-t", "snapshot", "-r",
                             "labzpool/unit"]
    assert recorded.calls[0]["env"]["LC_ALL"] == "C"
    # createtxg order, then the full name (zfs snapshot -r made both of ours in txg 176)
    assert [r["name"] for r in rows] == ["labzpool/unit@manual", "labzpool/unit/vol@" + OURS, "labzpool/unit@" + OURS]
    assert rows[0] == dict(name="labzpool/unit@manual", type="snapshot", createtxg=175, creation=1796657540, used=0,
                           referenced=24576, userrefs=0, clones=["labzpool/unit-clone"], guid="9036993987181878153")
    assert rows[2]["clones"] == [] and rows[2]["userrefs"] == 2 and rows[1]["userrefs"] == 0


def test_depth_one_without_recursive(recorded):
    recorded.answer("zfs-list-snapshots")
    zfs.snapshots("labzpool/unit")
    assert recorded.argv[-3:] == ["-d", "1", "labzpool/unit"]


def test_a_missing_dataset_is_not_found(recorded):
    recorded.answer("zfs-list-missing")
    with pytest.raises(NotFoundError, match="cannot open 'labzpool/nope': dataset does not exist") as err:
        zfs.list_datasets(["labzpool/nope"], fields=("name", "type"), types=["filesystem", "volume"])
    assert err.value.details["cmd"] == [Z, "list", "-H", "-p", "-o", "name,type", "-t", "filesystem,volume",
                                        "labzpool/nope"]


def test_holds_without_p_and_get(recorded):
    recorded.answer("zfs-holds", "zfs-get")
    a, b = "labzpool/unit@" + OURS, "labzpool/unit/vol@" + OURS
    held = zfs.holds([a, b])
    assert recorded.argv == [Z, "holds", "-H", a, b]
    assert held == {a: {"theirs": "Mon Dec  7 15:32 2026", "snapchain": "Mon Dec  7 15:32 2026"}, b: {}}
    props = zfs.get(["labzpool/unit", "labzpool/unit@manual"], ["guid", "receive_resume_token", "clones"])
    assert recorded.argv == [Z, "get", "-H", "-p", "-o", "name,property,value,source",
                             "guid,receive_resume_token,clones", "labzpool/unit", "labzpool/unit@manual"]
    assert props["labzpool/unit"] == dict(guid="13583797092031583163", receive_resume_token=None, clones=[])
    assert props["labzpool/unit@manual"]["clones"] == ["labzpool/unit-clone"]
    assert zfs.holds([]) == {} and len(recorded.calls) == 2


def test_refusals_of_zfs_are_command_errors(recorded):
    recorded.answer("zfs-destroy-held", "zfs-hold-exists")
    with pytest.raises(CommandError, match="zfs failed .rc=1.: .*dataset is busy"):
        zfs.destroy("labzpool/unit@" + OURS)
    assert recorded.argv == [Z, "destroy", "labzpool/unit@" + OURS]
    with pytest.raises(CommandError, match="tag already exists"):
        zfs.hold("snapchain", ["labzpool/unit@" + OURS])
    assert recorded.argv == [Z, "hold", "snapchain", "labzpool/unit@" + OURS]


def test_change_argv(recorded):
    zfs.snapshot(["tank/a@s"], recursive=True)
    assert recorded.argv == [Z, "snapshot", "-r", "tank/a@s"]
    zfs.destroy("tank/a@s", recursive=True)
    assert recorded.argv == [Z, "destroy", "-r", "tank/a@s"]
    zfs.release("snapchain", ["tank/a@s", "tank/a/b@s"])
    assert recorded.argv == [Z, "release", "snapchain", "tank/a@s", "tank/a/b@s"]
    with pytest.raises(InputError, match="only ever run on a snapshot"):
        zfs.destroy("tank/a")
    assert len(recorded.calls) == 3


@pytest.mark.parametrize("name", ["", "-o", "1pool", "tank/", "tank//a", "tank/a@s", "tank/a#b", "tank/%x",
                                  "tank/..", "tank/a\tb", None, "t/" + "a" * 254])
def test_bad_dataset_names(name):
    with pytest.raises(InputError, match="not a valid ZFS dataset name"):
        zfs.check_dataset(name)


def test_good_names_and_tags():
    assert zfs.check_dataset("tank/vm 1/disk-0_a:b.c") == "tank/vm 1/disk-0_a:b.c"
    assert zfs.check_snapshot_name(OURS, "tank/a") == OURS
    for bad in ("a/b", "a@b", "", ".."):
        with pytest.raises(InputError, match="not a valid ZFS snapshot name"):
            zfs.check_snapshot_name(bad, "tank")
    for bad in ("-r", "", "a b", "x" * 65):
        with pytest.raises(InputError, match="hold tag"):
            zfs.check_tag(bad)


def _snap(name, txg, dataset="labzpool/unit", holds=(), clones=()):
    full = "%s@%s" % (dataset, name)
    return dict(name=name, full_name=full, dataset=dataset, createtxg=txg, creation=None, used=0, referenced=0,
                userrefs=len(holds), clones=list(clones), guid="1", holds=sorted(holds), held="snapchain" in holds,
                managed=name.startswith("snapchain-"))


DATASETS = {"labzpool/unit": "filesystem", "labzpool/unit/vol": "volume"}


def test_keep_orders_ours_by_createtxg_and_leaves_others():
    snaps_ = [_snap("snapchain-20261201T000000Z", 10), _snap("manual", 11), _snap("snapchain-20261203T000000Z", 12),
              _snap("snapchain-20200101T000000Z", 13), _snap("other-20200101T000000Z", 14)]
    todo = snaps.plan(DATASETS, snaps_, params(state="absent", keep_managed=2))
    assert todo == dict(target=None, create=False, hold=[], release=[], destroy=["snapchain-20261201T000000Z"],
                        decisions=[])
    todo = snaps.plan(DATASETS, snaps_, params(keep_managed=1, hold=True))
    assert todo["create"] and todo["target"] > "snapchain-20261203T000000Z"
    assert todo["hold"] == ["labzpool/unit/vol@" + todo["target"], "labzpool/unit@" + todo["target"]]  # sorted
    assert todo["destroy"] == ["snapchain-20261201T000000Z", "snapchain-20261203T000000Z", "snapchain-20200101T000000Z"]


def test_present_existing_hold_release_and_a_name_taken_below():
    base = [_snap("base", 5, holds=("theirs",))]
    assert snaps.plan(DATASETS, base, params(name="base"))["create"] is False
    assert snaps.plan(DATASETS, base, params(name="base", hold=True))["hold"] == ["labzpool/unit@base"]
    assert snaps.plan(DATASETS, base, params(name="base", hold=False))["release"] == []
    below = [_snap("x", 5, dataset="labzpool/unit/vol")]
    with pytest.raises(ConflictError, match="labzpool/unit@x does not exist but labzpool/unit/vol@x does"):
        snaps.plan(DATASETS, below, params(name="x", recursive=True))


def test_refuse_destroy_names_clones_and_foreign_holds_only():
    victims = [_snap("a", 1, holds=("snapchain",)), _snap("b", 2, holds=("snapchain", "zrepl")),
               _snap("c", 3, clones=("labzpool/c1",))]
    with pytest.raises(ConflictError) as err:
        snaps.refuse_destroy(victims, "snapchain")
    assert err.value.details["problems"] == ["labzpool/unit@b is held by zrepl", "labzpool/unit@c has clones labzpool/c1"]
    snaps.refuse_destroy(victims[:1], "snapchain")


def test_ensure_refuses_before_any_change(recorded):
    # The recorded tree: our snapshot is held by "theirs" too, so destroying it is refused after the three reads.
    recorded.answer("zfs-list-datasets", "zfs-list-snapshots", "zfs-holds")
    with pytest.raises(ConflictError, match="labzpool/unit@%s is held by theirs" % OURS):
        snaps.ensure(params(name=OURS, state="absent", recursive=True))
    assert [c["argv"][1] for c in recorded.calls] == ["list", "list", "holds"]


def test_validation():
    for kw, msg in ((dict(state="absent"), "needs name"), (dict(keep_managed=0), ">= 1"),
                    (dict(state="absent", name="x", hold=True), "makes no sense"), (dict(prefix="-x"), "prefix"),
                    (dict(dataset="tank/a@b"), "dataset name")):
        with pytest.raises(InputError, match=msg):
            snaps.validate(params(**kw))


def test_a_keep_policy_prunes_ours_by_the_time_in_their_names():
    # two a day for four days, and two snapshots of others that the policy never sees
    names = ["snapchain-202612%02dT%02d0000Z" % (day, hour) for day in (1, 2, 3, 4) for hour in (3, 15)]
    snaps_ = [_snap(n, 10 + i) for i, n in enumerate(names)] + [_snap("manual", 5), _snap("other-20261201T000000Z", 6)]
    todo = snaps.plan(DATASETS, snaps_, params(state="absent", keep_last=1, keep_daily=2,
                                               protected=["snapchain-20261201T030000Z"]))
    decided = dict((d["name"], (d["action"], d["rule"])) for d in todo["decisions"])
    assert decided == {
        "snapchain-20261204T150000Z": ("keep", "keep_last"),
        "snapchain-20261204T030000Z": ("remove", None),  # its day is kept by keep_last's point already
        "snapchain-20261203T150000Z": ("keep", "keep_daily"),
        "snapchain-20261203T030000Z": ("remove", None),
        "snapchain-20261202T150000Z": ("keep", "keep_daily"),
        "snapchain-20261202T030000Z": ("remove", None),
        "snapchain-20261201T150000Z": ("remove", None),
        "snapchain-20261201T030000Z": ("keep", "protected"),
    }
    assert sorted(todo["destroy"]) == sorted(n for n, (a, _r) in decided.items() if a == "remove")
    # a new snapshot in the same run counts as the newest point
    todo = snaps.plan(DATASETS, snaps_, params(keep_last=2))
    assert todo["create"] and [d["name"] for d in todo["decisions"] if d["action"] == "keep"] == [
        todo["target"], "snapchain-20261204T150000Z"]


def test_policy_validation():
    for kw, msg in ((dict(state="absent", keep_daily=0), "needs name"),
                    (dict(state="absent", keep_managed=2, keep_daily=3), "not both"),
                    (dict(state="absent", keep_daily=-1), ">= 0"),
                    (dict(state="absent", name="x", protected=["y"]), "protected applies")):
        with pytest.raises(InputError, match=msg):
            snaps.validate(params(**kw))


@pytest.mark.parametrize("mounted,where,expected", [("yes", "/srv/fs", "/srv/fs"), ("no", "/srv/fs", None),
                                                    ("yes", "legacy", None), ("no", "none", None)])
def test_mounted_at(recorded, mounted, where, expected):
    # zfs get -H -p output as zfs-get.json records it (name, property, value, source; tab-separated)
    recorded.answers.append(dict(rc=0, stderr="", stdout="labzpool/fs\tmounted\t%s\t-\nlabzpool/fs\tmountpoint\t%s\tlocal\n"
                                 % (mounted, where)))
    assert snaps.mounted_at("labzpool/fs") == expected
    assert recorded.argv == [Z, "get", "-H", "-p", "-o", "name,property,value,source", "mounted,mountpoint",
                             "labzpool/fs"]
