# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_ploop.snapshots without ploop: option checks, the private root, our record file and its lock.

tests/integration/test_ploop_snapshot.py runs the module against the real ploop.
"""

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    InputError, LockedError, RepositoryError)
from ansible_collections.snapchain.vmbackup.plugins.module_utils._ploop import snapshots as sn

GUID = "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0001}"


def params(**kw):
    out = dict(descriptor="/vz/private/101/root.hdd/DiskDescriptor.xml", root="/vz/private", state="present",
               name=None, uuid=None, temporary=False)
    out.update(kw)
    return out


@pytest.mark.parametrize("kw, message", [
    (dict(), "state=present needs name"),
    (dict(state="merged"), "needs name or uuid"),
    (dict(state="absent"), "needs name or uuid"),
    (dict(name="a", uuid=GUID), "uuid only applies"),
    (dict(state="merged", uuid="0b1e2a51"), "is not a GUID"),
    (dict(state="list", temporary=True), "temporary only applies"),
    (dict(name="a\nb"), "printable"),
    (dict(name=" "), "printable"),
])
def test_validate_refuses(kw, message):
    with pytest.raises(InputError, match=message):
        sn.validate(params(**kw))


def test_validate_accepts():
    sn.validate(params(name="nightly", temporary=True))
    sn.validate(params(state="merged", uuid=GUID))
    sn.validate(params(state="list"))


def test_inside_root(tmp_path):
    root = tmp_path / "private"
    (root / "101" / "root.hdd").mkdir(parents=True)
    dd = root / "101" / "root.hdd" / "DiskDescriptor.xml"
    assert sn.inside_root(str(dd), str(root)) == str(dd)
    for outside in (tmp_path / "privateX" / "DiskDescriptor.xml", root / ".." / "x" / "DiskDescriptor.xml", root):
        with pytest.raises(InputError, match="outside the private root"):
            sn.inside_root(str(outside), str(root))
    os.symlink(str(tmp_path), str(root / "102"))
    with pytest.raises(InputError, match="outside the private root"):
        sn.inside_root(str(root / "102" / "DiskDescriptor.xml"), str(root))


def test_record_round_trip_and_settle(tmp_path):
    dd = str(tmp_path / "DiskDescriptor.xml")
    rec = sn.Record(dd).load()
    assert rec.snapshots == []
    rec.snapshots = [dict(name="a", uuid=GUID, state="creating"), dict(name="b", uuid="{x}", state="made")]
    rec.save()
    doc = json.loads((tmp_path / sn.RECORD_FILE).read_text())
    assert doc["format"] == sn.RECORD_FORMAT and doc["version"] == 1
    assert oct(os.stat(rec.path).st_mode & 0o777) == "0o600"
    rec = sn.Record(dd).load()
    dropped, changed = rec.settle([GUID])
    assert [s["name"] for s in dropped] == ["b"] and changed and rec.snapshots[0]["state"] == "made"
    assert rec.settle([GUID]) == ([], False)
    assert rec.by_name("a") is rec.by_uuid(GUID)
    assert [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")] == []


@pytest.mark.parametrize("text, message", [
    ("{", "cannot read"), ("[]", "not a snapchain ploop snapshot record"),
    ('{"format": "snapchain.vmbackup/ploop-snapshots", "version": 9, "snapshots": []}', "record version 9"),
])
def test_record_that_does_not_read(tmp_path, text, message):
    (tmp_path / sn.RECORD_FILE).write_text(text)
    with pytest.raises(RepositoryError, match=message):
        sn.Record(str(tmp_path / "DiskDescriptor.xml")).load()


def test_record_lock_is_exclusive(tmp_path):
    one, two = sn.Record(str(tmp_path / "DiskDescriptor.xml")), sn.Record(str(tmp_path / "DiskDescriptor.xml"))
    one.lock()
    try:
        with pytest.raises(LockedError, match="another run"):
            two.lock()
    finally:
        one.unlock()
    two.lock()
    two.unlock()
