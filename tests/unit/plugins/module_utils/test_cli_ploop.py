# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.ploop: the exact argv, outputs recorded from Debian's ploop 1.15, and DiskDescriptor.xml parsing.

``fixtures/cli/ploop-*.json`` were recorded on an unmounted disk made by tests/ploop_fixtures.py
(64 MiB, 1 MiB clusters): a snapshot, the same uuid again, 3 MiB written through qemu-io, a second
snapshot, the list, a merge of the base (refused by ploop) and of the second snapshot, a delete of a
uuid that is gone.  The descriptor tests at the end run the real ploop on a real disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import ploop_fixtures as pf
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import ploop
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import (
    CommandError, ConflictError, InputError, NotFoundError)

P = "/usr/sbin/ploop"
DD = "/tmp/ploop-rec/101/root.hdd/DiskDescriptor.xml"
U1 = "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0001}"
U2 = "{0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0002}"
needs_ploop = pytest.mark.skipif(shutil.which("ploop") is None, reason="Debian's ploop is not installed")


def test_snapshot_argv_and_env(recorded):
    recorded.answer("ploop-snapshot")
    ploop.snapshot(DD, U1)
    assert recorded.argv == [P, "snapshot", "-u", U1, DD]
    assert recorded.calls[0]["env"]["LC_ALL"] == "C"


def test_snapshot_of_an_existing_uuid_is_a_command_error(recorded):
    recorded.answer("ploop-snapshot-exists")
    with pytest.raises(CommandError, match="ploop failed .rc=38.: .*already exist") as err:
        ploop.snapshot(DD, U1)
    assert err.value.details["cmd"] == [P, "snapshot", "-u", U1, DD]


def test_uuid_must_be_a_braced_lower_case_guid(recorded):
    for bad in ("0b1e2a51-7c1d-4e0f-9a55-1b7e5a0c0001", U1.upper(), "{x}", None, "{%s} -A" % U1[1:-1]):
        with pytest.raises(InputError, match="is not a GUID"):
            ploop.snapshot(DD, bad)
    assert not recorded.calls


def test_merge_and_delete_argv(recorded):
    recorded.answer("ploop-snapshot-merge", "ploop-snapshot-merge-base", "ploop-snapshot-delete-missing")
    ploop.merge(DD, U2)
    assert recorded.argv == [P, "snapshot-merge", "-u", U2, DD]
    with pytest.raises(CommandError, match="is that a base image"):
        ploop.merge(DD, U1)
    with pytest.raises(CommandError, match="rc=43.*Can't find snapshot by uuid"):
        ploop.delete(DD, U1)
    assert recorded.argv == [P, "snapshot-delete", "-u", U1, DD]


def test_delete_of_the_top_delta_is_refused_before_ploop_runs(recorded):
    # ploop 1.15 "deletes" the top GUID by throwing the top delta away, with every write in it.
    with pytest.raises(ConflictError, match="throw away every write"):
        ploop.delete(DD, ploop.TOP_GUID)
    assert not recorded.calls


def test_snapshot_list(recorded):
    recorded.answer("ploop-snapshot-list", "ploop-snapshot-list-base")
    rows = ploop.snapshot_list(DD)
    assert recorded.argv == [P, "snapshot-list", "-H", "-o", "uuid,parent_uuid,fname", DD]
    base = os.path.dirname(DD)
    assert [(r["uuid"], r["parent_uuid"]) for r in rows] == [(U1, ploop.NO_PARENT), (U2, U1), (ploop.TOP_GUID, U2)]
    assert rows[0]["fname"] == base + "/root.hdd" and rows[2]["fname"].startswith(base + "/root.hdd.{")
    assert ploop.snapshot_list(DD) == [dict(uuid=ploop.TOP_GUID, parent_uuid=ploop.NO_PARENT, fname=base + "/root.hdd")]


def test_snapshot_list_of_a_missing_descriptor(recorded):
    recorded.answer("ploop-snapshot-list-missing-file")
    with pytest.raises(CommandError, match="rc=1.*No such file"):
        ploop.snapshot_list("/tmp/ploop-rec/nope/DiskDescriptor.xml")


def test_snapshot_list_line_that_does_not_parse(recorded):
    recorded.answers.append(dict(rc=0, stdout="PARENT_UUID C UUID FNAME\n", stderr=""))
    with pytest.raises(CommandError, match="not 'uuid parent_uuid fname'"):
        ploop.snapshot_list(DD)


def test_stack_spec():
    spec = ploop.stack_spec(["/d/root.hdd", "/d/root.hdd.{x}"])
    assert spec.startswith("json:")
    doc = json.loads(spec[5:])
    assert doc["file"]["filename"] == "/d/root.hdd.{x}" and doc["driver"] == "parallels"
    assert doc["backing"] == {"driver": "parallels", "file": {"driver": "file", "filename": "/d/root.hdd"}}
    with pytest.raises(InputError):
        ploop.stack_spec([])


# --------------------------------------------------------------------------------------------
# DiskDescriptor.xml of real disks, changed by the real ploop


@needs_ploop
def test_descriptor_of_a_fresh_disk_and_after_two_snapshots(tmp_path):
    dd = pf.make_disk(str(tmp_path / "root.hdd"))
    desc = ploop.read_descriptor(dd)
    assert desc.chain == [ploop.TOP_GUID] and desc.top == ploop.TOP_GUID
    assert desc.size == 64 * pf.MiB and desc.blocksize == 2048
    assert desc.file(ploop.TOP_GUID) == str(tmp_path / "root.hdd" / "root.hdd")
    ploop.snapshot(dd, U1)
    ploop.snapshot(dd, U2)
    desc = ploop.read_descriptor(dd)
    assert desc.chain == [U1, U2, ploop.TOP_GUID]
    assert desc.parent(U1) is None and desc.parent(U2) == U1 and desc.child(U1) == U2 and desc.child(ploop.TOP_GUID) is None
    listed = ploop.snapshot_list(dd)
    assert [r["uuid"] for r in listed] == desc.chain
    assert [r["fname"] for r in listed] == [desc.file(g) for g in desc.chain]
    assert desc.stack(U2) == [desc.file(U1), desc.file(U2)]
    with pytest.raises(NotFoundError):
        desc.stack("{00000000-0000-0000-0000-00000000dead}")


@needs_ploop
def test_descriptor_whose_image_is_missing_is_refused(tmp_path):
    dd = pf.make_disk(str(tmp_path / "root.hdd"))
    ploop.snapshot(dd, U1)
    top = ploop.read_descriptor(dd).file(ploop.TOP_GUID)
    os.unlink(top)
    with pytest.raises(NotFoundError, match="image files that are missing: " + top.replace("{", ".").replace("}", ".")):
        ploop.read_descriptor(dd)
    assert ploop.read_descriptor(dd, require_files=False).chain == [U1, ploop.TOP_GUID]


def test_descriptor_errors(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        ploop.read_descriptor(str(tmp_path / "DiskDescriptor.xml"))
    bad = tmp_path / "bad.xml"
    bad.write_text("<Parallels_disk_image><oops></Parallels_disk_image>")
    with pytest.raises(InputError, match="cannot read"):
        ploop.read_descriptor(str(bad))
    bad.write_text("<domain/>")
    with pytest.raises(InputError, match="not a ploop DiskDescriptor"):
        ploop.read_descriptor(str(bad))
    dd = pf.make_disk(str(tmp_path / "loop"))
    text = open(dd).read().replace("{00000000-0000-0000-0000-000000000000}", ploop.TOP_GUID)
    open(dd, "w").write(text)
    with pytest.raises(InputError, match="form a loop"):
        ploop.read_descriptor(dd)


def test_fixture_disk_is_what_qemu_reads(tmp_path):
    dd = pf.make_disk(str(tmp_path / "d"), size=8 * pf.MiB)
    image = os.path.join(os.path.dirname(dd), "root.hdd")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "parallels", image],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 8 * pf.MiB
    with open(image, "rb") as f:
        assert f.read(16) == b"WithoutFreeSpace"
