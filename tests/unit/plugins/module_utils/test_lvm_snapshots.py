# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_lvm.snapshots and the lvm wrappers: parsing of real ``lvs`` reports and the argv of each change.

``fixtures/cli/lvs-snapshots*.json`` and ``lvcreate-exists.json`` were recorded in the lab VM
(tests/lab/labvm.py, lvm2 2.03.16 on real device-mapper): VG ``unitvg`` with a linear LV ``lin1``, a
classic snapshot of it that overflowed (``snapchain-20261207T031500Z``, 4 MiB, 6 MiB written) and one
that did not (``lin1-ok``), a thin pool at 8% data / 11.04% metadata, a thin LV and an inactive thin
snapshot of it. The behaviour against the real tools is tested in tests/integration/test_lvm_snapshot.py.
"""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import lvm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._lvm import snapshots as snaps

OVERFLOWED = "snapchain-20261207T031500Z"


def params(**kw):
    out = dict(vg="unitvg", lv="lin1", name=None, prefix="snapchain-", state="present", size=None, chunk_size=None,
               thin_pool_max_percent=90.0)
    out.update(kw)
    return out


def test_rows_are_typed(recorded):
    recorded.answer("lvs-snapshots")
    rows = snaps.vg_rows("unitvg")
    assert recorded.argv == ["/usr/sbin/lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                             ",".join(snaps.FIELDS), "unitvg"]
    assert rows["pool"]["data_percent"] == 8.0 and rows["pool"]["metadata_percent"] == 11.04
    assert rows["pool"]["chunk_size"] == 65536 and rows["thin1"]["thin_id"] == 1
    assert rows["lin1"]["data_percent"] is None and rows["lin1"]["origin"] is None
    assert rows["thin1-snap"]["data_percent"] is None and rows["thin1-snap"]["thin_id"] == 2


def test_kinds_overflow_and_description(recorded):
    recorded.answer("lvs-snapshots")
    rows = snaps.vg_rows("unitvg")
    assert [snaps.snapshot_type(rows[n]) for n in ("lin1", "lin1-ok", OVERFLOWED, "pool", "thin1", "thin1-snap")] \
        == [None, "classic", "classic", None, None, "thin"]
    assert snaps.is_overflowed(rows[OVERFLOWED]) and not snaps.is_overflowed(rows["lin1-ok"])
    thin = snaps.describe(rows["thin1-snap"])
    assert thin["activation_skip"] and not thin["active"] and thin["pool"] == "pool" and not thin["managed"]
    bad = snaps.describe(rows[OVERFLOWED])
    assert bad["overflowed"] and bad["managed"] and bad["data_percent"] == 100.0 and bad["chunk_size"] == 65536
    assert [s["name"] for s in snaps.snapshots_of(rows, "lin1", "snapchain-")] == [OVERFLOWED, "lin1-ok"]


def test_missing_vg_is_not_found(recorded):
    recorded.answer("lvs-snapshots-missing-vg")
    with pytest.raises(NotFoundError, match="volume group novg not found"):
        snaps.vg_rows("novg")


@pytest.mark.parametrize("size,expected", [
    ("512m", ("size", "512m")), ("2G", ("size", "2g")), ("1.5g", ("size", "1.5g")), ("64", ("size", "64m")),
    ("20%ORIGIN", ("extents", "20%ORIGIN")), ("100%ORIGIN", ("extents", "100%ORIGIN"))])
def test_sizes(size, expected):
    assert snaps.parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "-1m", "1x", "0%ORIGIN", "101%ORIGIN", "20%VG", "100k", "1 g", "m"])
def test_bad_sizes(size):
    with pytest.raises(InputError):
        snaps.parse_size(size)


def test_chunk_sizes():
    assert snaps.parse_chunk_size("64k") == 65536 and snaps.parse_chunk_size("4") == 4096
    for bad in ("3k", "1024k", "96k", "64m", "k", "2k"):
        with pytest.raises(InputError):
            snaps.parse_chunk_size(bad)


@pytest.mark.parametrize("name", ["-x", "a b", "x/y", ".", "snapshot", "pvmove", "a_tdata", "a" * 128, "", "é"])
def test_bad_names(name):
    with pytest.raises(InputError):
        snaps.check_name(name, "name")


def test_bad_inputs_fail_before_lvm_runs(recorded):
    for bad in (dict(state="absent"), dict(name="lin1"), dict(chunk_size="64k"), dict(thin_pool_max_percent=0),
                dict(thin_pool_max_percent=101), dict(prefix="-x"), dict(size="1x")):
        with pytest.raises(InputError):
            snaps.ensure(params(**bad))
    assert recorded.calls == []


def test_classic_create_argv(recorded):
    recorded.answer("lvs-snapshots")
    recorded.answers.append(dict(rc=0, stdout="", stderr=""))
    recorded.answer("lvs-snapshots")
    result = snaps.ensure(params(name="new", size="25%ORIGIN", chunk_size="64k"))
    assert recorded.calls[1]["argv"] == ["/usr/sbin/lvcreate", "--snapshot", "--name", "new", "--extents",
                                         "25%ORIGIN", "--chunksize", "64k", "unitvg/lin1"]
    assert result["created"] and result["changed"] and len(recorded.calls) == 3  # lvs, lvcreate, lvs


def test_thin_create_is_activated_with_k(recorded):
    recorded.answer("lvs-snapshots")
    recorded.answers.extend([dict(rc=0, stdout="", stderr="")] * 2)
    recorded.answer("lvs-snapshots")
    snaps.ensure(params(lv="thin1", name="t2"))
    assert [c["argv"] for c in recorded.calls[1:3]] == [
        ["/usr/sbin/lvcreate", "--snapshot", "--name", "t2", "unitvg/thin1"],
        ["/usr/sbin/lvchange", "--activate", "y", "--ignoreactivationskip", "unitvg/t2"]]


def test_thin_activation_failure_removes_the_new_snapshot(recorded):
    recorded.answer("lvs-snapshots")
    recorded.answers.extend([dict(rc=0, stdout="", stderr=""), dict(rc=5, stdout="", stderr="  activation failed\n")])
    with pytest.raises(CommandError, match="activation failed"):
        snaps.ensure(params(lv="thin1", name="t2"))
    assert recorded.argv == ["/usr/sbin/lvremove", "--yes", "unitvg/t2"]


def test_existing_inactive_thin_snapshot_is_activated(recorded):
    recorded.answer("lvs-snapshots")
    result = snaps.ensure(params(lv="thin1", name="thin1-snap"), check_mode=True)
    assert result["changed"] and result["activated"] and not result["created"] and len(recorded.calls) == 1


def test_check_mode_runs_only_lvs_and_predicts_the_diff(recorded):
    recorded.answer("lvs-snapshots")
    result = snaps.ensure(params(size="8m"), check_mode=True)
    assert len(recorded.calls) == 1 and result["created"] and result["snapshot"].startswith("snapchain-")
    assert result["snapshot"] > OVERFLOWED  # a managed name newer than every existing one
    assert result["diff"]["after"]["snapshots"] == sorted([OVERFLOWED, "lin1-ok", result["snapshot"]])


def test_existing_same_origin_is_unchanged(recorded):
    recorded.answer("lvs-snapshots")
    result = snaps.ensure(params(name="lin1-ok", size="8m"))
    assert not result["changed"] and result["data_percent"] == 75.39 and result["type"] == "classic"
    assert len(recorded.calls) == 1


def test_overflowed_snapshot_is_a_clear_failure(recorded):
    recorded.answer("lvs-snapshots")
    with pytest.raises(ConflictError, match="overflowed .* never backed up") as err:
        snaps.ensure(params(name=OVERFLOWED, size="8m"))
    assert err.value.details["overflowed"] and len(recorded.calls) == 1


def test_thin_pool_above_the_limit_is_refused(recorded):
    recorded.answer("lvs-snapshots")
    with pytest.raises(ConflictError, match=r"thin pool unitvg/pool is 8.00% full .data. and 11.04% .metadata.") as err:
        snaps.ensure(params(lv="thin1", name="t2", thin_pool_max_percent=11))
    assert err.value.details["metadata_percent"] == 11.04 and len(recorded.calls) == 1


def test_size_kind_must_match_the_origin(recorded):
    recorded.answer("lvs-snapshots", "lvs-snapshots")
    with pytest.raises(InputError, match="thin LV"):
        snaps.ensure(params(lv="thin1", name="t2", size="8m"))
    with pytest.raises(InputError, match="needs a size"):
        snaps.ensure(params(name="c2"))


def test_foreign_names_are_refused(recorded):
    recorded.answer("lvs-snapshots", "lvs-snapshots", "lvs-snapshots")
    with pytest.raises(ConflictError, match="not a snapshot of lin1"):
        snaps.ensure(params(name="thin1-snap", size="8m"))
    with pytest.raises(ConflictError, match="not removed"):
        snaps.ensure(params(name="thin1-snap", state="absent"))
    with pytest.raises(ConflictError, match="not removed"):
        snaps.ensure(params(lv="thin1", name="pool", state="absent"))
    assert len(recorded.calls) == 3


def test_absent_argv_and_missing_is_unchanged(recorded):
    recorded.answer("lvs-snapshots")
    recorded.answers.append(dict(rc=0, stdout="", stderr=""))
    recorded.answer("lvs-snapshots")
    result = snaps.ensure(params(name=OVERFLOWED, state="absent"))
    assert result["removed"] and recorded.calls[1]["argv"] == ["/usr/sbin/lvremove", "--yes", "unitvg/" + OVERFLOWED]
    recorded.calls.clear()
    recorded.answer("lvs-snapshots")
    assert not snaps.ensure(params(name="gone", state="absent"))["changed"]


def test_lvcreate_failure_is_a_command_error(recorded):
    recorded.answer("lvcreate-exists")
    with pytest.raises(CommandError, match="already exists"):
        lvm.create_snapshot("unitvg/lin1", "lin1-ok", size="8m")


def test_info(recorded):
    recorded.answer("lvs-snapshots")
    out = snaps.info(dict(vg="unitvg", lv=None, prefix="snapchain-"))
    assert out["overflowed"] == [OVERFLOWED] and [p["name"] for p in out["thin_pools"]] == ["pool"]
    assert sorted(s["name"] for s in out["snapshots"]) == sorted([OVERFLOWED, "lin1-ok", "thin1-snap"])
    assert out["volumes"] == ["lin1", "thin1"]  # no snapshot, no pool


def test_info_volumes_include_exclude(recorded):
    recorded.answer("lvs-snapshots")
    out = snaps.info(dict(vg="unitvg", lv=None, prefix="snapchain-", include=["*1"], exclude=["thin*"]))
    assert out["volumes"] == ["lin1"]
    with pytest.raises(InputError, match="LV names"):  # before lvs runs
        snaps.info(dict(vg="unitvg", lv=None, prefix="snapchain-", include=["unitvg/lin1"]))
    assert len(recorded.calls) == 1


def test_lvm_source_checks_the_snapshot_before_reading(recorded):
    from ansible_collections.snapchain.vmbackup.plugins.module_utils._sources import lvm as lvm_source
    assert lvm_source.parse_lv("unitvg/lin1-ok") == ("unitvg", "lin1-ok")
    for bad in ("unitvg", "a/b/c", "/x", "unitvg/-x"):
        with pytest.raises(InputError):
            lvm_source.parse_lv(bad)
    recorded.answer("lvs-snapshots", "lvs-snapshots", "lvs-snapshots", "lvs-snapshots", "lvs-snapshots")
    assert lvm_source.snapshot_row("unitvg", "lin1-ok")["origin"] == "lin1"
    with pytest.raises(ConflictError, match="overflowed .* not backed up"):
        lvm_source.snapshot_row("unitvg", OVERFLOWED)
    with pytest.raises(InputError, match="a thin snapshot, not a classic"):
        lvm_source.snapshot_row("unitvg", "thin1-snap")
    with pytest.raises(InputError, match="no snapshot, not a classic"):
        lvm_source.snapshot_row("unitvg", "lin1")
    with pytest.raises(NotFoundError):
        lvm_source.snapshot_row("unitvg", "gone")
