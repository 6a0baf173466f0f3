# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.lvm and _cli.qemu_nbd: exact argv, and ``lvs`` reports recorded from lvm2 2.03.16.

``fixtures/cli/lvs-report.json`` is the real output of lvs for a volume group on a loop device
holding two linear LVs and a snapshot of one (written with vgcfgrestore: the recording host has no
device-mapper, which is why the attributes show ``X`` for unknown state and stderr complains).
"""

from __future__ import annotations

import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import lvm
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli.qemu_nbd import QemuNbd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._libvirt import domains

FIELDS = ("vg_name", "lv_name", "lv_path", "lv_dm_path", "lv_attr", "lv_size", "pool_lv", "origin")


def test_lvs_argv_env_and_rows(recorded):
    recorded.answer("lvs-report")
    rows = lvm.lvs(FIELDS, names=["snapclivg"])
    assert recorded.argv == ["/usr/sbin/lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                             ",".join(FIELDS), "snapclivg"]
    env = recorded.calls[0]["env"]
    assert env["LC_ALL"] == "C" and env["LVM_SUPPRESS_FD_WARNINGS"] == "1"
    assert [row["lv_name"] for row in rows] == ["data", "db2-root", "db2-root-snap"]
    snap = rows[2]
    assert snap == {"vg_name": "snapclivg", "lv_name": "db2-root-snap", "lv_path": "/dev/snapclivg/db2-root-snap",
                    "lv_dm_path": "/dev/mapper/snapclivg-db2--root--snap", "lv_attr": "swi-XXs---",
                    "lv_size": 8388608, "pool_lv": None, "origin": "db2-root"}


def test_lvs_select_and_every_lv(recorded):
    recorded.answer("lvs-report")
    lvm.lvs(("lv_name",), select="lv_attr=~^s")
    assert recorded.argv == ["/usr/sbin/lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name",
                             "--select", "lv_attr=~^s"]


def test_lvs_of_a_missing_volume_group_is_a_command_error(recorded):
    recorded.answer("lvs-missing-vg")
    with pytest.raises(CommandError, match='lvs failed .rc=5.: Volume group "snapclivg-nope" not found') as err:
        lvm.lvs(("vg_name", "lv_name"), names=["snapclivg-nope"])
    assert err.value.details["rc"] == 5 and err.value.details["cmd"][-1] == "snapclivg-nope"


def test_report_without_a_report_list():
    with pytest.raises(CommandError, match="without a report list"):
        lvm.report_rows({"lv": []})


def test_lvm_index_of_the_recorded_report(recorded, monkeypatch):
    recorded.answer("lvs-report")
    monkeypatch.setattr(domains.os.path, "realpath", lambda p: p)
    index, note = domains.lvm_index()
    assert note is None
    assert recorded.argv == ["/usr/sbin/lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                             ",".join(domains.LVS_FIELDS)]
    root = index["/dev/snapclivg/db2-root"]
    assert root == dict(vg="snapclivg", lv="db2-root", attr="owi-XXs---", size=16777216, pool_lv=None, origin=None)
    assert index["/dev/mapper/snapclivg-db2--root"] is root
    assert index["/dev/snapclivg/db2-root-snap"]["origin"] == "db2-root"


def test_lvm_index_when_lvs_fails(recorded):
    recorded.answer("lvs-missing-vg")
    index, note = domains.lvm_index()
    assert index is None
    assert note == 'lvs failed (rc=5): Volume group "snapclivg-nope" not found | Cannot process volume group ' \
        'snapclivg-nope: LVM classified by path only'


def test_qemu_nbd_argv(recorded, tmp_path):
    server = QemuNbd(str(tmp_path / "layer.qcow2"), cache="writeback", shared=4, read_only=True,
                     allocation_depth=True)
    server.socket, server.pid_file = "/run/x/nbd.sock", "/run/x/qemu-nbd.pid"
    assert server.argv() == ["/usr/bin/qemu-nbd", "--socket=/run/x/nbd.sock", "--format=qcow2", "--cache=writeback",
                             "--aio=threads", "--discard=unmap", "--detect-zeroes=unmap", "--shared=4",
                             "--pid-file=/run/x/qemu-nbd.pid", "--read-only", "--allocation-depth",
                             str(tmp_path / "layer.qcow2")]
    server = QemuNbd("rel.qcow2", fmt="raw", cache="none", aio="native", detect_zeroes="off", persistent=True)
    server.socket, server.pid_file = "/s", "/p"
    assert server.argv() == ["/usr/bin/qemu-nbd", "--socket=/s", "--format=raw", "--cache=none", "--aio=native",
                             "--discard=unmap", "--detect-zeroes=off", "--shared=1", "--pid-file=/p", "--persistent",
                             os.path.abspath("rel.qcow2")]
