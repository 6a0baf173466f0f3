import datetime

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core import naming as _naming
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.extents import DATA, ZERO, Extent, clip, merge, split
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ceph.snapshots import plan, validate

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 11, 22, 3, 15, 0, tzinfo=UTC)


def test_managed_name_round_trip():
    name = _naming.managed_name("snapchain-", T0)
    assert name == "snapchain-20261122T031500Z"
    assert _naming.parse_managed(name) == T0
    assert not _naming.is_managed("snapchain-20261122T031500Z-manual")
    assert not _naming.is_managed("other-20261122T031500Z")
    assert not _naming.is_managed("snapchain-20261399T031500Z")  # not a date


def test_unique_name_never_collides_nor_goes_back():
    existing = ["snapchain-20261122T031500Z", "snapchain-20261122T031501Z"]
    assert _naming.unique_managed_name(existing, when=T0) == "snapchain-20261122T031502Z"
    earlier = T0 - datetime.timedelta(hours=1)
    assert _naming.unique_managed_name(existing, when=earlier) == "snapchain-20261122T031502Z"


@pytest.mark.parametrize("prefix", ["", "-x", "a/b", "a b", "x" * 65])
def test_bad_prefix(prefix):
    with pytest.raises(ValueError):
        _naming.check_prefix(prefix)


def snaps(*names, protected=()):
    return [dict(name=n, protected=n in protected, managed=_naming.is_managed(n)) for n in names]


def params(**kw):
    out = dict(state="present", name=None, prefix="snapchain-", protected=None, keep_managed=None, image="img")
    out.update(kw)
    return out


def test_plan_named_is_idempotent():
    assert plan(snaps("a"), params(name="a")) == dict(target="a", create=False, protect=None, remove=[])
    assert plan(snaps(), params(name="a"))["create"]
    assert plan(snaps("a"), params(name="a", protected=True))["protect"] is True
    assert plan(snaps("a", protected=["a"]), params(name="a", protected=True))["protect"] is None


def test_plan_keep_managed_only_touches_managed():
    current = snaps("manual", "snapchain-20261120T000000Z", "snapchain-20261121T000000Z", "snapchain-x")
    todo = plan(current, params(keep_managed=2), new_name="snapchain-20261122T000000Z")
    assert todo["create"] and todo["target"] == "snapchain-20261122T000000Z"
    assert todo["remove"] == ["snapchain-20261120T000000Z"]


def test_plan_absent():
    assert plan(snaps("a"), params(state="absent", name="a"))["remove"] == ["a"]
    assert plan(snaps(), params(state="absent", name="a"))["remove"] == []


@pytest.mark.parametrize("bad", [
    dict(keep_managed=0),
    dict(state="absent"),
    dict(state="absent", name="a", protected=True),
    dict(name="a@b"),
    dict(prefix="bad prefix"),
])
def test_validate_refuses(bad):
    with pytest.raises(InputError):
        validate(params(**bad))


def test_extents_merge_split_clip():
    exts = [Extent(10, 5), Extent(0, 10), Extent(20, 5, ZERO), Extent(25, 5, ZERO)]
    assert merge(exts) == [Extent(0, 15, DATA), Extent(20, 10, ZERO)]
    assert list(split([Extent(0, 10)], 4)) == [Extent(0, 4), Extent(4, 4), Extent(8, 2)]
    assert list(clip([Extent(0, 10), Extent(12, 4)], 8)) == [Extent(0, 8)]
    with pytest.raises(ValueError):
        merge([Extent(0, 10), Extent(5, 10, ZERO)])
