# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""_zfs.streams.read_header on the heads of real zfs send streams and _cli.zfs.send_argv.

``fixtures/cli/zfs-send-heads.json`` holds the first 936 bytes of streams written by OpenZFS 2.1.11
in the lab VM (the commands and the snapshots' GUIDs are in the file): a full, a ``-i``, a ``-I``
(compound), a ``-w`` and the rest of an interrupted ``receive -s`` (``send -t``).  Sending and
receiving them for real is tested in tests/integration/test_zfs_send.py.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from ansible_collections.snapchain.vmbackup.plugins.module_utils._cli import zfs
from ansible_collections.snapchain.vmbackup.plugins.module_utils._core.errors import InputError
from ansible_collections.snapchain.vmbackup.plugins.module_utils._zfs import streams

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cli", "zfs-send-heads.json")) as _f:
    RECORDED = json.load(_f)
GUID = RECORDED["guids"]


@pytest.fixture
def head(tmp_path):
    def write(name, size=None):
        data = base64.b64decode(RECORDED["heads"][name])
        path = tmp_path / name
        path.write_bytes(data[:size])
        return str(path)
    return write


def test_full_incremental_raw_and_resuming_heads(head):
    full = streams.read_header(head("full"))
    assert (full["toname"], full["toguid"], full["fromguid"]) == ("labzpool/sv@a", GUID["a"], "0")
    assert not (full["compound"] or full["raw"] or full["resuming"])
    inc = streams.read_header(head("inc"))
    assert (inc["toname"], inc["toguid"], inc["fromguid"]) == ("labzpool/sv@b", GUID["b"], GUID["a"])
    rest = streams.read_header(head("rest"))
    assert rest["resuming"] and rest["toguid"] == GUID["a"] and rest["fromguid"] == "0"
    raw = streams.read_header(head("raw"))
    # -w of an unencrypted dataset: compressed, embedded blocks as on disk; the RAW feature is for encrypted ones
    assert raw["toguid"] == GUID["a"] and raw["features"] == 0x430000 and not raw["raw"]


def test_compound_head_takes_its_base_from_the_first_inner_stream(head):
    compound = streams.read_header(head("incI"))
    assert compound["compound"] and compound["toname"] == "labzpool/sv@c" and compound["toguid"] == "0"
    assert compound["fromguid"] == GUID["a"]
    with pytest.raises(InputError, match="without the END record"):
        streams.read_header(head("incI", 312))


def test_not_a_stream(head, tmp_path):
    for data in (b"", b"\0" * 312, base64.b64decode(RECORDED["heads"]["full"])[:100]):
        path = tmp_path / "noise"
        path.write_bytes(data)
        with pytest.raises(InputError, match="is not a ZFS send stream"):
            streams.read_header(str(path))
    with pytest.raises(InputError, match="cannot read"):
        streams.read_header(str(tmp_path / "missing"))


def test_send_argv(recorded):
    z = "/usr/sbin/zfs"
    assert zfs.send_argv(snapshot="t/a@b") == [z, "send", "t/a@b"]
    assert zfs.send_argv(snapshot="t/a@b", base="t/a@a", raw=True) == [z, "send", "-w", "-i", "t/a@a", "t/a@b"]
    assert zfs.send_argv(snapshot="t/a@c", base="t/a@a", intermediates=True) == [z, "send", "-I", "t/a@a", "t/a@c"]
    assert zfs.send_argv(resume_token="1-abc") == [z, "send", "-t", "1-abc"]
