# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_cli.blockdev and _cli.qemu_storage_daemon: exact argv, and outputs recorded from util-linux 2.38.1
(partx --pairs of a GPT disk made with sgdisk and of a disk without a table, blkid -p of the ext4 in it)."""

from __future__ import annotations

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import blockdev
from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import qemu_storage_daemon as qsd
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import CommandError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._mount import point


@pytest.fixture
def tools(recorded, monkeypatch):
    for tool, path in ((blockdev.LOSETUP, "/usr/sbin/losetup"), (blockdev.PARTX, "/usr/bin/partx"),
                       (blockdev.BLKID, "/usr/sbin/blkid"), (blockdev.FINDMNT, "/usr/bin/findmnt"),
                       (blockdev.MOUNT, "/usr/bin/mount"), (blockdev.UMOUNT, "/usr/bin/umount"),
                       (qsd.QSD, "/usr/bin/qemu-storage-daemon")):
        monkeypatch.setattr(tool, "_path", path)
    return recorded


def test_partitions_of_a_gpt_disk(tools):
    tools.answer("partx-gpt")
    parts = blockdev.partitions("/dev/loop0")
    assert tools.argv == ["/usr/bin/partx", "--pairs", "-b", "-o", "NR,START,SECTORS,SIZE,TYPE,UUID,NAME", "/dev/loop0"]
    assert parts == [{"number": 1, "start": 1048576, "size": 41943040, "sectors": 81920,
                      "type": "0fc63daf-8483-4772-8e79-3d69d8477de4", "uuid": "558735ea-0d87-44c5-9e80-7491875f5691",
                      "name": None}]


def test_a_disk_without_a_partition_table_has_no_partitions(tools):
    tools.answer("partx-no-table")
    assert blockdev.partitions("/dev/loop0") == []


def test_partx_other_failures_are_errors(tools):
    tools.calls.clear()
    tools.answers.append(dict(rc=1, stdout="", stderr="partx: /dev/loop9: No such file or directory"))
    with pytest.raises(CommandError, match="No such file"):
        blockdev.partitions("/dev/loop9")


def test_probe_of_a_byte_range_and_of_nothing(tools):
    tools.answer("blkid-ext4-offset", "blkid-nothing")
    found = blockdev.probe("/dev/loop0", offset=1048576, size=41943040)
    assert tools.argv == ["/usr/sbin/blkid", "-p", "-o", "export", "-O", "1048576", "-S", "41943040", "/dev/loop0"]
    assert found["TYPE"] == "ext4" and found["UUID"] == "bcdedae3-2b70-44e5-bb1b-61351cdeb41d"
    assert blockdev.probe("/dev/loop0") == {}
    assert tools.argv == ["/usr/sbin/blkid", "-p", "-o", "export", "/dev/loop0"]


def test_losetup_mount_umount_argv(tools):
    tools.answers.append(dict(rc=0, stdout="/dev/loop3\n", stderr=""))
    assert blockdev.attach("/w/export.raw", scan=True) == "/dev/loop3"
    assert tools.argv == ["/usr/sbin/losetup", "-r", "-f", "--show", "-P", "/w/export.raw"]
    tools.answers.append(dict(rc=0, stdout="/dev/loop4\n", stderr=""))
    blockdev.attach("/w/export.raw", offset=1048576, sizelimit=41943040)
    assert tools.argv == ["/usr/sbin/losetup", "-r", "-f", "--show", "-o", "1048576", "--sizelimit", "41943040",
                          "/w/export.raw"]
    blockdev.detach("/dev/loop4")
    assert tools.argv == ["/usr/sbin/losetup", "-d", "/dev/loop4"]
    assert blockdev.loop_devices() == []  # losetup prints nothing when there is no loop device
    blockdev.mount("/dev/loop3p1", "/mnt/x", "ext4", point.MOUNT_OPTIONS["ext4"])
    assert tools.argv == ["/usr/bin/mount", "-t", "ext4", "-o", "ro,noload,nosuid,nodev,noexec", "/dev/loop3p1",
                          "/mnt/x"]
    blockdev.umount("/mnt/x", lazy=True)
    assert tools.argv == ["/usr/bin/umount", "-l", "/mnt/x"]


def test_fuse_export_argv_escapes_commas(tools):
    argv = qsd.fuse_export_argv("/backup/a,b/20261201T000000Z.qcow2", "/w/export.raw", "/w/qsd.pid")
    assert argv == [
        "/usr/bin/qemu-storage-daemon",
        "--blockdev", "driver=file,node-name=layer,filename=/backup/a,,b/20261201T000000Z.qcow2,read-only=on",
        "--blockdev", "driver=qcow2,node-name=point,file=layer,read-only=on",
        "--export", "type=fuse,id=export,node-name=point,mountpoint=/w/export.raw,writable=off",
        "--daemonize", "--pidfile", "/w/qsd.pid"]


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("all", "all"), ("disk", "disk"), ("2", 2), (3, 3)])
def test_partition_option(value, expected):
    assert point.parse_partition(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "first", "1.5"])
def test_partition_option_refused(value):
    with pytest.raises(Exception, match="must be auto, all, disk or a partition number"):
        point.parse_partition(value)


@pytest.mark.parametrize("text,parts", [("etc/nginx", ["etc", "nginx"]), ("/var//www/./x", ["var", "www", "x"])])
def test_paths_inside_the_point(text, parts):
    assert point.check_relative_path(text) == parts


@pytest.mark.parametrize("text", ["", "/", "etc/../../root", "..", "a\0b"])
def test_paths_inside_the_point_refused(text):
    with pytest.raises(Exception, match="inside the point"):
        point.check_relative_path(text)


def test_work_dir_is_a_hidden_sibling():
    assert point.work_dir("/restore/web1.point") == "/restore/.web1.point.snapchain-mount"
